"""The XLA grouped dot of the reference paths: one plain dot per expert group, the same rounding whatever G."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_dot(a_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array,
                precision: jax.lax.Precision | None = None) -> jax.Array:
    """`jax.lax.ragged_dot(a, w, group_sizes)` in fp32 (rows past sum(group_sizes_G) zero), as one [M, K] x [K, N]
    dot per group, each row keeping its own group's: a row's value is its K-long dot with its expert alone, whatever
    the number of groups G. Not `ragged_dot` itself: off TPU (jax 0.10.2) that is one dot over the rows masked per
    group, contracting over G*K with the groups interleaved, and XLA:CPU sums that contraction in an order that
    depends on G (AVX512-BF16/AMX), so DEP's slabs of E/N experts rounded their rows unlike the reference's slab of
    E. The same FLOPs as that expansion, an [M, N] fp32 buffer instead of the [G, M, K] masked copy of `a`."""
    m = a_MK.shape[0]
    group_M = jnp.searchsorted(jnp.cumsum(group_sizes_G), jnp.arange(m, dtype=group_sizes_G.dtype), side="right")

    def one_group(g, y_MN):
        return jnp.where((group_M == g)[:, None], jnp.dot(a_MK, w_GKN[g], preferred_element_type=jnp.float32,
                                                           precision=precision), y_MN)

    return jax.lax.fori_loop(0, w_GKN.shape[0], one_group, jnp.zeros((m, w_GKN.shape[2]), jnp.float32))
