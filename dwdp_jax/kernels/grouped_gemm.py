"""Grouped (ragged) SwiGLU expert FFN backends.

Input rows are sorted by expert; `group_sizes_G[g]` rows belong to expert g of the slab, starting at row 0.
Rows past sum(group_sizes_G) produce zeros, which is what lets the split-weight MoE run one call per slab
on a shared sorted buffer. The XLA backend is one plain dot per group (`grouped_dot`): exact and portable, but G x
the FLOPs, so it is the CPU/reference backend only; the Hopper kernels (`gpu`) plug in by name.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from dwdp_jax.kernels import fp8, gpu, split_gemm, split_gemm_fp8_mgpu, split_gemm_mgpu
from dwdp_jax.kernels.grouped_dot import grouped_dot

GroupedFFN = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def xla_grouped_ffn(x_MD: jax.Array, group_sizes_G: jax.Array, w_gate_GDF: jax.Array, w_up_GDF: jax.Array,
                    w_down_GFD: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) per expert group, accumulated in fp32, returned in x's dtype. FP8 experts
    (`fp8.BlockScaled` weights) take the exact reference of the scaled kernels (`fp8.reference_ffn`)."""
    if isinstance(w_gate_GDF, fp8.BlockScaled):
        return fp8.reference_ffn(x_MD, group_sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD)
    gate_MF = grouped_dot(x_MD, w_gate_GDF, group_sizes_G)
    up_MF = grouped_dot(x_MD, w_up_GDF, group_sizes_G)
    h_MF = (jax.nn.silu(gate_MF) * up_MF).astype(x_MD.dtype)
    return grouped_dot(h_MF, w_down_GFD, group_sizes_G).astype(x_MD.dtype)


_BACKENDS: dict[str, GroupedFFN] = {"xla": xla_grouped_ffn, "pallas_mgpu": gpu.pallas_grouped_ffn}
# Per-slab backends with an FP8 path (every split backend has one: split_gemm.split_grouped_ffn's fp8_ragged_dot)
_FP8_BACKENDS = {"xla"}

_fastest_ffn = functools.partial(split_gemm.split_grouped_ffn, ragged_dot=gpu.fastest_split_ragged_dot,
                                 fp8_ragged_dot=gpu.fastest_fp8_split_ragged_dot)
_TILED = gpu.SPLIT_ROW_ALIGN
# Backends that take every slab at once: name -> (fn(x_MD, group_sizes_E, slabs) -> y_MD, row alignment). One
# kernel, weights unmerged; a kernel that computes whole row tiles wants each group's rows to start at a multiple
# of its alignment (see `row_alignment`), the rest take 1.
_SPLIT_BACKENDS: dict[str, tuple[Callable, int]] = {
    "pallas_split": (_fastest_ffn, _TILED),
    # The ablation of the alignment: the same kernels over groups packed back to back.
    "pallas_split_unaligned": (_fastest_ffn, 1),
    # One kernel for both projections (the ablations of the choice): Triton (with FP8 experts its scaled path), and
    # the same schedule on Mosaic GPU (TMA + warp-specialized wgmma; FP8: block-scaled, DeepGEMM's promotion).
    "pallas_split_triton": (split_gemm.split_grouped_ffn, _TILED),
    "pallas_split_mgpu": (functools.partial(split_gemm.split_grouped_ffn,
                                            ragged_dot=split_gemm_mgpu.split_ragged_dot_mgpu,
                                            fp8_ragged_dot=split_gemm_fp8_mgpu.split_ragged_dot_fp8_mgpu), _TILED),
    # The same kernel in Pallas interpret mode: CPU tests of the split-weight path through the model.
    "pallas_split_interpret": (functools.partial(split_gemm.split_grouped_ffn, interpret=True), _TILED),
}


def register_backend(name: str, fn: GroupedFFN) -> None:
    _BACKENDS[name] = fn


def register_split_backend(name: str, fn: Callable, row_align: int = 1) -> None:
    _SPLIT_BACKENDS[name] = (fn, row_align)


def row_alignment(name: str) -> int:
    """Rows each expert group of the sorted buffer is padded to for this backend. A tiled kernel computes whole
    row tiles, and a tile that two groups share is computed once for each: at a DWDP rank's 236K rows over 256
    near-uniform experts that is about 14% more rows than real, against about 7% when every group starts on a
    tile (the padding rows are zeros and nobody reads their outputs)."""
    get_backend(name)
    return _SPLIT_BACKENDS[name][1] if name in _SPLIT_BACKENDS else 1


def get_backend(name: str) -> GroupedFFN | None:
    """The per-slab function of a backend, or None for a split backend (see `get_split_backend`)."""
    if name in _SPLIT_BACKENDS:
        return None
    if name not in _BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {name!r}; available: "
                         f"{sorted(set(_BACKENDS) | set(_SPLIT_BACKENDS))}")
    return _BACKENDS[name]


def check_fp8(name: str) -> None:
    """ValueError unless backend `name` computes with FP8 experts."""
    get_backend(name)
    if name not in _SPLIT_BACKENDS and name not in _FP8_BACKENDS:
        raise ValueError(f"grouped GEMM backend {name!r} has no FP8 path; FP8 experts run on "
                         f"{sorted(_FP8_BACKENDS | set(_SPLIT_BACKENDS))}")


def get_split_backend(name: str) -> Callable | None:
    get_backend(name)  # validates the name
    return _SPLIT_BACKENDS[name][0] if name in _SPLIT_BACKENDS else None
