"""Block-scaled dense FP8 GEMM: DeepSeek-R1's projections as the checkpoint stores them (e4m3 [out, in], one fp32
scale per 128 x 128 block; `fp8.BlockScaled`) times activations quantized in 1 x 128 groups.

On Hopper the product runs on the Mosaic GPU FP8 split kernel (`split_gemm_fp8_mgpu`) as one group of one slab:
the same fp32 promotion per 128-wide K block, no dequantized copy of the weight. Its launch windows of `group_m`
row tiles sweep every column block with row tiles fastest, so a window's activations stay in L2 while the weight
streams once per window (one window over all of a 32K-token batch would read the activations from HBM once per
column block). Elsewhere (CPU, bf16 off Hopper, fp32 activations, K not a multiple of 128) `fp8.linear` computes
the same product from the dequantized operands.

Measured on H200 (`experiments.bench_fp8_dense`, 32768 rows, rounds against the same run's cuBLAS FP8 GEMM with
one scale per tensor): 0.878 of it at the dense MLP's gate/up (7168 x 18432), 0.842 at o_proj, 0.801 at q_b, 0.694
at kv_a (576 columns); the path it replaced (dequantize, then a bf16 GEMM) ran at 0.50-0.54.

Where cuBLASLt's own block-scaled GEMM (`cublaslt_fp8`, cuBLAS 12.9 and later) timed faster at a shape on this card
in `bench_fp8_dense`'s rounds (`--record` or `--tune`: both rates recorded in the block cache), a plain product (no
`out_spread`, bf16 out) runs there instead (`library_faster`); without entries, the Mosaic GPU kernel.

An output width that is not a multiple of 128 (kv_a_proj_with_mqa: 576) is padded to whole blocks with zero rows,
which the partial block's scale leaves zero, and cut after the kernel. An MLP (`swiglu`) runs gate and up as the
kernel's fused pair, its epilogue computing the SwiGLU: no [T, 2F] output, no separate pass for the SwiGLU.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import cublaslt_fp8, fp8, fp8_rows, tuning
from dwdp_jax.kernels.split_gemm_fp8_mgpu import Fp8Blocks, chained_steps, split_ragged_dot_fp8_mgpu

NAME_TUNED = "dense_mgpu_fp8"  # its entries in the block cache (`tuning`; `experiments.bench_fp8_dense --tune`)
# 16 row tiles (2048 rows) a window: their activations (2048 x K e4m3, at most 36 MiB at R1's widest K) stay in
# the 60 MiB L2 while the weight streams past them.
DEFAULT_DENSE_BLOCKS = Fp8Blocks(chain=True, per_group=True, group_m=16)
# The SwiGLU's gate and up in one fused GEMM: the grouped kernel's gate/up tiling (128 columns of each weight, one
# partial at a time) in the same windows.
DEFAULT_SWIGLU_BLOCKS = Fp8Blocks(tile_n=128, chain=True, per_group=True, group_m=16, one_partial=True)
# `swiglu`'s error against the fp32 MLP of the same quantized operands. Its hidden rows are quantized to e4m3 again:
# a hidden value that the first GEMM's accumulation moves across an e4m3 rounding step moves by a whole step (up to
# 1/16 of it), so the MLP is bounded by this, each GEMM alone by bf16 rounding (measured: 4.0-4.4e-3 on H100 at R1's
# widths, each GEMM within 2e-3).
SWIGLU_REL_TOL = 1e-2


class QuantizedRows(NamedTuple):
    """Activations already quantized for the kernel (`fp8.quantize_rows`' e4m3 values [T, K] and scales [K/128,
    T]; `norm_rows.rms_norm_quantized` computes them with their norm) and the dtype the products come out in."""

    values_TK: jax.Array
    scales_ST: jax.Array
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values_TK.shape


def default_blocks(k: int, fused: bool = False) -> Fp8Blocks:
    """The defaults (fused: the SwiGLU's gate/up) with the deepest pipeline (of 4, 2, 1 stages) dividing K's scale
    blocks, as chaining needs."""
    return chained_steps(DEFAULT_SWIGLU_BLOCKS if fused else DEFAULT_DENSE_BLOCKS, k)


def cached_blocks(k: int, n: int, rows: int, fused: bool = False) -> Fp8Blocks:
    """The blocks the kernel takes without an override: the card's tuned entry for this K, padded width (fused:
    the intermediate width) and rows (`NAME_TUNED`), else the defaults."""
    return (tuning.lookup(NAME_TUNED, Fp8Blocks, jax.devices()[0].device_kind, k, padded_width(n), fused, rows)
            or default_blocks(k, fused))


def padded_width(n: int) -> int:
    """n in whole 128-wide weight blocks: the width the kernel's tuned blocks are cached under."""
    return fp8.blocks(n) * fp8.BLOCK


