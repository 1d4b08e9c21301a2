"""The block configurations the GPU benchmarks sweep (`experiments.bench_grouped_gemm`, `bench_fp8_gemm`) and the
GPU tests run: the candidates of the split-weight kernels, Triton, Mosaic GPU and FP8. The kernels themselves use
their defaults or the cached winners (`kernels.tuning`), never this list."""

import dataclasses

from dwdp_jax.kernels import dense_fp8
from dwdp_jax.kernels.split_gemm import FP8_BLOCKS, Blocks
from dwdp_jax.kernels.split_gemm_fp8_mgpu import (BY_ROW_BLOCK_FP8_BLOCKS, DEFAULT_FP8_BLOCKS, FUSED_FP8_BLOCKS,
                                                  ONE_PARTIAL_FP8_BLOCKS, WG_COLS_FP8_BLOCKS,
                                                  WG_COLS_FUSED_FP8_BLOCKS)
from dwdp_jax.kernels.split_gemm_mgpu import CHAINED_R1, DEFAULT_MGPU_BLOCKS, FUSED_MGPU_BLOCKS, MgpuBlocks

# Launch orders: group_m 0 is column-block-major (every column block re-reads all
# rows: 45 GB of HBM traffic for gate/up at 131072 rows); windows of group_m row tiles read rows about once, and
# per_group windows never span two experts (group_m 0 with per_group: the whole expert). Per-expert windows won
# (+12-16%), so the sweep now explores around them: window width, pipeline depth and K tile.
_ORDERS = [dict(group_m=0), dict(group_m=16), dict(group_m=8, per_group=True), dict(group_m=16, per_group=True),
           dict(group_m=32, per_group=True), dict(per_group=True)]
_FULL_TILES = {
    True: [Blocks(**o) for o in _ORDERS] + [Blocks(num_stages=3, group_m=16, per_group=True),
                                           Blocks(block_k=32, num_stages=6, group_m=16, per_group=True)],
    False: [Blocks(block_n=256, **o) for o in _ORDERS] + [Blocks(block_n=256, num_stages=3, per_group=True),
                                                         Blocks(block_n=256, block_k=32, num_stages=6,
                                                                per_group=True)],
}
# and against the tile waste at group boundaries: half tiles (`Blocks.half_tiles`) on the per-expert
# orders that won at 131072 and 262144 rows, and 64-row tiles throughout (one warpgroup per tile)
CANDIDATES = {fused: blocks + [dataclasses.replace(b, half_tiles=True) for b in blocks
                               if b.per_group and b.group_m in (0, 16, 32) and b.block_k == 64]
              + [Blocks(block_m=64, block_n=128 if fused else 256, num_warps=4, per_group=True)]
              for fused, blocks in _FULL_TILES.items()}
# The Mosaic GPU kernel: its defaults, a CTA's tiles chained into one pipeline, the stage counts shared memory
# allows, one wgmma left in flight per k step, and full tiles stored through a swizzled view; then clusters
# of two CTAs sharing their x tile by TMA multicast (checked on a GPU only: Mosaic GPU's interpreter has no cluster
# barriers). Timed on an H200 and dropped: x fed to the fused
# kernel's wgmmas from registers (-9%) and 32-wide K tiles for down (chained or 6 stages, -3 to -17%). For down,
# the output staged in halves (`half_store`) frees the fourth stage, so it can run gate/up's winning pipeline (4
# stages, one wgmma in flight, clusters).
_DOWN_HALF_STORE = [MgpuBlocks(max_concurrent_steps=4, half_store=True, **kw)
                    for kw in (dict(), dict(delay_release=1), dict(cluster_n=True),
                               dict(delay_release=1, cluster_n=True))]
