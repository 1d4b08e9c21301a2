"""The Hopper grouped GEMMs behind the GPU backends of `grouped_gemm`: Mosaic GPU's ragged GEMM, and the split
kernels (Pallas Triton and Mosaic GPU, bf16 and block-scaled FP8) with the faster of the two chosen per projection
from the tuning cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dwdp_jax.kernels import split_gemm, split_gemm_fp8_mgpu, split_gemm_mgpu, tuning

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


SPLIT_KERNELS = {"split_triton": split_gemm.split_ragged_dot, "split_mgpu": split_gemm_mgpu.split_ragged_dot_mgpu}


def fastest_split_kernel(k: int, n: int, fused: bool, rows: int) -> str:
    """Whichever split kernel (Triton or Mosaic GPU) timed faster at its tuned blocks for this problem and card
    (`tuning.fastest`), the Triton one without entries: neither wins both projections (H200,
    experiments.bench_grouped_gemm: Mosaic GPU's clustered kernel for gate/up, Triton's half tiles for down)."""
    return tuning.fastest(tuple(SPLIT_KERNELS), jax.devices()[0].device_kind, k, n, fused, rows) or "split_triton"


def fastest_split_ragged_dot(x_MK, group_sizes_G, weights, *, fused: bool = False, interpret: bool = False):
    """`split_gemm.split_ragged_dot` on the faster kernel of this projection (`fastest_split_kernel`)."""
    _, n = split_gemm.slab_weights(x_MK, weights, fused, "fastest_split_ragged_dot")
    m, k = x_MK.shape
    kernel = SPLIT_KERNELS[fastest_split_kernel(k, n, fused, m)]
    return kernel(x_MK, group_sizes_G, weights, fused=fused, interpret=interpret)


FP8_SPLIT_KERNELS = {"split_triton_fp8": split_gemm.split_ragged_dot,
                     split_gemm_fp8_mgpu.NAME_TUNED: split_gemm_fp8_mgpu.split_ragged_dot_fp8_mgpu}


def fastest_fp8_split_kernel(k: int, n: int, fused: bool, rows: int) -> str:
    """Whichever FP8 split kernel timed faster at its tuned blocks for this problem and card (`tuning.fastest`),
    the Mosaic GPU one without entries (experiments.bench_fp8_gemm times both)."""
    return tuning.fastest(tuple(FP8_SPLIT_KERNELS), jax.devices()[0].device_kind, k, n, fused, rows) or (
        split_gemm_fp8_mgpu.NAME_TUNED)


def fastest_fp8_split_ragged_dot(x_MK, group_sizes_G, weights, *, x_scale_SM, fused: bool = False,
                                 interpret: bool = False, out_dtype=None):
    """`split_gemm.split_ragged_dot`'s FP8 path on the faster kernel of this projection (`fastest_fp8_split_kernel`)."""
    _, n = split_gemm.slab_weights(x_MK, weights, fused, "fastest_fp8_split_ragged_dot", scaled=True)
    m, k = x_MK.shape
    kernel = FP8_SPLIT_KERNELS[fastest_fp8_split_kernel(k, n, fused, m)]
    return kernel(x_MK, group_sizes_G, weights, x_scale_SM=x_scale_SM, fused=fused, interpret=interpret,
                  out_dtype=out_dtype)


# The split kernels' row tiles are 128 rows (every benchmarked block_m / tile_m but the 64-row Triton candidate):
# expert groups start on a tile (grouped_gemm.row_alignment).
SPLIT_ROW_ALIGN = 128
