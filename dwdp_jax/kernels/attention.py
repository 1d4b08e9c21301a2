"""Causal attention over a packed batch of variable-length sequences (MLA prefill core).

Tokens of many sequences share one flat axis T. `segment_ids_T` names each token's sequence (-1 for padding)
and `positions_T` its position inside it: token q attends to token k iff both are in the same sequence and
pos[k] <= pos[q]. Padding rows attend nowhere; they get finite garbage that callers discard.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Attention = Callable[..., jax.Array]

# Static bound on sequences per packed batch for kernels with segment tables (cuDNN); callers check batch sizes.
MAX_SEGMENTS = 64


def packed_causal_mask(segment_ids_T: jax.Array, positions_T: jax.Array) -> jax.Array:
    same_seq_TS = (segment_ids_T[:, None] == segment_ids_T[None, :]) & (segment_ids_T[None, :] >= 0)
    return same_seq_TS & (positions_T[None, :] <= positions_T[:, None])


def xla_attention(q_THK: jax.Array, k_THK: jax.Array, v_THV: jax.Array, segment_ids_T: jax.Array,
                  positions_T: jax.Array, *, scale: float) -> jax.Array:
    """Plain einsum attention with the softmax in fp32 (as every DeepSeek reference does)."""
    scores_HTS = jnp.einsum("thk,shk->hts", q_THK, k_THK, preferred_element_type=jnp.float32) * scale
    mask_TS = packed_causal_mask(segment_ids_T, positions_T)
    scores_HTS = jnp.where(mask_TS[None], scores_HTS, jnp.finfo(jnp.float32).min)
    probs_HTS = jax.nn.softmax(scores_HTS, axis=-1).astype(v_THV.dtype)
    return jnp.einsum("hts,shv->thv", probs_HTS, v_THV)


_BACKENDS: dict[str, Attention] = {"xla": xla_attention}


def register_backend(name: str, fn: Attention) -> None:
    _BACKENDS[name] = fn


_GPU_BACKENDS = {"cudnn", "cudnn_mla_1seq"}


def get_backend(name: str) -> Attention:
    if name not in _BACKENDS and name in _GPU_BACKENDS:
        import dwdp_jax.kernels.gpu  # noqa: F401 (importing it registers the GPU backends)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
