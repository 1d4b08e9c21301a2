"""Activation quantization for the FP8 GEMMs in one pass over HBM: rows in 1 x 128 groups, each group scaled to
e4m3's range (`fp8.quantize_rows`' result, computed by a Pallas Triton kernel on GPUs with FP8 tensor cores).

XLA computes `fp8.quantize_rows` as a reduction (each group's absolute maximum) and a separate elementwise pass
that divides by it, so it reads the activations twice; measured on H200 it ran at 2.4-2.9x its HBM floor (1.06 ms
for the 262144 x 2048 rows of R1's down projection, 3.13 ms for gate/up's 262144 x 7168). The kernel reads each
128-wide group once, writes its e4m3 values and its scale, and moves 3 bytes per bf16 element plus 4 per group.

Program (j, i) quantizes rows [i * block_m, (i + 1) * block_m) of column group j; the column group varies fastest
so that neighbouring programs read neighbouring 256-byte row segments. The same arithmetic as the reference
(fp32 absolute maximum, floor `fp8._TINY`, scale = amax / 448, value / scale rounded to nearest even) gives the
same bytes, up to the hardware's division rounding (checked on GPU against the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dwdp_jax.kernels import fp8

# Rows per program and Triton warps: 64 x 128 bf16 (16 KiB) a program at 4 warps, chosen on H200
# (`experiments.bench_fp8_rows`).
BLOCK_M, NUM_WARPS = 64, 4


def on_kernel(x_MK: jax.Array, device: jax.Device | None = None) -> bool:
    """Whether `quantize_rows` takes the kernel: 16- or 32-bit float rows of whole 128-wide groups on an NVIDIA GPU
    with FP8 conversion (compute capability 8.9 or later)."""
    return (fp8.has_fp8_tensor_cores(device or jax.devices()[0]) and x_MK.ndim == 2
            and x_MK.shape[1] % fp8.BLOCK == 0 and x_MK.dtype in (jnp.bfloat16, jnp.float16, jnp.float32))


def _kernel(x_ref, q_ref, scale_ref, *, num_rows: int, block_m: int):
    # Triton reads and writes a block whole: the last row block's rows past the array are masked by hand
    valid_B = pl.program_id(1) * block_m + jnp.arange(block_m) < num_rows
    x_BK = plt.load(x_ref, mask=valid_B[:, None], other=0).astype(jnp.float32)
    scale_B = jnp.maximum(jnp.max(jnp.abs(x_BK), axis=1), fp8.TINY) / fp8.E4M3_MAX
    plt.store(q_ref, (x_BK / scale_B[:, None]).astype(fp8.E4M3), mask=valid_B[:, None])
    plt.store(scale_ref, scale_B, mask=valid_B)


@functools.partial(jax.jit, static_argnames=("block_m", "num_warps", "interpret"))
def quantize_rows_kernel(x_MK: jax.Array, *, block_m: int = BLOCK_M, num_warps: int = NUM_WARPS,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(e4m3 [M, K], fp32 scales [K/128, M]) as `fp8.quantize_rows`, in one pass (see the module docstring)."""
    m, k = x_MK.shape
    if k % fp8.BLOCK:
        raise ValueError(f"quantize_rows_kernel: K={k} must be a multiple of {fp8.BLOCK} (the activation group)")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"quantize_rows_kernel: block_m must be a power of two (a Triton block), got {block_m}")
    groups = k // fp8.BLOCK
    return pl.pallas_call(
        functools.partial(_kernel, num_rows=m, block_m=block_m),
        grid=(groups, pl.cdiv(m, block_m)),
        in_specs=[pl.BlockSpec((block_m, fp8.BLOCK), lambda j, i: (i, j))],
        out_specs=[pl.BlockSpec((block_m, fp8.BLOCK), lambda j, i: (i, j)),
                   pl.BlockSpec((None, block_m), lambda j, i: (j, i))],
        out_shape=[jax.ShapeDtypeStruct((m, k), fp8.E4M3), jax.ShapeDtypeStruct((groups, m), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="quantize_rows_fp8",
    )(x_MK)


def quantize_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`fp8.quantize_rows`, on the one-pass kernel where `on_kernel`."""
    return quantize_rows_kernel(x_MK) if on_kernel(x_MK) else fp8.quantize_rows(x_MK)
