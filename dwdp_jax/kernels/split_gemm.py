"""Split-weight grouped GEMM: one kernel over every expert group, the weights read from several slabs where they lie.

DWDP's MoE sees its experts as an ordered tuple of slabs (the local slab and the prefetched remote ones) that tile
the expert ids. The rows are sorted by global expert id, so a precomputed tile schedule can send every row tile to
the one slab and group that owns it: the kernel walks only the tiles that hold rows (no pass over the whole row
buffer per slab, no merge of weights), and each tile branches to its slab's weight operand.

The schedule is the megablox one: a row tile [128 b, 128 b + 128) cut at group boundaries, so a tile belongs to
exactly one group and at most cdiv(M, block_m) + G - 1 tiles exist. It is computed in XLA (cheap: O(G + tiles))
and read by the kernel as scalars; tiles past the real count exit at once.

The kernel is Pallas on Triton (wgmma on Hopper through Triton's pipeliner), chosen over Mosaic GPU because it
also runs in Pallas interpret mode, so its indexing is tested on CPU against `jax.lax.ragged_dot`. The gate and up
projections share one pass over the rows with two accumulators and the SwiGLU in the epilogue.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dwdp_jax.kernels import fp8, fp8_rows, tuning


def require_positive(blocks, names: tuple[str, ...]) -> None:
    """ValueError naming the first of `names` below 1 (tile sizes and launch knobs of a kernel's blocks)."""
    for name in names:
        if getattr(blocks, name) < 1:
            raise ValueError(f"{type(blocks).__name__}.{name} must be >= 1, got {getattr(blocks, name)}")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes and Triton launch knobs of one kernel instance."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 4
    # Launch order: windows of this many row tiles sweep every column block before the next window starts, so a
    # window's rows stay in L2 across the column blocks. 0 = one window of all row tiles (column-block-major: every
    # column block re-reads all rows: 45 GB of HBM traffic for gate/up at 131072 rows).
    group_m: int = 0
    # Windows never span two expert groups (group_m 0: a window is the whole group), so a window's tiles all read
    # the same weight column blocks.
    per_group: bool = False
    # A tile whose rows all lie in one half of its row block computes that half only (block_m / 2 rows): group
    # boundaries cut tiles, and at 131072 skewed rows over 256 groups full tiles compute 1.24x the real rows, half
    # tiles 1.12x (gpu_bench.skewed_group_sizes).
    half_tiles: bool = False

    def __post_init__(self):
        require_positive(self, ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
        if self.group_m < 0:
            raise ValueError(f"Blocks.group_m must be >= 0 (0: one window of all row tiles), got {self.group_m}")
        if self.half_tiles and (self.block_m % 32):
            raise ValueError(f"Blocks.half_tiles needs block_m a multiple of 32 (Triton's dot takes >= 16 rows), "
                             f"got block_m={self.block_m}")


# Best of the sweeps on H200 (experiments.bench_grouped_gemm, 256 experts, 131072 skewed rows):
# down projection K=2048 N=7168 497 TFLOP/s (column-block-major 443); fused gate/up K=7168 2x2048 490 (423).
DEFAULT_BLOCKS = Blocks(block_n=256, per_group=True)
FUSED_BLOCKS = Blocks(group_m=16, per_group=True)
# FP8: one K step per 128-wide scale block (e4m3's wgmma takes K 32 per instruction; 128 is 128 bytes per row, the
# widest swizzle), a 128-column tile per weight scale block.
FP8_BLOCKS = Blocks(block_k=128, num_stages=3, group_m=16, per_group=True)


def count_at_or_below(sorted_N: jax.Array, query_Q: jax.Array) -> jax.Array:
    """int32 [Q]: how many of sorted_N are <= each query (`jnp.searchsorted(..., side="right")`), every pair
    compared: a loop-free program (the default method is a while loop of log2(N) steps), cheap at the schedules'
    sizes (256 groups against at most a few hundred thousand rows)."""
    return jnp.searchsorted(sorted_N, query_Q, side="right", method="compare_all").astype(jnp.int32)


def tile_schedule(group_sizes_G: jax.Array, slab_counts: tuple[int, ...], block_m: int, num_rows: int,
                  group_m: int = 0, per_group: bool = False, pairs: bool = False) -> jax.Array:
    """int32 [8, T]: per row tile (slab, group within the slab, row block, first row, row stop), in row 5 the
    number of real tiles (rows [first, stop) of block b are rows 128 b + first .. of the sorted buffer), and in
    rows 6-7 the first tile and the size of the tile's launch window (`Blocks.group_m`, `Blocks.per_group`).

    Tiles are in group order; T = cdiv(num_rows, block_m) + G - 1 bounds their count. Empty groups get no tile.

    pairs: int32 [11, T] over pairs of a group's consecutive tiles (its first and second, third and fourth, ...),
    for two CTAs sharing one weight tile: rows 0-4 the first tile's, rows 8-10 the second's (row block, first row,
    row stop), which a group with an odd number of tiles leaves without rows in its last pair (its first tile's
    block, rows [0, 0)); rows 5-7 count and windows of pairs.
    """
    g = group_sizes_G.shape[0]
    if sum(slab_counts) != g:
        raise ValueError(f"slab_counts {slab_counts} must sum to the number of groups {g}")
    sizes = group_sizes_G.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_block = starts // block_m
    tiles = jnp.where(sizes > 0, (ends - 1) // block_m - first_block + 1, 0)
    tile_end = jnp.cumsum(tiles)
    num_tiles = -(-num_rows // block_m) + g - 1
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(count_at_or_below(tile_end, t), g - 1).astype(jnp.int32)
    block = first_block[group] + t - (tile_end - tiles)[group]
    lo = jnp.maximum(starts[group] - block * block_m, 0)
    hi = jnp.minimum(ends[group] - block * block_m, block_m)
    slab_starts = np.cumsum((0,) + tuple(slab_counts))[:-1]
    slab = count_at_or_below(jnp.asarray(slab_starts[1:], jnp.int32), group)
    in_slab = group - jnp.asarray(slab_starts, jnp.int32)[slab]
    if pairs:
        return _pair_schedule(group_sizes_G, tiles, tile_end, slab, in_slab, block, lo, hi, num_tiles, group_m,
                              per_group)
    count = jnp.full((num_tiles,), tile_end[-1], jnp.int32)
    first, size = _windows(t, tile_end - tiles, tiles, group, count, num_tiles, group_m, per_group)
    return jnp.stack([slab, in_slab, block, lo, hi, count, first, size]).astype(jnp.int32)


def _pair_schedule(group_sizes_G, tiles, tile_end, slab, in_slab, block, lo, hi, num_tiles: int, group_m: int,
                   per_group: bool) -> jax.Array:
    """`tile_schedule(..., pairs=True)` from the tiles' columns: pair p of group g holds its tiles 2j and 2j + 1."""
    g = group_sizes_G.shape[0]
    pairs = (tiles + 1) // 2
    pair_end = jnp.cumsum(pairs)
    p = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(count_at_or_below(pair_end, p), g - 1).astype(jnp.int32)
    j = p - (pair_end - pairs)[group]
    first_tile = jnp.minimum(tile_end[group] - tiles[group] + 2 * j, num_tiles - 1)
    has_second = 2 * j + 1 < tiles[group]
    second_tile = jnp.minimum(first_tile + 1, num_tiles - 1)
    count = jnp.full((num_tiles,), pair_end[-1], jnp.int32)
    first, size = _windows(p, pair_end - pairs, pairs, group, count, num_tiles, group_m, per_group)
    return jnp.stack([slab[first_tile], in_slab[first_tile], block[first_tile], lo[first_tile], hi[first_tile],
                      count, first, size,
                      jnp.where(has_second, block[second_tile], block[first_tile]),
                      jnp.where(has_second, lo[second_tile], 0), jnp.where(has_second, hi[second_tile], 0)]
                     ).astype(jnp.int32)


def _windows(t, group_first_tile, group_tiles, group, count, num_tiles: int, group_m: int, per_group: bool):
    """First tile and size of each tile's launch window: a partition of the tiles into contiguous runs."""
    if group_m == 0 and not per_group:
        return jnp.zeros_like(t), jnp.full_like(t, num_tiles)
    if not per_group:
        first = t // group_m * group_m
        return first, jnp.minimum(num_tiles - first, group_m)
    width = group_m or num_tiles
    start, tiles = group_first_tile[group], group_tiles[group]
    first = start + (t - start) // width * width
    size = jnp.minimum(start + tiles - first, width)
    dead = t >= count  # tiles past the real ones: one window, they exit at once
    return jnp.where(dead, count, first), jnp.where(dead, num_tiles - count, size)


# Triton addresses a weight array with int32 element offsets: an FP8 slab of all 256 R1 experts (3.76e9 elements per
# weight) read out of bounds on H200 (CUDA_ERROR_ILLEGAL_ADDRESS). Larger expert ranges are placed as several slabs
# (`max_slab_experts`), which the split kernels consume in one call anyway.
MAX_WEIGHT_ELEMENTS = 2**31 - 1


def max_slab_experts(hidden_size: int, moe_intermediate_size: int) -> int:
    """The most experts one slab may hold for the split kernels (`MAX_WEIGHT_ELEMENTS`)."""
    return MAX_WEIGHT_ELEMENTS // (hidden_size * moe_intermediate_size)


def slab_weights(x_MK: jax.Array, weights: tuple, fused: bool, kernel: str,
                 scaled: bool = False) -> tuple[tuple[tuple, ...], int]:
    """(per-slab weight tuples, N): the kernels' `weights` argument checked against x (every weight [G_s, K, N]
    in x's dtype; scaled: every weight an FP8 (values [G_s, N, K], scales [G_s, N/128, K/128]) pair of
    `fp8.quantize_weights`); ValueError names the slab."""
    slabs = tuple(tuple(ws) for ws in weights) if fused else tuple((w,) for w in weights)
    k = x_MK.shape[1]
    n = slabs[0][0][0].shape[1] if scaled else slabs[0][0].shape[2]
    for i, ws in enumerate(slabs):
        for w in ws:
            q = w[0] if scaled else w
            if (q.shape[1:] != ((n, k) if scaled else (k, n))) or q.dtype != x_MK.dtype:
                raise ValueError(f"{kernel}: slab {i} weight {q.shape} {q.dtype} does not match x {x_MK.shape} "
                                 f"{x_MK.dtype} and N={n}" + (" (FP8 weights are [G, N, K])" if scaled else ""))
            want = (q.shape[0], n // fp8.BLOCK, k // fp8.BLOCK)
            if scaled and (w[1].shape != want or w[1].dtype != jnp.float32):
                raise ValueError(f"{kernel}: slab {i} weight scales {w[1].shape} {w[1].dtype} must be float32 "
                                 f"{want} (one per {fp8.BLOCK} x {fp8.BLOCK} block)")
    return slabs, n


def _fit(block: int, dim: int, name: str) -> int:
    """The largest power-of-two tile <= block dividing dim (small models); Triton's dot needs at least 16."""
    while block >= 16 and dim % block:
        block //= 2
    if block < 16:
        raise ValueError(f"split_ragged_dot: {name}={dim} must be a multiple of 16")
    return block


def launch_order(pid, sched, num_col_blocks: int):
    """(row tile, column block) of program `pid`: the programs of a window [first, first + size) of row tiles
    (schedule rows 6-7) are pids [first, first + size) x num_col_blocks, row tiles fastest. pid // num_col_blocks
    always lies in pid's window, so every (tile, block) pair is visited exactly once."""
    q = pid // num_col_blocks
    first, size = sched[6, q], sched[7, q]
    r = pid - first * num_col_blocks
    return first + r % size, r // size


def _kernel(sched_ref, x_ref, *refs, num_slabs: int, fused: bool, b: Blocks, num_rows: int, k_dim: int,
            num_col_blocks: int, scaled: bool):
    """One (row tile, column block). Scaled (FP8): refs start with x's scales [K/128, M], and each weight is a
    (values, scales) pair; every K step's product is scaled by its rows' and its weight block's scales."""
    o_ref, refs = refs[-1], refs[:-1]
    if scaled:
        xs_ref, refs = refs[0], refs[1:]
    per_weight = 2 if scaled else 1
    per_slab = (2 if fused else 1) * per_weight
    ti, ni = launch_order(pl.program_id(0), sched_ref, num_col_blocks)

    @pl.when(ti < sched_ref[5, 0])
    def _():
        group, block, lo, hi = sched_ref[1, ti], sched_ref[2, ti], sched_ref[3, ti], sched_ref[4, ti]
        cols = pl.ds(pl.multiple_of(ni * b.block_n, b.block_n), b.block_n)

        def run(ws, rows: int, first):
            """Rows [first, first + rows) of the row block (first a multiple of rows) times the slab's weights."""
            row0 = pl.multiple_of(block * b.block_m + first, rows)
            rows_m = first + jnp.arange(rows, dtype=jnp.int32)
            in_bounds = block * b.block_m + rows_m < num_rows

            def step(kk, accs):
                ks = pl.ds(pl.multiple_of(kk * b.block_k, b.block_k), b.block_k)
                x = plt.load(x_ref.at[pl.ds(row0, rows), ks], mask=in_bounds[:, None], other=0.0)  # e4m3: no int cast
                if not scaled:
                    return tuple(acc + plt.dot(x, plt.load(w.at[group, ks, cols])) for acc, (w,) in zip(accs, ws))
                sk = kk * b.block_k // fp8.BLOCK
                xs = plt.load(xs_ref.at[sk, pl.ds(row0, rows)], mask=in_bounds, other=0)
                sn = ni * b.block_n // fp8.BLOCK
                # weights [G, N, K]: a K-contiguous tile, as e4m3 wgmma reads both operands
                return tuple(acc + plt.dot(x, plt.load(w.at[group, cols, ks]), trans_b=True)
                             * (xs[:, None] * s[group, sn, sk]) for acc, (w, s) in zip(accs, ws))

            zeros = tuple(jnp.zeros((rows, b.block_n), jnp.float32) for _ in ws)
            accs = jax.lax.fori_loop(0, k_dim // b.block_k, step, zeros)
            out = jax.nn.silu(accs[0]) * accs[1] if fused else accs[0]
            keep = ((rows_m >= lo) & (rows_m < hi))[:, None]
            plt.store(o_ref.at[pl.ds(row0, rows), cols], out.astype(o_ref.dtype), mask=keep)

        def tile(ws):
            if not b.half_tiles:
                return run(ws, b.block_m, 0)
            # integer arithmetic and comparisons only: Triton's lowering refuses boolean or/not (i32 vs i1)
            half = b.block_m // 2
            first = lo // half * half  # the half holding the tile's first row
            pl.when(hi <= first + half)(lambda: run(ws, half, first))
            pl.when(hi > first + half)(lambda: run(ws, b.block_m, 0))

        for s in range(num_slabs):
            slab = refs[per_slab * s: per_slab * (s + 1)]
            ws = tuple(slab[i: i + per_weight] for i in range(0, per_slab, per_weight))
            pl.when(sched_ref[0, ti] == s)(lambda ws=ws: tile(ws))


@functools.partial(jax.jit, static_argnames=("fused", "blocks", "interpret", "out_dtype"))
def split_ragged_dot(x_MK: jax.Array, group_sizes_G: jax.Array, weights: tuple, *, fused: bool = False,
                     blocks: Blocks | None = None, interpret: bool = False, x_scale_SM: jax.Array | None = None,
                     out_dtype=None) -> jax.Array:
    """x rows sorted by group times each group's weights, the groups spread over slabs.

    weights: one [G_s, K, N] array per slab (fused: a (gate, up) pair per slab, and the result is
    silu(x @ gate) * (x @ up)). blocks: None takes the tuned ones for this shape and card (`tuning`), else the
    defaults. group_sizes_G covers all slabs' groups in order. Rows past sum(group_sizes) are
    not written (garbage): callers mask them. bf16 in, fp32 accumulation, x's dtype out.

    FP8 (x_scale_SM given): x is e4m3 with `fp8.quantize_rows` scales [K/128, M], every weight an e4m3 (values
    [G_s, N, K], scales) pair of `fp8.quantize_weights`, the output `out_dtype` (default bf16); K and N multiples
    of 128, and the K and N tiles divide 128 (one scale per tile and K step).
    """
    scaled = x_scale_SM is not None
    slabs, n = slab_weights(x_MK, weights, fused, "split_ragged_dot", scaled)
    for i, ws in enumerate(slabs):
        q = ws[0][0] if scaled else ws[0]
        if q.size > MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"split_ragged_dot: slab {i} weight {q.shape} has {q.size} elements, more than the "
                             f"{MAX_WEIGHT_ELEMENTS} Triton addresses (int32 offsets); place its experts as slabs "
                             f"of at most {MAX_WEIGHT_ELEMENTS // (q.shape[1] * q.shape[2])} (max_slab_experts)")
    m, k = x_MK.shape
    kernel_name = "split_triton_fp8" if scaled else "split_triton"
    b = blocks or tuning.lookup(kernel_name, Blocks, jax.devices()[0].device_kind, k, n, fused, m) or (
        FP8_BLOCKS if scaled else FUSED_BLOCKS if fused else DEFAULT_BLOCKS)
    cap = fp8.BLOCK if scaled else max(k, n)  # the scaled K step and column block lie in one scale block
    b = dataclasses.replace(b, block_k=_fit(min(b.block_k, cap), k, "K"), block_n=_fit(min(b.block_n, cap), n, "N"))
    if scaled and (x_scale_SM.shape != (k // fp8.BLOCK, m) or x_scale_SM.dtype != jnp.float32):
        raise ValueError(f"split_ragged_dot: x_scale_SM {x_scale_SM.shape} {x_scale_SM.dtype} must be float32 "
                         f"{(k // fp8.BLOCK, m)} (fp8.quantize_rows)")
    sched = tile_schedule(group_sizes_G, tuple(len(ws[0][0] if scaled else ws[0]) for ws in slabs), b.block_m, m,
                          b.group_m, b.per_group)
    flat = tuple(a for ws in slabs for w in ws for a in (w if scaled else (w,)))
    num_tiles, num_col_blocks = sched.shape[1], n // b.block_n
    kernel = functools.partial(_kernel, num_slabs=len(slabs), fused=fused, b=b, num_rows=m, k_dim=k,
                               num_col_blocks=num_col_blocks, scaled=scaled)
    out_dtype = out_dtype or (jnp.bfloat16 if scaled else x_MK.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_tiles * num_col_blocks,),
        compiler_params=plt.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=interpret,
        name=("split_ragged_dot_fused" if fused else "split_ragged_dot") + ("_fp8" if scaled else ""),
    )(sched, x_MK, *((x_scale_SM,) if scaled else ()), *flat)


def split_grouped_ffn(x_MD: jax.Array, group_sizes_E: jax.Array, slabs, *, x_scale_SM: jax.Array | None = None,
                      out_dtype=None, interpret: bool = False, ragged_dot=split_ragged_dot,
                      fp8_ragged_dot=split_ragged_dot) -> jax.Array:
    """The SwiGLU expert FFN over all slabs at once: a fused gate/up kernel, then the down projection
    (`ragged_dot`: this module's Triton kernel or `split_gemm_mgpu`'s Mosaic GPU one).

    FP8 experts (each slab weight an e4m3 (values [E, out, in], scales) pair of `fp8.quantize_weights`) run
    `fp8_ragged_dot` (this module's scaled kernel, or `split_gemm_fp8_mgpu`'s; `split_ragged_dot`'s arguments with
    x_scale_SM), x and the SwiGLU output quantized per row and 128 columns on the way in (`fp8_rows`), as
    DeepSeek-V3's inference does; x may come quantized already (e4m3 with its scales `x_scale_SM`, as the MoE
    quantizes its tokens before they are copied into expert order). Rows past sum(group_sizes) come back zeroed
    (the backend contract), in `out_dtype` (default: x's dtype)."""
    gate_up = tuple((s.w_gate_EDF, s.w_up_EDF) for s in slabs)
    down = tuple(s.w_down_EFD for s in slabs)
    fp8_experts = isinstance(down[0], tuple)
    if x_scale_SM is not None and not fp8_experts:
        raise ValueError("split_grouped_ffn: x_scale_SM (quantized rows) given for bf16 experts; FP8 experts only")
    out_dtype = out_dtype or x_MD.dtype
    if fp8_experts:
        x_q, x_scale = (x_MD, x_scale_SM) if x_scale_SM is not None else fp8_rows.quantize_rows(x_MD)
        h_MF = fp8_ragged_dot(x_q, group_sizes_E, gate_up, fused=True, x_scale_SM=x_scale, interpret=interpret,
                              out_dtype=out_dtype)
        h_q, h_scale = fp8_rows.quantize_rows(h_MF)
        y_MD = fp8_ragged_dot(h_q, group_sizes_E, down, x_scale_SM=h_scale, interpret=interpret,
                              out_dtype=out_dtype)
    else:
        h_MF = ragged_dot(x_MD, group_sizes_E, gate_up, fused=True, interpret=interpret)
        y_MD = ragged_dot(h_MF, group_sizes_E, down, interpret=interpret)
    valid_M1 = (jnp.arange(x_MD.shape[0]) < group_sizes_E.sum())[:, None]
    return jnp.where(valid_M1, y_MD, 0).astype(out_dtype)
