"""Block-scaled FP8 split-weight grouped GEMM on Mosaic GPU (Hopper), DeepGEMM's way.

The FP8 experts (`fp8.BlockScaled`: e4m3 values [G, N, K], one fp32 scale per 128 x 128 block) ran through the
Triton split kernel's scaled path at 0.23 of the dense FP8 GEMM on H200: Triton scales every K step's product in
the loop that also feeds the tensor cores. This kernel is the structure of DeepSeek's DeepGEMM on the schedule of
the bf16 Mosaic GPU split kernel (`split_gemm_mgpu`): a memory warpgroup streams, with TMA, the x tile
(fp8 [tile_m, 128]), the slab's weight block (fp8 [tile_n, 128]; fused: the gate's and the up's) and the tile's
row scales (fp32 [tile_m] of x's [K/128, M]) into shared memory, both fp8 operands K-major as e4m3 wgmma needs
them (the checkpoint's [out, in] layout is K-major already).

Two compute warpgroups each own half of the tile's rows (the fused default, one weight's partial at a time), or with
`Fp8Blocks.wg_cols` (down's default at R1's widths) half of its columns, all rows, as 64-row blocks, or fused with
`Fp8Blocks.wg_weights` one weight each (gate, up), all rows, swapping half of them through shared memory for the
SwiGLU. Per 128-wide K block (one scale block), a warpgroup's wgmma (per row block) fills a fresh fp32 accumulator,
and it then promotes it into its running sum in registers, sum += partial * x_scale[row] * w_scale[n block, k
block]: the fp32 promotion DeepGEMM found necessary because the tensor cores' fp8 accumulation keeps about 14
mantissa bits. While one warpgroup promotes on the CUDA cores, the other's wgmma runs on the tensor cores. tile_n <=
128 dividing 128 keeps one weight scale per warpgroup and K block, read by each warpgroup straight from global
memory a K block ahead (one scalar per K block: TMA moves nothing under 16 bytes).

The registers bound the tile: per warpgroup thread, a running fp32 sum per weight over its rows and a partial of
one row block (`Fp8Blocks.acc_registers`). The output is bf16; fused: silu(gate) * up in the epilogue, as the bf16
kernel. Rows past sum(group_sizes) are not written.

Tested on CPU in Mosaic GPU interpret mode against the fp32 product of the same quantized operands, and lowered
for CUDA there; on H200 the compiled kernel matches that product within 2e-3 (bf16 output) at R1's K and N. Its
speed is measured by `experiments.bench_fp8_gemm` beside the dense FP8 GEMM. On H200, 262144 rows over 256 groups
(skew 1.5, aligned to 128 rows) in two slabs, rounds against the same run's cuBLAS FP8 GEMM (one scale per tensor):
down 937 TFLOP/s, 0.734 of it, and fused gate/up 945, 0.649, with the warpgroups on column halves (the row split
with the scales loaded in their own step: 871 and 815, 0.671 and 0.546; the Triton path ran 293). On H100 the
defaults chosen from the sweep since (`default_blocks`) reach 0.738 (down) and 0.743 (gate/up) there, 0.685 and
0.680 at 131072 rows, skew 6. The same kernel as a dense GEMM (`dense_fp8`) reaches 0.80-0.88 of cuBLAS at R1's
long-K projections. Nsight Compute on the row split (down, the serving shape): the tensor pipe 63% busy with L2 at
69% of its throughput, where cuBLAS's 192 x 192 tiles in clusters of two run it 95% busy at 52%: the 128 x 128 tile
reads twice the bytes per FLOP from L2. Promoting a K block while the same warpgroup's next wgmma runs (a third more
accumulator registers) measured slower: 817 against 873 (down), 759 against 770 (gate/up). Chained tiles in clusters
of two CTAs sharing a tile by TMA multicast (`Fp8Blocks.cluster_n`: the x tile; `cluster_m`: the weight tile of a
pair of a group's row tiles) cut that L2 traffic by a sixth and a third, and ran 10-19% slower on H200: the two
chained pipelines wait on each other. Carrying the running sums through the wgmma's own accumulator instead
(rescaled to each K block's scales before its wgmma, no fresh partial: no zero fill, half the registers) ran 4-8%
faster on H100 but erred 3.0e-3 (q_a+kv_a) and 5.0e-3 (the shared expert's SwiGLU) against 1.7e-3 and 9e-4 promoted:
the tensor cores add every product into the large sum at their reduced precision, the loss the promotion exists to
avoid. Leaving the fresh partial unfilled and issuing its first wgmma with scale-d off (DeepGEMM's way; Mosaic GPU
zero-fills every accumulator and always accumulates, so it took a hook in Mosaic GPU's lowering) measured no gain on
H100 side by side in rounds: 1.007x timed and 0.987x per SM clock (gate/up), 0.994x in the sweep (down).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dwdp_jax.kernels import fp8, tuning
from dwdp_jax.kernels.split_gemm import launch_order, slab_weights, tile_schedule
from dwdp_jax.kernels.split_gemm_mgpu import PipelinedTiles, interpret_params, store_block

KSTEP = fp8.BLOCK  # one K step per scale block: 128 e4m3 bytes per row, the widest TMA swizzle
COMPUTE_WGS = 2
# Per compute-warpgroup thread, fp32 accumulator registers (partials and running sums) a tile may take: the
# warpgroup gets 232 of the 255 (the memory warpgroup keeps 40), the rest hold addresses, scales and the epilogue.
MAX_ACC_REGISTERS = 192
# A vector of one value per accumulator row, in the registers of the threads holding that row.
ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)
# The kernel addresses every operand through TMA descriptors over whole arrays: a tile's position is an int32
# coordinate per dimension, and the descriptor's strides must stay under 2^40 bytes. A slab of all 256 R1 experts
# (3.8e9 elements per weight, past the Triton kernel's int32 element offsets) is well within both.
MAX_TMA_COORD = 2**31 - 1
MAX_TMA_STRIDE_BYTES = 2**40
# Per Hopper SM and clock: dense e4m3 tensor-core FLOPs (1979 TFLOP/s over 132 SMs at 1.83 GHz) and shared-memory
# bytes, the two rates `Fp8Blocks.smem_ceiling` sets against each other.
FP8_FLOP_PER_CLOCK = 8192
SMEM_BYTES_PER_CLOCK = 128
NAME = "split_ragged_dot_fp8_mgpu"
NAME_TUNED = "split_mgpu_fp8"  # its entries in the block cache (`tuning`)


@dataclasses.dataclass(frozen=True)
class Fp8Blocks(PipelinedTiles):
    """Tile sizes: a CTA computes tile_m rows (tile_m / 2 per compute warpgroup) x tile_n columns of each weight;
    with wg_cols, tile_m rows x 2 tile_n columns (tile_n per compute warpgroup); 128 of K per stage (one scale
    block). Cluster_n: a quarter less traffic from L2 per CTA and K step. Swizzled_store: an epilogue cost a short
    K (kv_b: 4 K blocks a tile) does not amortize; one array per store, so with wg_cols it needs out_by_row_block."""

    # Launch order. Default: a row tile takes all column blocks before the next, so every row tile of a group
    # re-reads the group's weights (down: 14 MiB a group at R1's width, about 8 row tiles a group at 262144 rows).
    # per_group: windows of a group's row tiles (group_m of them, 0: all) sweep every column block with row tiles
    # fastest (`split_gemm.launch_order`), reading the weights once per window and re-reading its x rows instead
    # (down: 2 MiB a group). Windows stay within a group: the persistent loop visits the real tiles only, and a
    # window across the last one would reach past them.
    group_m: int = 0
    per_group: bool = False
    # The compute warpgroups split the CTA's columns instead of its rows: each takes all tile_m rows of its tile_n
    # columns as tile_m / 64 wgmma row blocks, promoting one while the other warpgroup's wgmma runs, so one fresh
    # partial serves a tile twice the area of the row split's (down at tile_m = tile_n = 128: 128 x 256, 48 KiB
    # from L2 per K step for 8.4 MFLOP against 32 KiB for 4.2). The row split's 128 x 128 tiles read twice the L2
    # bytes per FLOP of cuBLAS FP8's 192 x 192 tiles in clusters of two: on H200 (ncu, down at the serving shape)
    # its tensor pipe was 63% busy with L2 at 69% of its peak, cuBLAS's 95% at 52%.
    wg_cols: bool = False
    # Fused: one fresh partial at a time, the gate's wgmma promoted before the up's is issued, so that 128-column
    # tiles of both weights fit the registers (192 a thread at tile_m = tile_n = 128 on row halves): wgmmas of 128
    # columns, whose A operand (the x rows) is read from shared memory once per 128 columns instead of per 64.
    one_partial: bool = False
    # With wg_cols: the output leaves one 64-row block at a time through a 64-row buffer per warpgroup (each block's
    # store read out of shared memory before the next is written), which frees shared memory for pipeline stages:
    # down at 128 x 256 holds 4 stages of 48 KiB beside 32 KiB of output instead of 2 beside 64.
    out_by_row_block: bool = False
    # Fused: each 64-row block of x is read from shared memory once per K step, into registers, and both the gate's
    # and the up's wgmma take it from there; in shared memory each wgmma reads it again, which at 64 columns a
    # weight makes shared memory the bound (`smem_ceiling`). 16 more registers a thread (64 x 128 e4m3 over 128).
    x_in_registers: bool = False
    # Fused: the compute warpgroups split the weights: one computes the gate's tile_n columns, the other the up's,
    # each over all tile_m rows as 64-row blocks, the structure of down's column halves (wgmmas of tile_n columns,
    # each x row block read once per K step and warpgroup) where the fused column halves read it once per 64
    # columns of each weight (`smem_ceiling`: 0.889 of the FP8 peak at 128 x 128 against 0.727). The epilogue
    # swaps half of the rows through shared memory in fp32 (the gate's second half to the up's warpgroup, the up's
    # first half to the gate's), and each warpgroup stores silu(gate) * up of its half.
    wg_weights: bool = False
    # Clusters of two CTAs on two row tiles of one group and one column block, the weight tile loaded once for both
    # (TMA multicast): at 128 x 256 a third less L2 traffic per CTA and K step (x 16 KiB + half the weight's 32),
    # cuBLAS FP8's structure. A group's tiles go in pairs (`tile_schedule(pairs=True)`): a group of an odd number of
    # tiles leaves one CTA of its last pair computing without storing (half a tile a group on average). Clusters
    # (cluster_m, cluster_n) chain like single CTAs: both CTAs of a cluster walk the same tiles with the same K
    # steps, so their chained pipelines stay in phase. Mosaic GPU's interpreter (jax 0.10.2) allocates no cluster
    # barriers: clusters are lowered on CPU and run on GPU only (`pytest -m gpu` runs every swept candidate).
    cluster_m: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.group_m < 0 or (self.group_m and not self.per_group):
            raise ValueError(f"Fp8Blocks.group_m must be >= 0 and needs per_group (windows within a group), got "
                             f"group_m={self.group_m}, per_group={self.per_group}")
        if self.tile_m % (64 if self.wg_cols else 64 * COMPUTE_WGS):
            raise ValueError(f"Fp8Blocks.tile_m must be a multiple of {64 if self.wg_cols else 64 * COMPUTE_WGS} "
                             f"(64 wgmma rows per compute warpgroup{'' if self.wg_cols else ', 2 of them'}), got "
                             f"{self.tile_m}")
        if self.out_by_row_block and not self.wg_cols:
            raise ValueError("Fp8Blocks.out_by_row_block needs wg_cols (the row halves store one block already)")
        if self.swizzled_store and self.wg_cols and not self.out_by_row_block:
            raise ValueError("Fp8Blocks.swizzled_store with wg_cols needs out_by_row_block (one array per store)")
        if self.wg_weights and (self.wg_cols or self.one_partial or self.x_in_registers or self.swizzled_store):
            raise ValueError("Fp8Blocks.wg_weights takes none of wg_cols, one_partial, x_in_registers, "
                             "swizzled_store (a warpgroup computes one weight over all rows; halves are stored as "
                             "64-row blocks)")
        if self.cluster_m and self.cluster_n:
            raise ValueError("Fp8Blocks: cluster_m and cluster_n cannot be combined (clusters of two CTAs)")
        if self.cluster_m and self.num_sms % 2:
            raise ValueError(f"Fp8Blocks.cluster_m needs an even num_sms (clusters of 2), got {self.num_sms}")
        if KSTEP % self.tile_n or self.tile_n % 8:
            raise ValueError(f"Fp8Blocks.tile_n must divide {KSTEP} (one weight scale per tile and K block) and be "
                             f"a multiple of 8 (wgmma's N), got {self.tile_n}")

    @property
    def clustered(self) -> bool:
        return self.cluster_m or self.cluster_n

    @property
    def cta_n(self) -> int:
        """Columns of each weight a CTA computes."""
        return self.tile_n * (COMPUTE_WGS if self.wg_cols else 1)

    @property
    def wg_rows(self) -> int:
        """Rows of the tile a compute warpgroup computes: all of them on column halves, half on row halves."""
        return self.tile_m if self.wg_cols or self.wg_weights else self.tile_m // COMPUTE_WGS

    def wg_weight_count(self, fused: bool) -> int:
        """Weights a compute warpgroup multiplies: both when fused, unless wg_weights splits them."""
        return 1 if self.wg_weights or not fused else 2

    def smem_bytes_per_flop(self, fused: bool) -> float:
        """Shared-memory traffic of a CTA's K step over its FLOPs: the TMA writes of the x tile and the weight tiles,
        and the wgmma reads, where every 64-row wgmma reads its 64 x rows and all its weight columns (a 64-column
        wgmma reads 2 bytes per 64 FLOPs, a 128-column one 1.5)."""
        weights = 2 if fused else 1
        flops = 2 * self.tile_m * self.cta_n * weights * KSTEP
        writes = (self.tile_m + weights * self.cta_n) * KSTEP
        own = self.wg_weight_count(fused)
        x_reads = 1 if self.x_in_registers else own  # per 64-row block
        reads = COMPUTE_WGS * (self.wg_rows // 64) * KSTEP * (64 * x_reads + own * self.tile_n)
        return (writes + reads) / flops

    def smem_ceiling(self, fused: bool) -> float:
        """The fraction of the FP8 tensor peak shared memory lets these tiles reach (1.0: not the bound)."""
        return min(1.0, SMEM_BYTES_PER_CLOCK / (self.smem_bytes_per_flop(fused) * FP8_FLOP_PER_CLOCK))

    def acc_registers(self, fused: bool) -> int:
        """fp32 registers per compute-warpgroup thread of the partials and running sums: sums over the warpgroup's
        rows per weight, partials of one row block (all of its rows on row halves, 64 with wg_cols or wg_weights)
        per weight, or of one weight with one_partial."""
        weights = self.wg_weight_count(fused)
        partial_rows = 64 if self.wg_cols or self.wg_weights else self.wg_rows
        return (weights * self.wg_rows + (1 if self.one_partial else weights) * partial_rows) * self.tile_n // 128


# Chained per-group windows: on H200 (experiments.bench_fp8_gemm, down, 131072 rows over 256 groups, skew 6) 845
# TFLOP/s against 730 for a CTA's tiles one pipeline each in row-tile order, 740 per group unchained, 759 per group
# in clusters. 4 stages divide both projections' K steps (down 16, gate/up 56); the fused kernel's 64-column halves
# of gate and up make the same 128 weight rows per stage.
DEFAULT_FP8_BLOCKS = Fp8Blocks(chain=True, per_group=True)
FUSED_FP8_BLOCKS = Fp8Blocks(tile_n=64, chain=True, per_group=True)
# The warpgroups on column halves, where N takes 256-column CTA tiles: on H200 (262144 rows over 256 groups, skew
# 1.5, two slabs, side by side with cuBLAS FP8) down 936.9 TFLOP/s against 871.0 for the row split, fused gate/up
# 944.6 against 916.6 (both with the weight scales loaded a K block ahead; 814.5 before that). 2 stages fill shared
# memory beside down's 64 KiB output buffer; fused, 4 stages of 48 KiB fit beside its 32 KiB.
WG_COLS_FP8_BLOCKS = Fp8Blocks(max_concurrent_steps=2, chain=True, per_group=True, wg_cols=True)
WG_COLS_FUSED_FP8_BLOCKS = Fp8Blocks(tile_n=64, chain=True, per_group=True, wg_cols=True)
# The defaults, the fastest of each projection's sweep on H100 at both of issue 26's shapes (side by side, 3 rounds;
# WORKSPACE 2026-12-05 e): fused, the row halves at 128 columns of gate and of up, one partial at a time, 1046.3 and
# 937.0 TFLOP/s against the fused column halves' 970.3 and 879.4 (262144 rows at skew 1.5, 131072 at skew 6); down,
# the column halves at 4 stages storing a 64-row block at a time, 1016.7 and 857.3 against 2 stages' 973.3 and 789.3.
ONE_PARTIAL_FP8_BLOCKS = Fp8Blocks(tile_n=128, chain=True, per_group=True, one_partial=True)
BY_ROW_BLOCK_FP8_BLOCKS = Fp8Blocks(chain=True, per_group=True, wg_cols=True, out_by_row_block=True)


def default_blocks(k: int, n: int, fused: bool) -> Fp8Blocks:
    """The blocks without a tuned entry: fused, one partial at a time at 128 columns; down, the warpgroups on column
    halves where N takes their CTA tiles, else the row split; with the deepest chain dividing K's scale blocks."""
    if fused:
        return chained_steps(ONE_PARTIAL_FP8_BLOCKS, k)
    wide = BY_ROW_BLOCK_FP8_BLOCKS
    return chained_steps(wide if n % wide.cta_n == 0 else DEFAULT_FP8_BLOCKS, k)


