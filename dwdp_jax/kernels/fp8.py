"""FP8 (e4m3) block quantization, DeepSeek-V3's scheme: weights in 128 x 128 blocks, activations in 1 x 128 row
groups, each block with one fp32 scale that multiplies it back (the checkpoint's `weight_scale_inv`).

The FP8 expert path of the split-weight grouped GEMM (`split_gemm.split_ragged_dot` with scales) computes, per
128-wide K block, an fp8 x fp8 product accumulated in fp32 and scaled by the row's and the weight block's scales:
what DeepSeek's own inference kernels do, and half the weight bytes of bf16 for the HBM stream and for DWDP's pull.
Measured on H200 it is correct but slow (0.23-0.25 of the dense FP8 GEMM, 0.53-0.60 of the bf16 split kernel:
experiments.bench_grouped_gemm), so no model config builds FP8 experts yet.

Layouts: FP8 weights are stored as the checkpoint stores them, [G, N, K] ([out, in]: K contiguous, which Hopper's
fp8 wgmma needs for both operands: gate/up ran at 135 TFLOP/s from N-contiguous weights, through Triton's
transposes, and 223 from these; H200), with scales [G, N/128, K/128]; activations [M, K]
have scales [K/128, M] (K block major, so a kernel's row tile reads its scales contiguously).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128  # DeepSeek-V3's weight_block_size and activation group
E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
# A block of zeros gets this scale, not 0: its values quantize to 0 either way, and no division by zero occurs.
_TINY = 1e-12


def _require_blocks(shape: tuple[int, ...], axes: tuple[int, ...], what: str) -> None:
    for axis in axes:
        if shape[axis] % BLOCK:
            raise ValueError(f"{what}: dimension {axis} of shape {shape} must be a multiple of {BLOCK} "
                             f"(the FP8 scale block), got {shape[axis]}")


def quantize_weights(w_GNK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(e4m3 [G, N, K], fp32 scales [G, N/128, K/128]) of weights [G, N, K] ([out, in]): each 128 x 128 block
    scaled so its largest magnitude is e4m3's 448."""
    _require_blocks(w_GNK.shape, (-2, -1), "quantize_weights")
    g, n, k = w_GNK.shape
    w_GRBSC = w_GNK.astype(jnp.float32).reshape(g, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale_GRS = jnp.maximum(jnp.abs(w_GRBSC).max(axis=(2, 4)), _TINY) / E4M3_MAX
    q_GRBSC = (w_GRBSC / scale_GRS[:, :, None, :, None]).astype(E4M3)
    return q_GRBSC.reshape(g, n, k), scale_GRS


def dequantize_weights(q_GNK: jax.Array, scale_GRS: jax.Array) -> jax.Array:
    """fp32 [G, N, K] weights of `quantize_weights`' output."""
    g, n, k = q_GNK.shape
    q_GRBSC = q_GNK.astype(jnp.float32).reshape(g, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    return (q_GRBSC * scale_GRS[:, :, None, :, None]).reshape(g, n, k)


def quantize_weights_kn(w_GKN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`quantize_weights` of [G, K, N] weights (the model's [in, out] bf16 layout), stored [G, N, K]."""
    return quantize_weights(jnp.swapaxes(w_GKN, 1, 2))


def dequantize_weights_kn(q_GNK: jax.Array, scale_GRS: jax.Array) -> jax.Array:
    """fp32 [G, K, N] weights (the model's layout) of `quantize_weights`' output."""
    return jnp.swapaxes(dequantize_weights(q_GNK, scale_GRS), 1, 2)


def quantize_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(e4m3 [M, K], fp32 scales [K/128, M]): each row's 128-wide groups scaled to e4m3's range."""
    _require_blocks(x_MK.shape, (-1,), "quantize_rows")
    m, k = x_MK.shape
    x_MSB = x_MK.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK)
    scale_MS = jnp.maximum(jnp.abs(x_MSB).max(axis=2), _TINY) / E4M3_MAX
    return (x_MSB / scale_MS[:, :, None]).astype(E4M3).reshape(m, k), scale_MS.T


def dequantize_rows(q_MK: jax.Array, scale_SM: jax.Array) -> jax.Array:
    """fp32 activations of `quantize_rows`' output."""
    m, k = q_MK.shape
    return (q_MK.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK) * scale_SM.T[:, :, None]).reshape(m, k)