# Full tiles through the swizzled view with each projection's clustered winners: the plain view's stores are 8-way
# bank conflicted, and in the model's tile-aligned layout every tile is full (`--align`; H200: down's
# swizzled half store 559.1 TFLOP/s against 557.7 plain, the recorded winner).
_SWIZZLED_CLUSTERED = {
    True: [MgpuBlocks(tile_n=64, delay_release=1, cluster_n=True, swizzled_store=True)],
    False: [MgpuBlocks(max_concurrent_steps=3, cluster_n=True, swizzled_store=True)]
    + [MgpuBlocks(max_concurrent_steps=4, half_store=True, swizzled_store=True, cluster_n=True, delay_release=d)
       for d in (0, 1)]}
MGPU_CANDIDATES = {  # the first five also under --nosweep without cached blocks
    fused: [default, CHAINED_R1[fused], dataclasses.replace(default, delay_release=1),
            dataclasses.replace(CHAINED_R1[fused], swizzled_store=True),
            dataclasses.replace(default, delay_release=1, swizzled_store=True), stages,
            dataclasses.replace(default, cluster_n=True), dataclasses.replace(default, delay_release=1, cluster_n=True),
            dataclasses.replace(stages, cluster_n=True)] + ([] if fused else _DOWN_HALF_STORE)
    + _SWIZZLED_CLUSTERED[fused]
    for fused, default, stages in ((True, FUSED_MGPU_BLOCKS, MgpuBlocks(tile_n=64, max_concurrent_steps=3)),
                                   (False, DEFAULT_MGPU_BLOCKS, MgpuBlocks(max_concurrent_steps=2)))
}
# What experiments.bench_fp8_gemm sweeps (and the GPU tests check): per-expert launch windows (the bf16 kernel's
# winning order), pipeline depth, half tiles and 64-row tiles around FP8_BLOCKS.
FP8_CANDIDATES = (FP8_BLOCKS, Blocks(block_k=128, num_stages=4, group_m=16, per_group=True),
                  Blocks(block_k=128, num_stages=3, per_group=True), Blocks(block_k=128, num_stages=4, per_group=True),
                  Blocks(block_k=64, num_stages=5, group_m=16, per_group=True),
                  Blocks(block_k=128, num_stages=3, group_m=16, per_group=True, half_tiles=True),
                  Blocks(block_m=64, block_k=128, num_warps=4, num_stages=4, per_group=True))
# The Mosaic GPU FP8 kernel (`split_gemm_fp8_mgpu`; the first, its default, also under --nosweep without cached
# blocks): fused, one partial at a time at 128 columns of gate and of up; down, the column halves at 4 stages storing
# a 64-row block at a time; then the column halves at both depths shared memory holds with the tile stored at once;
# the row split's chained per-group windows, its tiles one pipeline each in row-tile order and per group, per group
# with the most stages (33 KiB each beside the output buffer), and in clusters of two CTAs sharing their x tile;
# fused, also one partial at a time with each x fragment read once into registers for both weights, that on the
# column halves and the row halves, a warpgroup per weight at 128 columns (2 stages beside the 64 KiB swap buffer
# and the output); down, the default's store through the swizzled view; both, the column halves in clusters of two
# (unchained: a third less L2 traffic per CTA and K step); the row halves' full tiles stored through a swizzled view;
# the default chained in clusters of two (down: also through the swizzled view), on one row tile with the x tile
# multicast (`cluster_n`) or on a pair of a group's row tiles with the weight tile multicast (`cluster_m`).
FP8_MGPU_CANDIDATES = {
    fused: [default, wide, dataclasses.replace(wide, max_concurrent_steps=other, chain=other in (2, 4)), narrow]
    + [dataclasses.replace(narrow, chain=False, **kw)
       for kw in (dict(per_group=False), dict(), dict(max_concurrent_steps=most), dict(cluster_n=True))]
    + ([dataclasses.replace(default, x_in_registers=True),
        dataclasses.replace(wide, x_in_registers=True), dataclasses.replace(narrow, x_in_registers=True),
        dataclasses.replace(narrow, tile_n=128, max_concurrent_steps=2, wg_weights=True),
        dataclasses.replace(wide, chain=False, cluster_n=True)] if fused
       else [dataclasses.replace(default, swizzled_store=True),
             dataclasses.replace(default, chain=False, cluster_n=True),
             dataclasses.replace(default, swizzled_store=True, cluster_n=True),
             dataclasses.replace(default, swizzled_store=True, cluster_m=True)])
    + [dataclasses.replace(narrow, swizzled_store=True), dataclasses.replace(default, cluster_n=True),
       dataclasses.replace(default, cluster_m=True)]
    for fused, default, wide, narrow, other, most in (
        (True, ONE_PARTIAL_FP8_BLOCKS, WG_COLS_FUSED_FP8_BLOCKS, FUSED_FP8_BLOCKS, 2, 6),
        (False, BY_ROW_BLOCK_FP8_BLOCKS, WG_COLS_FP8_BLOCKS, DEFAULT_FP8_BLOCKS, 3, 5))
}


