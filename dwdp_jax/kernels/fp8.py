"""FP8 (e4m3) block quantization, DeepSeek-V3's scheme: weights in 128 x 128 blocks, activations in 1 x 128 row
groups, each block with one fp32 scale that multiplies it back (the checkpoint's `weight_scale_inv`).

The FP8 expert paths of the split-weight grouped GEMM (`split_gemm_fp8_mgpu.split_ragged_dot_fp8_mgpu` on Mosaic
GPU, and `split_gemm.split_ragged_dot` with scales on Triton) compute, per 128-wide K block, an fp8 x fp8 product
accumulated in fp32 and scaled by the row's and the weight block's scales: what DeepSeek's own inference kernels
do, and half the weight bytes of bf16 for the HBM stream and for DWDP's pull. Measured on H200 the Triton path is
correct but slow (0.23-0.25 of the dense FP8 GEMM, 0.53-0.60 of the bf16 split kernel), the Mosaic GPU kernel 2.9
times as fast (experiments.bench_fp8_gemm). The model builds FP8 experts with `ModelConfig.fp8_experts`: each weight a
`BlockScaled` pair, which the CPU reference path (`reference_ffn`) and the scaled split kernel consume.

Layouts: FP8 weights are stored as the checkpoint stores them, [G, N, K] ([out, in]: K contiguous, which Hopper's
fp8 wgmma needs for both operands: gate/up ran at 135 TFLOP/s from N-contiguous weights, through Triton's
transposes, and 223 from these; H200), with scales [G, N/128, K/128]; activations [M, K]
have scales [K/128, M] (K block major, so a kernel's row tile reads its scales contiguously). A dimension that is
not a multiple of 128 ends in a partial block with a scale of its own (the checkpoint's `weight_scale_inv` has
ceil(N/128) x ceil(K/128) entries); the kernels take whole blocks only, the reference path any.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dwdp_jax.kernels.grouped_dot import grouped_dot

BLOCK = 128  # DeepSeek-V3's weight_block_size and activation group
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
# A block of zeros gets this scale, not 0: its values quantize to 0 either way, and no division by zero occurs.
TINY = 1e-12


def has_fp8_tensor_cores(device: jax.Device) -> bool:
    """Whether `device` is an NVIDIA GPU with FP8 tensor cores and conversions (compute capability >= 8.9: Ada,
    Hopper, Blackwell)."""
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or cc is None:
        return False
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return (major, minor) >= (8, 9)


class BlockScaled(NamedTuple):
    """An FP8 weight as DeepSeek's checkpoint stores it: e4m3 values [G, N, K] ([out, in]: K contiguous) and fp32
    scales [G, ceil(N/128), ceil(K/128)], one per 128 x 128 block, multiplying it back."""

    values_GNK: jax.Array
    scales_GRS: jax.Array

    def check(self, what: str) -> "BlockScaled":
        """Itself, or ValueError naming `what` when the dtypes or the scales' shape do not match the values."""
        q, s = self.values_GNK, self.scales_GRS
        want = scale_shape(q.shape)
        if q.dtype != E4M3 or s.dtype != jnp.float32 or tuple(s.shape) != want:
            raise ValueError(f"{what}: FP8 weight values {q.dtype}{list(q.shape)} with scales {s.dtype}"
                             f"{list(s.shape)}; want float8_e4m3fn values and float32 scales {list(want)} (one per "
                             f"{BLOCK} x {BLOCK} block, partial edge blocks included)")
        return self


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def scale_shape(shape_GNK: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape_GNK[:-2], blocks(shape_GNK[-2]), blocks(shape_GNK[-1]))


