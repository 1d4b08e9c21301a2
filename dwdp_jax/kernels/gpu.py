"""GPU backends, registered by name on import: the Hopper Pallas grouped GEMMs and cuDNN MLA attention.

Imported lazily by the backend registries (`grouped_gemm.get_backend("pallas_mgpu")`, `attention.get_backend(
"cudnn")`), so CPU runs never touch Mosaic GPU or cuDNN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import attention, grouped_gemm, split_gemm, split_gemm_mgpu, tuning
from dwdp_jax.kernels.attention import MAX_SEGMENTS

# Best of the configurations measured on H200 for K=7168/N=4096 (DESIGN.md GPU facts): 128x128x64.
MGPU_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mgpu_ragged_dot(x_MK, w_GKN, group_sizes_G):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(x_MK, w_GKN, group_sizes=group_sizes_G, **MGPU_BLOCKS)


def pallas_grouped_ffn(x_MD, group_sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD):
    """SwiGLU over expert groups with the Mosaic GPU ragged GEMM (bf16 in, fp32 accumulate, bf16 out).

    The kernel leaves rows past sum(group_sizes) unwritten, so they are zeroed to keep the backend contract.
    """
    valid_M1 = (jnp.arange(x_MD.shape[0]) < group_sizes_G.sum())[:, None]
    h_MF = jax.nn.silu(_mgpu_ragged_dot(x_MD, w_gate_GDF, group_sizes_G).astype(jnp.float32))
    h_MF = (h_MF * _mgpu_ragged_dot(x_MD, w_up_GDF, group_sizes_G).astype(jnp.float32)).astype(x_MD.dtype)
    return jnp.where(valid_M1, _mgpu_ragged_dot(h_MF, w_down_GFD, group_sizes_G), 0).astype(x_MD.dtype)


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
    (q_offsets). Padding rows come back zeroed.
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


SPLIT_KERNELS = {"split_triton": split_gemm.split_ragged_dot, "split_mgpu": split_gemm_mgpu.split_ragged_dot_mgpu}


def fastest_split_kernel(k: int, n: int, fused: bool, rows: int) -> str:
    """Whichever split kernel (Triton or Mosaic GPU) timed faster at its tuned blocks for this problem and card
    (`tuning.fastest`), the Triton one without entries: neither wins both projections (session 8, H200: Mosaic
    GPU's clustered kernel for gate/up, Triton's half tiles for down)."""
    return tuning.fastest(tuple(SPLIT_KERNELS), jax.devices()[0].device_kind, k, n, fused, rows) or "split_triton"


def fastest_split_ragged_dot(x_MK, group_sizes_G, weights, *, fused: bool = False, interpret: bool = False):
    """`split_gemm.split_ragged_dot` on the faster kernel of this projection (`fastest_split_kernel`)."""
    _, n = split_gemm.slab_weights(x_MK, weights, fused, "fastest_split_ragged_dot")
    m, k = x_MK.shape
    kernel = SPLIT_KERNELS[fastest_split_kernel(k, n, fused, m)]
    return kernel(x_MK, group_sizes_G, weights, fused=fused, interpret=interpret)


# The split kernels' row tiles are 128 rows (every benchmarked block_m / tile_m but the 64-row Triton candidate):
# expert groups start on a tile (grouped_gemm.row_alignment).
SPLIT_ROW_ALIGN = 128
grouped_gemm.register_backend("pallas_mgpu", pallas_grouped_ffn)
_fastest_ffn = functools.partial(split_gemm.split_grouped_ffn, ragged_dot=fastest_split_ragged_dot)
grouped_gemm.register_split_backend("pallas_split", _fastest_ffn, SPLIT_ROW_ALIGN)
# The ablation of the alignment: the same kernels over groups packed back to back (the layout before session 7).
grouped_gemm.register_split_backend("pallas_split_unaligned", _fastest_ffn)
# One kernel for both projections (the ablations of the choice): Triton (the default before session 8), and the
# same schedule on Mosaic GPU (TMA + warp-specialized wgmma).
grouped_gemm.register_split_backend("pallas_split_triton", split_gemm.split_grouped_ffn, SPLIT_ROW_ALIGN)
grouped_gemm.register_split_backend("pallas_split_mgpu", functools.partial(
    split_gemm.split_grouped_ffn, ragged_dot=split_gemm_mgpu.split_ragged_dot_mgpu), SPLIT_ROW_ALIGN)
# The same kernel in Pallas interpret mode: CPU tests of the split-weight path through the model.
grouped_gemm.register_split_backend("pallas_split_interpret",
                                    functools.partial(split_gemm.split_grouped_ffn, interpret=True), SPLIT_ROW_ALIGN)
# jax 0.11.2's packed-segment path scales the V offsets by the Q/K head size (192), so MLA's 128-wide V reads the
# wrong rows (NaN, measured on H200) once a batch holds several sequences: the packed backend pads V to 192.
attention.register_backend("cudnn", cudnn_attention_padded_v)
# Native 192/128 MLA, correct for one sequence per batch only (no offsets): the kernel-speed comparison.
attention.register_backend("cudnn_mla_1seq", functools.partial(cudnn_attention, max_segments=1))