def dense_fp8_candidates(k: int) -> list:
    """The block-scaled dense GEMM's (`dense_fp8`; `experiments.bench_fp8_dense --tune`): launch windows,
    unchained, row-tile order, full tiles stored through a swizzled view; the warpgroups on column halves
    (`Fp8Blocks.wg_cols`: 2 stages fit shared memory beside the whole tile's output; 4 with the output leaving a
    64-row block at a time, through the plain or the swizzled view: the short-K projections' outputs, kv_b's 2 GB at
    32768 rows, are most of their bytes), over the width padded to their 256-column tiles where it is not a multiple
    (`dense_fp8.computed_width`); the defaults and the latter two in clusters of two on adjacent row tiles, the
    weight tile multicast (`Fp8Blocks.cluster_m`)."""
    base = dense_fp8.default_blocks(k)
    cols = dense_fp8.chained_steps(dataclasses.replace(dense_fp8.DEFAULT_DENSE_BLOCKS, wg_cols=True,
                                                       max_concurrent_steps=2), k)
    by_block = dense_fp8.chained_steps(dataclasses.replace(dense_fp8.DEFAULT_DENSE_BLOCKS, wg_cols=True,
                                                           out_by_row_block=True), k)
    return [dataclasses.replace(base, group_m=g) for g in (8, 16, 32)] + [
        dataclasses.replace(base, chain=False), dataclasses.replace(base, group_m=0, per_group=False),
        dataclasses.replace(base, swizzled_store=True), dataclasses.replace(base, cluster_m=True),
        cols, by_block, dataclasses.replace(by_block, swizzled_store=True)] + [
        dataclasses.replace(by_block, cluster_m=True, swizzled_store=s) for s in (False, True)]


def swiglu_fp8_candidates(k: int) -> list:
    """The FP8 MLP's fused gate/up (`dense_fp8.swiglu_hidden`; `experiments.bench_fp8_dense --tune --mlp`): its
    defaults (one partial at a time at 128 columns of gate and of up) in windows of 8, 16 and 32 row tiles,
    unchained, column-block-major, with x's fragments read once into registers, in clusters of two sharing the x
    tile; the grouped kernel's other fused tilings (the column halves, 64 columns of each) in the defaults' windows."""
    base = dense_fp8.default_blocks(k, fused=True)
    return [dataclasses.replace(base, group_m=g) for g in (8, 16, 32)] + [
        dataclasses.replace(base, chain=False), dataclasses.replace(base, group_m=0, per_group=False),
        dataclasses.replace(base, x_in_registers=True), dataclasses.replace(base, cluster_n=True)] + [
        dense_fp8.chained_steps(dataclasses.replace(b, group_m=base.group_m), k)
        for b in (WG_COLS_FUSED_FP8_BLOCKS, FUSED_FP8_BLOCKS)]


def swept(candidates, options: list[str]) -> list:
    """The candidates as a list, or with `options` the first and those with any of these fields set (ValueError
    naming an option that is not a field of the blocks)."""
    candidates = list(candidates)
    unknown = [o for o in options if not all(hasattr(b, o) for b in candidates)]
    if unknown:
        raise ValueError(f"with_option {unknown}: not fields of {type(candidates[0]).__name__}")
    if not options:
        return candidates
    return candidates[:1] + [b for b in candidates[1:] if any(getattr(b, o) for o in options)]