def _pad_to_blocks(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    for axis in axes:
        pad[axis] = (0, blocks(x.shape[axis]) * BLOCK - x.shape[axis])
    return jnp.pad(x, pad)


def _require_blocks(shape: tuple[int, ...], axes: tuple[int, ...], what: str) -> None:
    for axis in axes:
        if shape[axis] % BLOCK:
            raise ValueError(f"{what}: dimension {axis} of shape {shape} must be a multiple of {BLOCK} "
                             f"(the FP8 scale block), got {shape[axis]}")


def _quantize_weight(w_NK: jax.Array) -> tuple[jax.Array, jax.Array]:
    n, k = w_NK.shape
    r, c = blocks(n), blocks(k)
    w_RBSC = _pad_to_blocks(w_NK.astype(jnp.float32), (0, 1)).reshape(r, BLOCK, c, BLOCK)
    scale_RS = jnp.maximum(jnp.abs(w_RBSC).max(axis=(1, 3)), TINY) / E4M3_MAX
    q_RBSC = (w_RBSC / scale_RS[:, None, :, None]).astype(E4M3)
    return q_RBSC.reshape(r * BLOCK, c * BLOCK)[:n, :k], scale_RS


def quantize_weights(w_GNK: jax.Array) -> BlockScaled:
    """(e4m3 [G, N, K], fp32 scales [G, ceil(N/128), ceil(K/128)]) of weights [G, N, K] ([out, in]): each 128 x 128
    block (partial at the edges) scaled so its largest magnitude is e4m3's 448. One weight at a time (`lax.map`):
    fp32 temporaries of one [N, K] only, where the whole of R1's routed down weights in fp32 are 14 GiB."""
    return BlockScaled(*jax.lax.map(_quantize_weight, w_GNK))


def dequantize_weights(q_GNK: jax.Array, scale_GRS: jax.Array) -> jax.Array:
    """fp32 [G, N, K] weights of `quantize_weights`' output."""
    g, n, k = q_GNK.shape
    r, c = blocks(n), blocks(k)
    q_GRBSC = _pad_to_blocks(q_GNK.astype(jnp.float32), (1, 2)).reshape(g, r, BLOCK, c, BLOCK)
    return (q_GRBSC * scale_GRS[:, :, None, :, None]).reshape(g, r * BLOCK, c * BLOCK)[:, :n, :k]


def quantize_weights_kn(w_GKN: jax.Array) -> BlockScaled:
    """`quantize_weights` of [G, K, N] weights (the model's [in, out] bf16 layout), stored [G, N, K]; each weight
    transposed as it is quantized, so no transposed copy of them all."""
    return BlockScaled(*jax.lax.map(lambda w_KN: _quantize_weight(w_KN.T), w_GKN))


def dequantize_weights_kn(q_GNK: jax.Array, scale_GRS: jax.Array) -> jax.Array:
    """fp32 [G, K, N] weights (the model's layout) of `quantize_weights`' output."""
    return jnp.swapaxes(dequantize_weights(q_GNK, scale_GRS), 1, 2)


def quantize_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(e4m3 [M, K], fp32 scales [K/128, M]): each row's 128-wide groups scaled to e4m3's range."""
    _require_blocks(x_MK.shape, (-1,), "quantize_rows")
    m, k = x_MK.shape
    x_MSB = x_MK.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK)
    scale_MS = jnp.maximum(jnp.abs(x_MSB).max(axis=2), TINY) / E4M3_MAX
    return (x_MSB / scale_MS[:, :, None]).astype(E4M3).reshape(m, k), scale_MS.T


def dequantize_rows(q_MK: jax.Array, scale_SM: jax.Array) -> jax.Array:
    """fp32 activations of `quantize_rows`' output."""
    m, k = q_MK.shape
    return (q_MK.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK) * scale_SM.T[:, :, None]).reshape(m, k)


def as_fp8_rows(x_MK: jax.Array) -> jax.Array:
    """x in fp32 as an FP8 GEMM sees it: quantized in 1 x 128 groups (partial at the end) and multiplied back."""
    k = x_MK.shape[1]
    padded = _pad_to_blocks(x_MK, (1,))
    return dequantize_rows(*quantize_rows(padded))[:, :k]


def as_fp8_token_blocks(x_THD: jax.Array) -> jax.Array:
    """x [tokens, heads, dim] as an FP8 attention kernel reads it: e4m3 with one fp32 scale per 128 tokens of one
    head (the last block partial), multiplied back; in x's dtype."""
    t, h, d = x_THD.shape
    x_BTHD = _pad_to_blocks(x_THD.astype(jnp.float32), (0,)).reshape(-1, BLOCK, h, d)
    scale_BH = jnp.maximum(jnp.abs(x_BTHD).max(axis=(1, 3)), TINY) / E4M3_MAX
    q_BTHD = (x_BTHD / scale_BH[:, None, :, None]).astype(E4M3)
    return (q_BTHD.astype(jnp.float32) * scale_BH[:, None, :, None]).reshape(-1, h, d)[:t].astype(x_THD.dtype)


def reference_ffn(x_MD: jax.Array, group_sizes_G: jax.Array, w_gate: BlockScaled, w_up: BlockScaled,
                  w_down: BlockScaled) -> jax.Array:
    """The SwiGLU expert FFN on FP8 experts exactly as the scaled kernels define it: x quantized per row and 128
    columns, the fp32 product with the block-dequantized weights, the SwiGLU output rounded to x's dtype and
    quantized again before the down projection. Rows past sum(group_sizes) come back zero."""
    def dot(a_MK, w: BlockScaled):
        return grouped_dot(as_fp8_rows(a_MK), dequantize_weights_kn(*w), group_sizes_G, jax.lax.Precision.HIGHEST)

    h_MF = (jax.nn.silu(dot(x_MD, w_gate)) * dot(x_MD, w_up)).astype(x_MD.dtype)
    return dot(h_MF, w_down).astype(x_MD.dtype)


def linear(x_TK: jax.Array, w: BlockScaled, out_dtype=None) -> jax.Array:
    """x @ W^T for a dense FP8 weight W [N, K] (a projection as the checkpoint stores it: e4m3 [out, in] and one
    fp32 scale per 128 x 128 block), as a block-scaled FP8 GEMM defines it: x quantized per row and 128 columns,
    the product with the block-dequantized weight accumulated in fp32; [T, N] in out_dtype (default x's dtype).

    fp32 activations: both operands exact in fp32 (the reference). bf16 activations: both dequantized operands
    rounded to bf16 (2^-9 relative, far below e4m3's 2^-4 step) for a bf16 GEMM at tensor-core rate, the path
    off Hopper (`dense_fp8.linear` takes the block-scaled kernel there)."""
    compute = jnp.bfloat16 if x_TK.dtype == jnp.bfloat16 else jnp.float32
    precision = jax.lax.Precision.HIGHEST if compute == jnp.float32 else None
    w_KN = dequantize_weights(w.values_GNK[None], w.scales_GRS[None])[0].T.astype(compute)
    return jnp.dot(as_fp8_rows(x_TK).astype(compute), w_KN, preferred_element_type=jnp.float32,
                   precision=precision).astype(out_dtype or x_TK.dtype)