def computed_width(n: int, b: Fp8Blocks) -> int:
    """Output columns the kernel computes for n under blocks b: whole CTA column tiles (256 with the warpgroups on
    column halves, twice that in clusters along N), the weight padded with zero rows. The column halves' tiles read
    a third fewer L2 bytes per FLOP than the row split's; at a width they do not divide (q_a+kv_a's 2176: 2304) they
    pay the padding's FLOPs for it, which the sweep weighs (`bench_fp8_dense --tune`)."""
    step = b.cta_n * (2 if b.cluster_n else 1)
    return -(-padded_width(n) // step) * step


def library_faster(k: int, n: int, rows: int, device: jax.Device | None = None) -> bool:
    """Whether cuBLASLt's block-scaled GEMM timed faster than this kernel's tuned blocks at (K, N, rows) on this
    card (`tuning.fastest` over both entries; N as the kernel's padded width) and can run here (its operand
    alignment, `cublaslt_fp8.aligned`)."""
    device = device or jax.devices()[0]
    faster = tuning.fastest((NAME_TUNED, cublaslt_fp8.KERNEL), device.device_kind, k, padded_width(n), False,
                            rows) == cublaslt_fp8.KERNEL
    return faster and cublaslt_fp8.aligned(rows, n) and cublaslt_fp8.unavailable(device) is None


def on_kernel(x_TK: jax.Array, w: fp8.BlockScaled, device: jax.Device | None = None) -> bool:
    """Whether `linear` takes the kernel: bf16 activations, K whole scale blocks, a Hopper GPU."""
    device = device or jax.devices()[0]
    hopper = device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")
    return hopper and x_TK.dtype == jnp.bfloat16 and w.values_GNK.shape[1] % fp8.BLOCK == 0


def block_scaled_gemm(x_TK: jax.Array, x_scale_ST: jax.Array, w: fp8.BlockScaled, *, blocks: Fp8Blocks | None = None,
                      out_dtype=jnp.bfloat16, interpret: bool = False,
                      out_spread: tuple[int, int] | None = None) -> jax.Array:
    """x @ W^T for e4m3 x [T, K] with `fp8.quantize_rows` scales [K/128, T] and an FP8 weight W [N, K]: [T, N] in
    out_dtype, or with out_spread (part, width) [T, N / part * width], each run of part columns at the start of
    a run of width, the rest unwritten (`split_ragged_dot_fp8_mgpu`; N whole blocks). blocks: None takes the tuned
    ones for this shape and card (`tuning`), else the defaults, or cuBLASLt where it timed faster
    (`library_faster`: bf16 out, no out_spread)."""
    w.check("block_scaled_gemm weight")
    if w.values_GNK.ndim != 2:
        raise ValueError(f"block_scaled_gemm: the weight must be one [N, K] matrix, got {w.values_GNK.shape}")
    n, k = w.values_GNK.shape
    if k % fp8.BLOCK:
        raise ValueError(f"block_scaled_gemm: K={k} must be a multiple of {fp8.BLOCK} (the FP8 scale block)")
    if out_spread and n != padded_width(n):
        raise ValueError(f"block_scaled_gemm: out_spread needs N={n} in whole {fp8.BLOCK}-row blocks")
    t = x_TK.shape[0]
    if not (blocks or out_spread or interpret) and out_dtype == jnp.bfloat16 and library_faster(k, n, t):
        return cublaslt_fp8.block_scaled_gemm(x_TK, x_scale_ST, w)
    # cached under the padded width: the kernel's problem (a stack of weights is padded per weight)
    b = blocks or cached_blocks(k, n, t)
    width = computed_width(n, b)
    if out_spread and width != n:
        raise ValueError(f"block_scaled_gemm: out_spread needs N={n} in whole CTA column tiles of {b}: it would "
                         f"compute {width} columns")
    values = jnp.pad(w.values_GNK, ((0, width - n), (0, 0)))
    scales = jnp.pad(w.scales_GRS, ((0, width // fp8.BLOCK - w.scales_GRS.shape[0]), (0, 0)), constant_values=1.0)
    out = split_ragged_dot_fp8_mgpu(x_TK, jnp.full((1,), t, jnp.int32), ((values[None], scales[None]),),
                                    x_scale_SM=x_scale_ST, blocks=b, interpret=interpret, out_dtype=out_dtype,
                                    out_spread=out_spread)
    return out if out_spread else out[:, :n]


def swiglu(x_TK: jax.Array, gate: fp8.BlockScaled, up: fp8.BlockScaled, down: fp8.BlockScaled, *,
           blocks: tuple[Fp8Blocks | None, Fp8Blocks | None] | None = None, interpret: bool = False) -> jax.Array:
    """down(silu(x @ gate^T) * (x @ up^T)) for FP8 weights (an MLP as the checkpoint stores it): the products in
    fp32, the SwiGLU in fp32 rounded to x's dtype, quantized per row and 128 columns for the down projection; [T,
    D] in x's dtype. On the kernel (`on_kernel`, the intermediate width whole blocks) gate and up run as one fused
    GEMM (`swiglu_hidden`), quantized by `fp8_rows` for down. Elsewhere `fp8.linear` computes each product.
    blocks: (the fused GEMM's, down's), each None for the tuned ones for its shape and this card, else the
    defaults."""
    _check_mlp(x_TK, gate, up, down)
    if not (interpret or all(on_kernel(x_TK, w) for w in (gate, up, down))) or gate.values_GNK.shape[0] % fp8.BLOCK:
        g_TF, u_TF = (fp8.linear(x_TK, w, out_dtype=jnp.float32) for w in (gate, up))
        return fp8.linear((jax.nn.silu(g_TF) * u_TF).astype(x_TK.dtype), down)
    fused_blocks, down_blocks = blocks or (None, None)
    h_TF = swiglu_hidden(x_TK, gate, up, blocks=fused_blocks, interpret=interpret)
    return block_scaled_gemm(*fp8_rows.quantize_rows(h_TF), down, blocks=down_blocks, out_dtype=x_TK.dtype,
                             interpret=interpret)


def _check_mlp(x_TK: jax.Array, gate: fp8.BlockScaled, up: fp8.BlockScaled, down: fp8.BlockScaled) -> None:
    """ValueError naming the weight whose dtypes, scales or shape do not make an MLP of x's width: gate and up [F,
    D], down [N, F], D x's last axis."""
    d, f = x_TK.shape[-1], gate.values_GNK.shape[0]
    for name, w, want in (("gate", gate, (f, d)), ("up", up, (f, d)), ("down", down, (down.values_GNK.shape[0], f))):
        w.check(f"swiglu {name}")
        if tuple(w.values_GNK.shape) != want:
            raise ValueError(f"swiglu {name}: FP8 weight of shape {list(w.values_GNK.shape)}; want {list(want)} for "
                             f"x of width {d} and gate's {f} outputs ([F, D] gate and up, [N, F] down)")


def swiglu_hidden(x_TK: jax.Array, gate: fp8.BlockScaled, up: fp8.BlockScaled, *, blocks: Fp8Blocks | None = None,
                  interpret: bool = False) -> jax.Array:
    """silu(x @ gate^T) * (x @ up^T) on the kernel: x quantized per row and 128 columns, gate and up as one fused
    GEMM whose epilogue computes the SwiGLU in fp32 (no [T, 2F] output, no pass over it); [T, F] bf16. blocks: None
    the tuned ones for this shape and card (`NAME_TUNED`, fused), else `default_blocks(K, fused=True)`."""
    t, k = x_TK.shape
    f = gate.values_GNK.shape[0]
    b = blocks or cached_blocks(k, f, t, fused=True)
    x_q, x_scale = fp8_rows.quantize_rows(x_TK)
    weights = ((fp8.BlockScaled(gate.values_GNK[None], gate.scales_GRS[None]).check("swiglu gate"),
                fp8.BlockScaled(up.values_GNK[None], up.scales_GRS[None]).check("swiglu up")),)
    return split_ragged_dot_fp8_mgpu(x_q, jnp.full((1,), t, jnp.int32), weights, x_scale_SM=x_scale, fused=True,
                                     blocks=b, interpret=interpret, out_dtype=jnp.bfloat16)


def linear(x_TK: jax.Array | QuantizedRows, w: fp8.BlockScaled) -> jax.Array:
    """`fp8.linear` (x quantized per row and 128 columns, times the block-scaled weight, fp32 accumulation), on the
    block-scaled kernel where `on_kernel` or x comes quantized; [T, N] in x's dtype."""
    return linear_stacked(x_TK, (w,))[0]


def linear_stacked(x_TK: jax.Array | QuantizedRows, ws: Sequence[fp8.BlockScaled]) -> list[jax.Array]:
    """x through several FP8 weights that share it (MLA's q_a and kv_a): [T, N_i] each. On the kernel, one GEMM
    over the weights stacked along N (each padded to whole 128-row blocks, so every scale block stays its own), x
    quantized once (or as it comes, `QuantizedRows`): kv_a's 576 columns alone make 5 column tiles, about 10 waves
    of a 32K-token batch over 132 SMs with one tile of padding in five; stacked under q_a's 1536 they are 17 tiles,
    33 waves. Elsewhere `fp8.linear` per weight. Each output column is the same product either way."""
    quantized = isinstance(x_TK, QuantizedRows)
    if not quantized and not all(on_kernel(x_TK, w) for w in ws):
        return [fp8.linear(x_TK, w) for w in ws]
    widths = [w.values_GNK.shape[0] for w in ws]
    values = jnp.concatenate([jnp.pad(w.values_GNK, ((0, padded_width(n) - n), (0, 0)))
                              for w, n in zip(ws, widths)])
    stacked = fp8.BlockScaled(values, jnp.concatenate([w.scales_GRS for w in ws]))
    x_rows = (x_TK.values_TK, x_TK.scales_ST) if quantized else fp8_rows.quantize_rows(x_TK)
    out = block_scaled_gemm(*x_rows, stacked.check("linear_stacked"), out_dtype=x_TK.dtype)
    starts = [sum(padded_width(n) for n in widths[:i]) for i in range(len(ws))]
    return [out[:, a:a + n] for a, n in zip(starts, widths)]


def linear_each(x_TK: jax.Array, ws: Sequence[fp8.BlockScaled],
                spreads: Sequence[tuple[int, int] | None] | None = None) -> list[jax.Array]:
    """x through several FP8 weights that share it, each output its own array: on the kernel one GEMM per weight on
    one quantization of x (`linear_stacked`'s single output would be sliced apart, a copy of every column), elsewhere
    `fp8.linear` per weight. spreads: per weight None or the kernel's out_spread (part, width), its other columns
    unspecified (zeros off the kernel)."""
    spreads = spreads or [None] * len(ws)
    if not all(on_kernel(x_TK, w) for w in ws):
        return [fp8.linear(x_TK, w) if s is None else spread_columns(fp8.linear(x_TK, w), *s)
                for w, s in zip(ws, spreads)]
    x_q, x_scale = fp8_rows.quantize_rows(x_TK)
    return [block_scaled_gemm(x_q, x_scale, w, out_dtype=x_TK.dtype, out_spread=s) for w, s in zip(ws, spreads)]


def spread_columns(out_TN: jax.Array, part: int, width: int) -> jax.Array:
    """[T, N] as the kernel's out_spread lays it out: each run of part columns followed by width - part zeros."""
    t, n = out_TN.shape
    return jnp.pad(out_TN.reshape(t, n // part, part), ((0, 0), (0, 0), (0, width - part))).reshape(t, -1)