def chained_steps(blocks: Fp8Blocks, k: int) -> Fp8Blocks:
    """`blocks` with the deepest pipeline of (its own, 2, 1) stages dividing K's scale blocks, as chaining needs
    (R1's K steps: down 16, gate/up 56; a narrow model's down projection may have 2)."""
    if not blocks.chain:
        return blocks
    steps = next(s for s in (blocks.max_concurrent_steps, 2, 1) if (k // KSTEP) % s == 0)
    return dataclasses.replace(blocks, max_concurrent_steps=steps)


def _kernel(sched_gmem, x_gmem, xs_gmem, *refs, num_slabs: int, fused: bool, b: Fp8Blocks, k_dim: int,
            n_dim: int, out_spread: tuple[int, int] | None, interpret: bool):
    """refs: per slab (values, scales) per weight (fused: gate then up), then the output."""
    # Register layouts are hints to Mosaic GPU's layout inference, which its interpreter does not take.
    layout = (lambda x, _: x) if interpret else plgpu.layout_cast
    w_gmems, out_gmem = refs[:-1], refs[-1]
    per_slab = 2 if fused else 1
    own = b.wg_weight_count(fused)  # running sums per row block
    wg_rows = b.wg_rows
    # the wgmma row blocks a warpgroup promotes one at a time: (first row within its rows, rows)
    row_blocks = [(r, 64) for r in range(0, wg_rows, 64)] if b.wg_cols or b.wg_weights else [(0, wg_rows)]
    n_iters, k_iters = n_dim // b.cta_n, k_dim // KSTEP
    swizzle = plgpu.find_swizzle(KSTEP * 8)  # e4m3: 128 bytes per K step
    transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    # K-major tiles of x and of each weight, and the tile's row scales of this K block
    in_specs = [plgpu.BlockSpec((b.tile_m, KSTEP), lambda k: (0, k), transforms=transforms,
                                memory_space=plgpu.SMEM, collective_axes=("cluster",) if b.cluster_n else ())]
    in_specs += [plgpu.BlockSpec((b.cta_n, KSTEP), lambda k: (0, k), transforms=transforms,
                                 memory_space=plgpu.SMEM, collective_axes=("cluster",) if b.cluster_m else ())
                 ] * per_slab
    in_specs += [plgpu.BlockSpec((1, b.tile_m), lambda k: (k, 0), memory_space=plgpu.SMEM)]

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS, max_concurrent_steps=b.max_concurrent_steps, compute_context=context,
            pipeline_state=state)

    ignore = lambda *_, **__: None  # noqa: E731 (allocations do not depend on the body)
    example = ((x_gmem.at[pl.ds(0, b.tile_m)],) + tuple(w.at[0, pl.ds(0, b.cta_n)] for w in w_gmems[:2 * per_slab:2])
               + (xs_gmem.at[:, pl.ds(0, b.tile_m)],))
    out_rows = 64 if b.out_by_row_block else b.tile_m // 2 if b.wg_weights else wg_rows
    # wg_weights: the half of the rows each warpgroup sends the other (fp32), and the rendezvous around the swap
    swap = dict(swap=(plgpu.SMEM((COMPUTE_WGS, b.tile_m // 2, b.tile_n), jnp.float32),
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS))) if b.wg_weights else {}
    plain = plgpu.SMEM((COMPUTE_WGS, out_rows, b.tile_n), out_gmem.dtype)
    out_views = plain
    if b.swizzled_store:  # one buffer, two views (Mosaic GPU's interpreter cannot alias: a buffer each there)
        itemsize = jnp.dtype(out_gmem.dtype).itemsize
        out_swizzle = plgpu.find_swizzle(b.tile_n * itemsize * 8)
        swizzled = plgpu.SMEM((COMPUTE_WGS, out_rows, b.tile_n), out_gmem.dtype, transforms=(
            plgpu.TilingTransform((8, out_swizzle // itemsize)), plgpu.SwizzleTransform(out_swizzle)))
        out_views = (plain, swizzled) if interpret else plgpu.RefUnion(plain, swizzled)

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*example), out_smem=out_views,
                       collective_axes="wg", **swap)
    def _scope(allocs, out_smem, swap=None):
        out_smem, out_swz = out_smem if b.swizzled_store else (out_smem, None)
        wg = jax.lax.axis_index("wg")
        wg_row0 = 0 if b.wg_cols or b.wg_weights else wg * wg_rows  # within the tile
        out_row0 = wg * out_rows if b.wg_weights else wg_row0  # the first row the warpgroup stores
        wg_col0 = wg * b.tile_n if b.wg_cols else 0  # within the CTA's columns

        per_cta = n_iters // 2 if b.cluster_n else n_iters  # column blocks a CTA (or cluster) takes per row tile

        @plgpu.nd_loop((sched_gmem[5, 0] * per_cta,), collective_axes="sm")  # the real tiles only
        def _loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            ti, ni = launch_order(lin, sched_gmem, per_cta) if b.per_group else (lin // per_cta, lin % per_cta)
            if b.cluster_n:  # the cluster's two CTAs: one row tile, adjacent column blocks
                ni = 2 * ni + jax.lax.axis_index("cluster")
            slab, group, block, lo, hi = (sched_gmem[i, ti] for i in range(5))
            if b.cluster_m:  # the pair's second tile is the second CTA's
                second = jax.lax.axis_index("cluster") == 1
                block, lo, hi = (jnp.where(second, sched_gmem[8 + i, ti], v) for i, v in enumerate((block, lo, hi)))
            row0 = block * b.tile_m
            col0 = ni * b.cta_n + wg_col0
            out_col0 = col0 if out_spread is None else col0 // out_spread[0] * out_spread[1] + col0 % out_spread[0]
            scale_block = col0 // fp8.BLOCK

            def weight_scales(w_scales, k):
                return tuple(s[group, scale_block, k] for s in w_scales)

            def context_for(w_scales):
                def context(run):
                    # the first K block's weight scales, and running sums per row block and weight (row blocks
                    # outermost)
                    _, sums = run((weight_scales(w_scales, 0),
                                   tuple(layout(jnp.zeros((n, b.tile_n), jnp.float32), plgpu.Layout.WGMMA)
                                         for _, n in row_blocks for _ in range(own))))
                    epilogue(sums)
                return context

            def epilogue(sums):
                pairs = swap_halves(sums) if b.wg_weights else zip(sums[::per_slab], sums[per_slab - 1::per_slab])
                outs = [(jax.nn.silu(g) * u if fused else g).astype(out_gmem.dtype) for g, u in pairs]
                # (first row within the warpgroup's rows, the blocks stored together) per store through the buffer
                stores = ([(r, out) for (r, _), out in zip(row_blocks, outs)] if b.out_by_row_block
                          else [(0, outs[0] if len(outs) == 1 else outs)])
                for r, block in stores:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store has left the buffer
                    own_lo = jnp.clip(lo - out_row0 - r, 0, out_rows)
                    own_hi = jnp.clip(hi - out_row0 - r, 0, out_rows)
                    store_block(block, out_smem.at[wg], None if out_swz is None else out_swz.at[wg], out_gmem, own_lo,
                                own_hi, row0 + out_row0 + r, out_col0, b.tile_n)

            def swap_halves(sums):
                """(gate, up) per 64-row block of the warpgroup's half: the gate's warpgroup keeps the first half
                and sends its second, the up's the reverse."""
                half = len(sums) // 2
                # (kept, sent) per block; a select of whole arrays (Mosaic GPU does not broadcast the predicate)
                kept, sent = jax.lax.cond(wg == 0, lambda: (sums[:half], sums[half:]),
                                          lambda: (sums[half:], sums[:half]))
                buf, sync = swap
                for i, block in enumerate(sent):
                    buf[wg, pl.ds(64 * i, 64)] = block
                plgpu.barrier_arrive(sync)
                plgpu.barrier_wait(sync)
                got = tuple(layout(buf[1 - wg, pl.ds(64 * i, 64)], plgpu.Layout.WGMMA) for i in range(half))
                plgpu.barrier_arrive(sync)  # both have read: the next tile may write
                plgpu.barrier_wait(sync)
                gates, ups = jax.lax.cond(wg == 0, lambda: (kept, got), lambda: (got, kept))
                return list(zip(gates, ups))

            def body_for(w_scales):
                def mma(idx, x_smem, *refs):
                    w_smems, xs_smem, (w_scale, sums) = refs[:per_slab], refs[per_slab], refs[per_slab + 1]
                    (k,) = idx
                    # the next K block's weight scales, loaded a whole K block before their use: issued in the same
                    # step, the loads' latency from L2 outlasted the wgmma (gate/up on H200: 838 TFLOP/s against
                    # 930 without the loads)
                    w_scale_next = weight_scales(w_scales, jnp.minimum(k + 1, k_iters - 1))
                    w_views = [(w.at[pl.ds(wg_col0, b.tile_n)] if b.wg_cols else w).T
                               for w in w_smems]
                    new = list(sums)  # row blocks outermost, then weights
                    for i, (r, n) in enumerate(row_blocks):
                        rows = pl.ds(wg_row0 + r, n)
                        x_scale = layout(xs_smem[0, rows], ROW_LAYOUT)
                        x_op = (layout(x_smem[rows], plgpu.Layout.WGMMA_8BIT) if b.x_in_registers
                                else x_smem.at[rows])

                        def fresh(ws, x_op=x_op, n=n):
                            """Fresh partials of the weights `ws`: their wgmmas issued, then one wait."""
                            def run(accs):
                                for j, acc in zip(ws, accs):
                                    plgpu.wgmma(acc, x_op, w_views[j])
                                plgpu.wgmma_wait(0)
                                return tuple(acc[...] for acc in accs)
                            return pl.run_scoped(run, tuple(plgpu.ACC((n, b.tile_n)) for _ in ws))

                        if b.wg_weights:  # this warpgroup's weight: the gate (warpgroup 0) or the up
                            (part,) = jax.lax.cond(wg == 0, lambda: fresh([0]), lambda: fresh([1]))
                            scale = x_scale * jnp.where(wg == 0, w_scale[0], w_scale[1])
                            new[i] = new[i] + part * jax.lax.broadcast_in_dim(scale, part.shape, (0,))
                            continue
                        # the weights whose wgmmas run before one wait: all of them, or one at a time
                        for ws in ([[j] for j in range(per_slab)] if b.one_partial else [range(per_slab)]):
                            for j, part in zip(ws, fresh(ws)):
                                scale = jax.lax.broadcast_in_dim(x_scale * w_scale[j], part.shape, (0,))
                                new[i * per_slab + j] = new[i * per_slab + j] + part * scale
                    return w_scale_next, tuple(new)
                return mma

            state, alone = b.chain_state(info)
            for s in range(num_slabs):  # the tile's slab: one branch runs
                slab_refs = w_gmems[2 * per_slab * s: 2 * per_slab * (s + 1)]
                values, scales = slab_refs[0::2], slab_refs[1::2]
                refs = ((x_gmem.at[pl.ds(row0, b.tile_m)],)
                        + tuple(w.at[group, pl.ds(ni * b.cta_n, b.cta_n)] for w in values)
                        + (xs_gmem.at[:, pl.ds(row0, b.tile_m)],))
                mma, context = body_for(scales), context_for(scales)
                pl.when((slab == s) & alone)(
                    lambda refs=refs, mma=mma, context=context: pipeline(mma, context)(*refs, allocations=allocs))
                if b.chain:
                    pl.when((slab == s) & ~alone)(lambda refs=refs, mma=mma, context=context: pipeline(
                        mma, context, state)(*refs, allocations=allocs))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("fused", "blocks", "interpret", "out_dtype", "out_spread"))
def split_ragged_dot_fp8_mgpu(x_MK: jax.Array, group_sizes_G: jax.Array, weights: tuple, *, x_scale_SM: jax.Array,
                              fused: bool = False, blocks: Fp8Blocks | None = None, interpret: bool = False,
                              out_dtype=None, out_spread: tuple[int, int] | None = None) -> jax.Array:
    """`split_gemm.split_ragged_dot`'s FP8 path on Mosaic GPU, same arguments: x (e4m3 [M, K] with
    `fp8.quantize_rows` scales x_scale_SM [K/128, M]) rows sorted by group times each group's block-scaled weights,
    the groups spread over slabs (weights: per slab one e4m3 (values [G_s, N, K], scales [G_s, N/128, K/128]) pair
    of `fp8.quantize_weights`; fused: a (gate, up) pair of them per slab, and the result silu(x @ gate) *
    (x @ up)), `out_dtype` out (default bf16). K and N multiples of 128. Rows past sum(group_sizes) are not
    written. blocks: None takes the tuned ones for this shape and card (`tuning`), else the defaults.

    out_spread (part, width): each run of `part` output columns starts a run of `width` in an output of N / part *
    width columns, the `width - part` after it left unwritten for the caller to fill in place (MLA's k: each
    head's k_nope, then the rope key, without a concatenation that copies all of k)."""
    m, k = x_MK.shape
    n = jax.tree.leaves(weights)[0].shape[1]  # the first values [G, N, K]
    if k % fp8.BLOCK or n % fp8.BLOCK:  # before the scales' shapes, which follow from K and N
        raise ValueError(f"{NAME}: K={k} and N={n} must be multiples of {fp8.BLOCK} (the FP8 scale block)")
    slabs, n = slab_weights(x_MK, weights, fused, NAME, scaled=True)
    b = blocks or tuning.lookup(NAME_TUNED, Fp8Blocks, jax.devices()[0].device_kind, k, n, fused, m) or (
        default_blocks(k, n, fused))
    check_inputs(x_MK, x_scale_SM, slabs, fused, b, interpret)
    out_dtype = out_dtype or jnp.bfloat16
    width = n if out_spread is None else spread_width(n, b, out_spread, out_dtype)
    pad = -m % b.tile_m  # whole row tiles: the last one's TMA loads stay in bounds
    x_pad = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
    xs_pad = jnp.pad(x_scale_SM, ((0, 0), (0, pad))) if pad else x_scale_SM
    sched = tile_schedule(group_sizes_G, tuple(ws[0][0].shape[0] for ws in slabs), b.tile_m, m + pad, b.group_m,
                          b.per_group, pairs=b.cluster_m)
    kernel = plgpu.kernel(
        functools.partial(_kernel, num_slabs=len(slabs), fused=fused, b=b, k_dim=k, n_dim=n, out_spread=out_spread,
                          interpret=interpret),
        out_type=jax.ShapeDtypeStruct((m + pad, width), out_dtype),
        grid=(b.num_sms // 2 if b.clustered else b.num_sms,), grid_names=("sm",), num_threads=COMPUTE_WGS + 1,
        thread_name="wg", **(dict(cluster=(2,), cluster_names=("cluster",)) if b.clustered else {}),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None)
    out = kernel(sched, x_pad, xs_pad, *(a for ws in slabs for w in ws for a in w))
    return out[:m] if pad else out


def spread_width(n: int, b: Fp8Blocks, out_spread: tuple[int, int], out_dtype) -> int:
    """The output columns of `out_spread` (see `split_ragged_dot_fp8_mgpu`); ValueError for a spread whose runs a
    tile's store would cross or whose rows TMA cannot address."""
    part, width = out_spread
    if part <= 0 or part % b.tile_n or n % part:
        raise ValueError(f"{NAME}: out_spread part={part} must be a positive multiple of tile_n={b.tile_n} dividing "
                         f"N={n} (a store stays within one run)")
    if width < part or width * jnp.dtype(out_dtype).itemsize % 16:
        raise ValueError(f"{NAME}: out_spread width={width} must be at least part={part} and a multiple of 16 bytes "
                         f"of {jnp.dtype(out_dtype).name} (TMA's global alignment)")
    return n // part * width


def check_inputs(x_MK, x_scale_SM, slabs, fused: bool, b: Fp8Blocks, interpret: bool) -> None:
    """ValueError before launch for what the kernel cannot compute (beyond `slab_weights`' shape checks)."""
    m, k = x_MK.shape
    n = slabs[0][0][0].shape[1]
    device = jax.devices()[0]
    if not interpret and device.platform == "gpu" and not str(device.compute_capability).startswith("9."):
        raise ValueError(f"{NAME}: needs a Hopper GPU (e4m3 wgmma, compute capability 9.x); {device.device_kind} "
                         f"has {device.compute_capability}")
    if x_scale_SM.shape != (k // fp8.BLOCK, m) or x_scale_SM.dtype != jnp.float32:
        raise ValueError(f"{NAME}: x_scale_SM {x_scale_SM.shape} {x_scale_SM.dtype} must be float32 "
                         f"{(k // fp8.BLOCK, m)} (fp8.quantize_rows)")
    for i, ws in enumerate(slabs):
        for values, scales in ws:
            fp8.BlockScaled(values, scales).check(f"{NAME} slab {i}")
            if max(values.shape) > MAX_TMA_COORD or values.shape[1] * values.shape[2] >= MAX_TMA_STRIDE_BYTES:
                raise ValueError(f"{NAME}: slab {i} weight {values.shape} is past what TMA addresses (int32 "
                                 f"coordinates per dimension, strides under 2^40 bytes)")
    if m + b.tile_m > MAX_TMA_COORD:
        raise ValueError(f"{NAME}: {m} rows are past TMA's int32 row coordinates")
    if b.acc_registers(fused) > MAX_ACC_REGISTERS:
        raise ValueError(f"{NAME}: {b} needs {b.acc_registers(fused)} accumulator registers per thread "
                         f"(more than {MAX_ACC_REGISTERS}: the tile would spill)")
    if b.x_in_registers and not fused:
        raise ValueError(f"{NAME}: Fp8Blocks.x_in_registers is for the fused gate/up (two weights sharing each x "
                         f"fragment); one weight reads each x row once from shared memory already")
    if b.wg_weights and not fused:
        raise ValueError(f"{NAME}: Fp8Blocks.wg_weights is for the fused gate/up (a warpgroup per weight)")
    if n % (b.cta_n * (2 if b.cluster_n else 1)):
        raise ValueError(f"{NAME}: N={n} must be a multiple of {b.cta_n * (2 if b.cluster_n else 1)} (tile_n"
                         f"{' * 2 warpgroups with wg_cols' if b.wg_cols else ''}"
                         f"{' * 2 CTAs with cluster_n' if b.cluster_n else ''})")
    if b.chain and (k // KSTEP) % b.max_concurrent_steps:
        raise ValueError(f"{NAME}: chained tiles need K / {KSTEP} = {k // KSTEP} divisible by "
                         f"max_concurrent_steps={b.max_concurrent_steps}")
