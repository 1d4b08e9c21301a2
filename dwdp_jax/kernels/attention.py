"""Causal attention over a packed batch of variable-length sequences (MLA prefill core).

Tokens of many sequences share one flat axis T. `segment_ids_T` names each token's sequence (-1 for padding)
and `positions_T` its position inside it: token q attends to token k iff both are in the same sequence and
pos[k] <= pos[q]. Padding rows attend nowhere; they get finite garbage that callers discard.

Backends by name (`get_backend`): `xla` everywhere, cuDNN's flash attention on GPU, and on Hopper tokamax's Mosaic
GPU flash attention (`attention_tokamax`), this project's in FlashAttention-3's schedule (`attention_mgpu`), and
`hopper`, whichever of the two timed faster (the GPU presets' default).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import attention_mgpu, attention_tokamax, tuning
from dwdp_jax.kernels.attention_mgpu import mgpu_attention
from dwdp_jax.kernels.attention_tokamax import tokamax_attention

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


def segments_of(segment_ids_T: jax.Array, max_segments: int):
    """Per-sequence lengths and start offsets of a packed batch ([1, S] and [1, S + 1], -1 where unused).

    Sequences are contiguous and numbered 0, 1, ... in order (packing.pack), padding (-1) sits at the end.
    """
    ids_T = jnp.where(segment_ids_T >= 0, segment_ids_T, max_segments)  # padding counts nowhere
    lengths_S = jnp.zeros((max_segments,), jnp.int32).at[ids_T].add(1, mode="drop")
    offsets_S1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(lengths_S)])
    num_used = (lengths_S > 0).sum()
    lengths_S = jnp.where(jnp.arange(max_segments) < num_used, lengths_S, -1)
    offsets_S1 = jnp.where(jnp.arange(max_segments + 1) <= num_used, offsets_S1, -1)
    return lengths_S[None], offsets_S1[None]


def cudnn_attention(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale: float,
                    max_segments: int = MAX_SEGMENTS):
    """Causal flash attention over the packed sequences with cuDNN (q/k 192 and v 128 natively: MLA).

    Uses the private cuDNN entry point, the only one taking a V head size different from Q/K and packed segments
    (q_offsets). Padding rows come back zeroed. GPU only; imported when traced, so CPU runs never load cuDNN.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    del positions_T  # packed segments carry the positions: every sequence starts at 0
    lengths, offsets = segments_of(segment_ids_T, max_segments)
    out_1THV = dot_product_attention(q_THK[None], k_THK[None], v_THV[None], q_seqlen=lengths, kv_seqlen=lengths,
                                     q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                     mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jnp.where((segment_ids_T >= 0)[:, None, None], out_1THV[0], 0).astype(v_THV.dtype)


def cudnn_attention_padded_v(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale: float,
                             max_segments: int = MAX_SEGMENTS):
    """The public-API alternative: V zero-padded to the q/k head size (192), output sliced back to 128."""
    pad = q_THK.shape[-1] - v_THV.shape[-1]
    v_pad = jnp.pad(v_THV, ((0, 0), (0, 0), (0, pad)))
    return cudnn_attention(q_THK, k_THK, v_pad, segment_ids_T, positions_T, scale=scale,
                           max_segments=max_segments)[..., :v_THV.shape[-1]]


# The Hopper kernels by their names in the block cache, where `bench_attention --tune` records each one's rate.
HOPPER_KERNELS: dict[str, Attention] = {attention_mgpu.KERNEL: mgpu_attention,
                                         attention_tokamax.KERNEL: tokamax_attention}


def fastest_hopper_kernel(tokens: int, qk_dim: int, v_dim: int, device_kind: str) -> str:
    """Of the Hopper kernels, the one whose cached rate at these head widths (the entry nearest in tokens) is the
    higher; tokamax's unless both have entries (a lone mgpu rate was timed against nothing), or where the widths are
    not `attention_mgpu`'s."""
    try:
        attention_mgpu.check_head_dims(qk_dim, v_dim)
    except ValueError:
        return attention_tokamax.KERNEL
    if tuning.fastest((attention_tokamax.KERNEL,), device_kind, qk_dim, v_dim, False, tokens) is None:
        return attention_tokamax.KERNEL
    return tuning.fastest(tuple(HOPPER_KERNELS), device_kind, qk_dim, v_dim, False, tokens)


def hopper_attention(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale: float,
                     device: jax.Device | None = None) -> jax.Array:
    """Causal attention within each packed sequence on the faster Hopper kernel (`fastest_hopper_kernel`)."""
    device = device or jax.devices()[0]
    name = fastest_hopper_kernel(q_THK.shape[0], q_THK.shape[2], v_THV.shape[2], device.device_kind)
    return HOPPER_KERNELS[name](q_THK, k_THK, v_THV, segment_ids_T, positions_T, scale=scale, device=device)


_BACKENDS: dict[str, Attention] = {
    "xla": xla_attention,
    # jax 0.11.2's packed-segment path scales the V offsets by the Q/K head size (192), so MLA's 128-wide V reads
    # the wrong rows (NaN, measured on H200) once a batch holds several sequences: the packed backend pads V to 192.
    "cudnn": cudnn_attention_padded_v,
    # Native 192/128 MLA, correct for one sequence per batch only (no offsets): the kernel-speed comparison.
    "cudnn_mla_1seq": functools.partial(cudnn_attention, max_segments=1),
    # Hopper only: native 192/128 over packed sequences, no segment table (tokamax's Mosaic GPU flash attention).
    "tokamax": tokamax_attention,
    # The same, rescaling the accumulator at every change of a row's maximum: what the lazy rescaling gains.
    "tokamax_eager_rescale": functools.partial(tokamax_attention, rescale_threshold=1.0),
    # Causal over the whole axis, correct for one sequence per batch only: what the packed key range costs.
    "tokamax_1seq": functools.partial(tokamax_attention, packed=False),
    # Hopper only: native 192/128 over packed sequences with FlashAttention-3's overlap within each warpgroup.
    "mgpu": mgpu_attention,
    # Hopper only: whichever of mgpu and tokamax timed faster at these widths on this card (tokamax without entries).
    "hopper": hopper_attention,
}


def register_backend(name: str, fn: Attention) -> None:
    _BACKENDS[name] = fn


def get_backend(name: str) -> Attention:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
