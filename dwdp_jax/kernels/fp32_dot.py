"""An fp32 product of bf16 activations with an fp32 weight on bf16 tensor cores: the weight split into three bf16
parts whose sum is the weight exactly (8 significand bits each, fp32's 24 between them), the activations exact in
bf16, so every partial product is exact in fp32 and only the sums round: the tensor cores accumulate in fp32, in
their own order and rounding, as two fp32 GEMM libraries differ in theirs. One bf16 GEMM over the parts side by
side, then their sum. A bf16 weight (DeepSeek-R1's checkpoint stores the gate in bf16) is its own only part: one
pass, the same exact products and fp32 sums, where splitting it would multiply two parts of zeros.

MoE routers use it: DeepSeek-V3's HF gate runs in fp32, which a GPU computes on its CUDA cores (67 TFLOP/s peak on
an H100 SXM: at least 1.8 ms for R1's router at 32768 tokens, 1.2e11 FLOPs) or, JAX's default there, in TF32
(10-bit inputs, which can flip near-tie expert choices); three bf16 passes run at the tensor cores' rate (989
TFLOP/s peak: 0.37 ms at least). On H100 the router stage of R1's layer at 32768 tokens took 1.12 ms this way
against 1.40 ms for TF32, which first copied x to fp32 (WORKSPACE 2026-12-06 a)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

PARTS = 3


def split_bf16(w: jax.Array) -> list[jax.Array]:
    """fp32 w as PARTS bf16 arrays whose fp32 sum is w exactly: zeros and magnitudes from 2^-102 up (below, the
    smallest part is an fp32 subnormal, which XLA flushes to zero; a router's weights are about 2^-7)."""
    parts, rest = [], w.astype(jnp.float32)
    for _ in range(PARTS):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return parts


def dot_f32(x_TD: jax.Array, w_DE: jax.Array) -> jax.Array:
    """x @ w in fp32 [T, E]: bf16 x with a bf16 w in one bf16 pass, with another w on the three-part split (see
    the module docstring), other dtypes as one fp32 dot at precision HIGHEST."""
    if x_TD.dtype != jnp.bfloat16:
        return jnp.dot(x_TD.astype(jnp.float32), w_DE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if w_DE.dtype == jnp.bfloat16:
        return jnp.dot(x_TD, w_DE, preferred_element_type=jnp.float32)
    e = w_DE.shape[1]
    out_TPE = jnp.dot(x_TD, jnp.concatenate(split_bf16(w_DE), axis=1),
                      preferred_element_type=jnp.float32).reshape(-1, PARTS, e)
    # the parts' products summed smallest first: the largest's rounding is the one that stays
    return (out_TPE[:, 2] + out_TPE[:, 1]) + out_TPE[:, 0]
