"""RMSNorm, and RMSNorm fused with the FP8 row quantization of its output (`fp8.quantize_rows`' 1 x 128 groups).

Where an FP8 projection takes a norm's output (MLA's q_a + kv_a after the input norm), the unfused path writes the
normed rows in bf16 and the quantization reads them back: at R1's width and 32768 tokens, 470 MB each way beside
the 470 MB the norm reads and the 235 MB of e4m3 the quantization writes. The kernel (Pallas Triton, GPUs with FP8
conversion) holds a row in registers, reads it once and writes only its e4m3 values and scales: 705 MB for the
unfused path's 1645.

The arithmetic is `rms_norm`'s (HuggingFace DeepseekV3's: normalized in fp32, rounded to the input dtype, times the
weight in that dtype, rounded again) followed by `fp8.quantize_rows`'. XLA may keep such an intermediate at fp32
(`--xla_allow_excess_precision`, on by default), as it does in Pallas' interpreter, where the kernel's e4m3 values
then differ from the unfused path's by one e4m3 step in about 2% of elements: within the quantization's own error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dwdp_jax.kernels import fp8, fp8_rows

# Triton warps per program (one row: R1's 7168 columns in chunks of 32, 16 and 8 groups of 128).
NUM_WARPS = 4


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """weight * (x / rms(x)) as HuggingFace DeepseekV3RMSNorm: normalized in fp32, cast back to x's dtype before
    the weight multiply."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def chunks(groups: int) -> list[tuple[int, int]]:
    """(first group, groups) of a row's 128-wide groups in power-of-two runs, largest first (Triton's blocks)."""
    out, start = [], 0
    for bit in reversed(range(groups.bit_length())):
        if groups >> bit & 1:
            out.append((start, 1 << bit))
            start += 1 << bit
    return out


def _kernel(x_ref, w_ref, q_ref, scale_ref, *, groups: int, eps: float):
    # one row, held whole in registers: [G, 128] as power-of-two runs of groups
    runs = chunks(groups)
    x32_GK = [x_ref[pl.ds(a, n), :].astype(jnp.float32) for a, n in runs]
    inv = jax.lax.rsqrt(sum(jnp.sum(x * x) for x in x32_GK) / (groups * fp8.BLOCK) + eps)
    for (a, n), x in zip(runs, x32_GK):
        normed = (x * inv).astype(x_ref.dtype)
        y = (w_ref[pl.ds(a, n), :] * normed).astype(jnp.float32)
        scale_G = jnp.maximum(jnp.max(jnp.abs(y), axis=1), fp8.TINY) / fp8.E4M3_MAX
        q_ref[pl.ds(a, n), :] = (y / scale_G[:, None]).astype(fp8.E4M3)
        scale_ref[pl.ds(a, n)] = scale_G


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm_quantized_kernel(x_MK: jax.Array, weight_K: jax.Array, *, eps: float, num_warps: int = NUM_WARPS,
                              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`fp8.quantize_rows(rms_norm(x, weight, eps))`: (e4m3 [M, K], fp32 scales [K/128, M]) in one kernel."""
    m, k = x_MK.shape
    if k % fp8.BLOCK:
        raise ValueError(f"rms_norm_quantized_kernel: K={k} must be a multiple of {fp8.BLOCK} (the activation group)")
    if weight_K.shape != (k,) or weight_K.dtype != x_MK.dtype:
        raise ValueError(f"rms_norm_quantized_kernel: weight must be [{k}] of x's dtype {x_MK.dtype}, got "
                         f"{list(weight_K.shape)} {weight_K.dtype}")
    groups = k // fp8.BLOCK
    q_MGK, scale_GM = pl.pallas_call(
        functools.partial(_kernel, groups=groups, eps=eps),
        grid=(m,),
        in_specs=[pl.BlockSpec((None, groups, fp8.BLOCK), lambda i: (i, 0, 0)),
                  pl.BlockSpec((groups, fp8.BLOCK), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((None, groups, fp8.BLOCK), lambda i: (i, 0, 0)),
                   pl.BlockSpec((groups, None), lambda i: (0, i))],
        out_shape=[jax.ShapeDtypeStruct((m, groups, fp8.BLOCK), fp8.E4M3),
                   jax.ShapeDtypeStruct((groups, m), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_quantize_rows_fp8",
    )(x_MK.reshape(m, groups, fp8.BLOCK), weight_K.reshape(groups, fp8.BLOCK))
    return q_MGK.reshape(m, k), scale_GM


def rms_norm_quantized(x_MK: jax.Array, weight_K: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """`fp8.quantize_rows(rms_norm(x, weight, eps))`, on the fused kernel where `fp8_rows.on_kernel`."""
    if fp8_rows.on_kernel(x_MK):
        return rms_norm_quantized_kernel(x_MK, weight_K, eps=eps)
    return fp8.quantize_rows(rms_norm(x_MK, weight_K, eps))
