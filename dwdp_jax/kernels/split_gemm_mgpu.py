"""Split-weight grouped GEMM on Mosaic GPU (Hopper): TMA loads and warp-specialized wgmma.

The Triton kernel (`split_gemm`) computes each row tile at 0.80-0.89 of cuBLAS's rate on H200 and stops at
0.64-0.72 of the dense GEMM over skewed groups (H200, experiments.bench_grouped_gemm); what it lacks is what
Hopper's fastest GEMMs do: TMA copies and a producer warpgroup that keeps the consumers' wgmma fed. This kernel is
that structure (the one of jax's `hopper_matmul_mgpu` example) over the same tile schedule
(`split_gemm.tile_schedule`): row tiles aligned to `tile_m`, cut at group boundaries, each tagged with its slab and
its group in the slab.

Per CTA (persistent over the SMs): (row tile, column block) pairs in row-tile-major order; a memory warpgroup
streams the x tile and the slab's weight block into shared memory with TMA, two compute warpgroups each own half
of the column block (fp32 wgmma accumulators; fused: a gate and an up accumulator and SwiGLU in the epilogue). A
tile stores only its rows [lo, hi): TMA boxes have static shapes, so the rows go out as power-of-two runs.

Tested on CPU in Mosaic GPU interpret mode against `jax.lax.ragged_dot`, and lowered for CUDA there; its GPU speed
is measured by `experiments.bench_grouped_gemm` (backend `pallas_split_mgpu`). First run on H200, unchained: 0.675
(down) and 0.676 (fused gate/up) of the dense GEMM, equal to the tuned Triton kernel (H200, 131072 rows, skew 6.45).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.pipeline import PipelinePipeline  # the enum pipeline_state takes (not re-exported)

from dwdp_jax.kernels import tuning
from dwdp_jax.kernels.split_gemm import require_positive, slab_weights, tile_schedule


@dataclasses.dataclass(frozen=True)
class PipelinedTiles:
    """The tiling both Mosaic GPU split kernels share (this one and the FP8 `split_gemm_fp8_mgpu`): persistent CTAs
    over (row tile, column block) pairs, a memory warpgroup streaming stages of tiles into shared memory, two
    compute warpgroups on them."""

    tile_m: int = 128
    tile_n: int = 128
    max_concurrent_steps: int = 4  # pipeline stages in shared memory
    num_sms: int = 132  # H100 / H200 SXM
    # A CTA's tiles run as one pipeline (`pipeline_state`): the memory warpgroup loads the next tile while the
    # compute warpgroups finish the current one and store it, instead of a fill and a drain per tile. Needs the K
    # steps divisible by max_concurrent_steps.
    chain: bool = False
    # Two CTAs per cluster take adjacent column blocks of one row tile, and the x tile they share is loaded once
    # for both (TMA multicast), the structure of Hopper's fastest dense GEMMs (jax's hopper_matmul_mgpu
    # `cluster_dimension`). The column blocks per row tile must be even.
    cluster_n: bool = False
    # Full tiles (a group's rows fill all tile_m; every tile in the model's tile-aligned layout) go out through a
    # swizzled shared-memory view in one TMA store: the plain view's rows are 128 or 256 bytes apart, so a warp's
    # writes of the wgmma accumulator fall several to a bank. Cut tiles keep the plain view and the row runs.
    swizzled_store: bool = False

    def __post_init__(self):
        name = type(self).__name__
        require_positive(self, ("tile_m", "tile_n", "max_concurrent_steps", "num_sms"))
        if self.cluster_n and self.num_sms % 2:
            raise ValueError(f"{name}.cluster_n needs an even num_sms (clusters of 2), got {self.num_sms}")

    def chain_state(self, info: plgpu.NDLoopInfo):
        """(pipeline_state, alone) of a CTA's tile: with chain, its first tile starts the chain, its last drains it
        and a lone tile is its own pipeline; without, every tile is alone."""
        if not self.chain:
            return None, True
        first, last = info.local_index == 0, info.local_index == info.num_local_steps - 1
        state = jnp.where(first, int(PipelinePipeline.START),
                          jnp.where(last, int(PipelinePipeline.STOP), int(PipelinePipeline.STEADY)))
        return state, info.num_local_steps == 1


@dataclasses.dataclass(frozen=True)
class MgpuBlocks(PipelinedTiles):
    """Tile sizes: a CTA computes tile_m rows x (2 * tile_n) columns, one tile_n half per compute warpgroup, tile_k
    of K per stage. Cluster_n: per CTA and k step 40 of the 48 KiB come from L2 (x is 16 KiB of them).
    Swizzled_store, measured on H200 over aligned groups: within 0.3% of the plain view
    (experiments.bench_grouped_gemm); with half_store, per half."""

    tile_k: int = 64
    # wgmma groups left in flight per k step (jax's Hopper matmul and ragged_dot keep one): a stage's shared memory
    # is released that many steps later, so the tensor cores never wait for the last wgmma before the next issue.
    delay_release: int = 0
    # The output leaves through a staging buffer of half the tile's rows, one half after the other: 32 of the down
    # kernel's 64 KiB, which buys the fourth 48 KiB stage (and with it delay_release=1), the pipeline of the
    # fused kernel's winner, whose 64-column halves need only 32 KiB. Combines with swizzled_store (one 32 KiB
    # buffer, two views).
    half_store: bool = False

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, ("tile_k",))
        if self.cluster_n and self.chain:
            raise ValueError("MgpuBlocks: cluster_n and chain cannot be combined (this kernel's chained clusters are "
                             "neither lowered in the tests nor swept; the FP8 kernel's are)")
        if self.half_store and self.tile_m % 128:
            raise ValueError(f"MgpuBlocks.half_store needs tile_m a multiple of 128 (halves of whole 64-row wgmma "
                             f"blocks), got {self.tile_m}")
        if self.tile_m % 64:
            raise ValueError(f"MgpuBlocks.tile_m must be a multiple of 64 (wgmma rows), got {self.tile_m}")
        if self.chain and self.delay_release:
            raise ValueError("MgpuBlocks: chain and delay_release cannot be combined (jax's pipeline of pipelines "
                             "does not support delay_release)")
        if not 0 <= self.delay_release < self.max_concurrent_steps:
            raise ValueError(f"MgpuBlocks.delay_release must be in [0, max_concurrent_steps={self.max_concurrent_steps}"
                             f"), got {self.delay_release}")


# Shared memory (227 KiB on Hopper) bounds the stages: 48 KiB per stage with a 64 KiB output buffer (down), and
# for the fused gate/up kernel, which keeps two weight blocks per stage, half the columns per warpgroup.
DEFAULT_MGPU_BLOCKS = MgpuBlocks(max_concurrent_steps=3)
FUSED_MGPU_BLOCKS = MgpuBlocks(tile_n=64)
# Chained variants for R1's shapes (K / tile_k divisible by the stages: 2048 / 64 = 32, 7168 / 64 = 112). Timed on
# H200 (experiments.bench_grouped_gemm --tune, 256 experts, skew 6.45): chained gate/up 565.5 TFLOP/s (0.793 of
# dense) at 262144 rows, 506.6 (0.715) at 131072; down's fastest was unchained. fused -> blocks
CHAINED_R1 = {False: MgpuBlocks(max_concurrent_steps=2, chain=True), True: MgpuBlocks(tile_n=64, chain=True)}


def _store_rows(out_smem, out_gmem, lo, count, row0, col0, tile_m: int, tile_n: int):
    """TMA-store rows [lo, lo + count) of out_smem to rows row0 + lo.. of out_gmem, as power-of-two runs."""
    off = lo
    size = tile_m
    while size >= 1:
        @pl.when(count & size != 0)
        def _(size=size, off=off):
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(off, size)],
                                    out_gmem.at[pl.ds(row0 + off, size), pl.ds(col0, tile_n)])

        off = off + (count & size)
        size //= 2


def store_block(block, plain, swizzled, out_gmem, lo, hi, row0, col0, tile_n: int):
    """Rows [lo, hi) of `block` (a tile's output or half of it; or a sequence of row blocks, stacked) to rows
    row0 + lo.. of out_gmem: a full block in one TMA store through the swizzled view when there is one (its
    register-to-shared writes free of bank conflicts), else power-of-two row runs through the plain view."""
    if isinstance(block, (tuple, list)):  # row blocks: through the plain view only
        if swizzled is not None:
            raise ValueError("store_block: row blocks go through the plain view (swizzled must be None)")
        at = 0
        for part in block:
            plain.at[pl.ds(at, part.shape[0])][...] = part
            at += part.shape[0]
        plgpu.commit_smem()
        return _store_rows(plain, out_gmem, lo, hi - lo, row0, col0, at, tile_n)
    rows = block.shape[0]

    def runs():
        plain[...] = block
        plgpu.commit_smem()
        _store_rows(plain, out_gmem, lo, hi - lo, row0, col0, rows, tile_n)

    def whole():
        swizzled[...] = block
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(swizzled, out_gmem.at[pl.ds(row0, rows), pl.ds(col0, tile_n)])

    if swizzled is None:
        return runs()
    full = (lo == 0) & (hi == rows)
    pl.when(full)(whole)
    pl.when(~full)(runs)


def _kernel(sched_gmem, x_gmem, *refs, num_slabs: int, fused: bool, b: MgpuBlocks, k_dim: int, n_dim: int,
            alias_views: bool = True):
    w_gmems, out_gmem = refs[:-1], refs[-1]
    per_slab = 2 if fused else 1
    dtype = x_gmem.dtype
    cta_n = 2 * b.tile_n
    n_iters, k_iters = n_dim // cta_n, k_dim // b.tile_k
    swizzle = plgpu.find_swizzle(b.tile_k * jnp.dtype(dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    in_specs = [plgpu.BlockSpec((b.tile_m, b.tile_k), lambda k: (0, k), transforms=transforms,
                                memory_space=plgpu.SMEM, delay_release=b.delay_release,
                                collective_axes=("cluster",) if b.cluster_n else ())]
    in_specs += [plgpu.BlockSpec((b.tile_k, cta_n), lambda k: (k, 0), transforms=transforms,
                                 memory_space=plgpu.SMEM, delay_release=b.delay_release)] * per_slab

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=b.max_concurrent_steps, compute_context=context, pipeline_state=state)

    ignore = lambda *_, **__: None  # noqa: E731 (allocations do not depend on the body)
    example = (x_gmem.at[pl.ds(0, b.tile_m)],) + tuple(w.at[0, :, pl.ds(0, cta_n)] for w in w_gmems[:per_slab])

    out_rows = b.tile_m // 2 if b.half_store else b.tile_m
    plain = plgpu.SMEM((2, out_rows, b.tile_n), dtype)
    out_swizzle = plgpu.find_swizzle(b.tile_n * jnp.dtype(dtype).itemsize * 8)
    swizzled = plgpu.SMEM((2, out_rows, b.tile_n), dtype, transforms=(
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(out_swizzle)))

    # One buffer, two views; a tile writes through one of them only after the last tile's stores read it. Mosaic
    # GPU's interpreter cannot alias, and has no shared-memory limit: there the views get a buffer each.
    views = (plgpu.RefUnion(plain, swizzled) if alias_views else (plain, swizzled)) if b.swizzled_store else plain

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*example), out=views,
                       collective_axes="wg")
    def _scope(allocs, out):
        out_smem, out_swz = out if b.swizzled_store else (out, None)
        wg = jax.lax.axis_index("wg")
        per_cta = n_iters // 2 if b.cluster_n else n_iters  # column blocks a CTA takes per row tile

        @plgpu.nd_loop((sched_gmem[5, 0] * per_cta,), collective_axes="sm")  # the real tiles only
        def _loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            ti, ni = lin // per_cta, lin % per_cta
            if b.cluster_n:  # the cluster's two CTAs: one row tile, adjacent column blocks
                ni = 2 * ni + jax.lax.axis_index("cluster")
            slab, group, block, lo, hi = (sched_gmem[i, ti] for i in range(5))
            row0 = block * b.tile_m
            col0 = ni * cta_n + wg * b.tile_n

            def context(run):
                @functools.partial(pl.run_scoped,
                                   accs=tuple(plgpu.ACC((b.tile_m, b.tile_n), jnp.float32) for _ in range(per_slab)))
                def _acc(accs):
                    run(accs)
                    vals = tuple(a[...] for a in accs)
                    out = jax.nn.silu(vals[0]) * vals[1] if fused else vals[0]
                    for h in range(b.tile_m // out_rows):  # halves: each waits until the last left the buffer
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        h_lo = jnp.clip(lo - h * out_rows, 0, out_rows)
                        h_hi = jnp.clip(hi - h * out_rows, 0, out_rows)
                        store_block(out[h * out_rows:(h + 1) * out_rows].astype(dtype), out_smem.at[wg],
                                    None if out_swz is None else out_swz.at[wg], out_gmem, h_lo, h_hi,
                                    row0 + h * out_rows, col0, b.tile_n)

            def mma(_, x_smem, *w_and_accs):
                w_smems, accs = w_and_accs[:per_slab], w_and_accs[per_slab]
                for w_smem, acc in zip(w_smems, accs):
                    plgpu.wgmma(acc, x_smem, w_smem.at[:, pl.ds(wg * b.tile_n, b.tile_n)])
                plgpu.wgmma_wait(b.delay_release)  # reading the accumulators after the pipeline waits for all
                return accs

            state, alone = b.chain_state(info)
            for s in range(num_slabs):  # the tile's slab: one branch runs
                refs = (x_gmem.at[pl.ds(row0, b.tile_m)],) + tuple(
                    w.at[group, :, pl.ds(ni * cta_n, cta_n)] for w in w_gmems[per_slab * s: per_slab * (s + 1)])
                pl.when((slab == s) & alone)(lambda refs=refs: pipeline(mma, context)(*refs, allocations=allocs))
                if b.chain:
                    pl.when((slab == s) & ~alone)(
                        lambda refs=refs: pipeline(mma, context, state)(*refs, allocations=allocs))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("fused", "blocks", "interpret"))
def split_ragged_dot_mgpu(x_MK: jax.Array, group_sizes_G: jax.Array, weights: tuple, *, fused: bool = False,
                          blocks: MgpuBlocks | None = None, interpret: bool = False) -> jax.Array:
    """`split_gemm.split_ragged_dot` on Mosaic GPU: x rows sorted by group times each group's weights, the groups
    spread over slabs (weights: one [G_s, K, N] array per slab; fused: a (gate, up) pair per slab and the result
    silu(x @ gate) * (x @ up)). Rows past sum(group_sizes) are not written. bf16 in, fp32 accumulation. blocks:
    None takes the tuned ones for this shape and card (`tuning`), else the defaults."""
    slabs, n = slab_weights(x_MK, weights, fused, "split_ragged_dot_mgpu")
    m, k = x_MK.shape
    b = blocks or tuning.lookup("split_mgpu", MgpuBlocks, jax.devices()[0].device_kind, k, n, fused, m) or (
        FUSED_MGPU_BLOCKS if fused else DEFAULT_MGPU_BLOCKS)
    if b.chain and (k // b.tile_k) % b.max_concurrent_steps:
        raise ValueError(f"split_ragged_dot_mgpu: chained tiles need K / tile_k = {k // b.tile_k} divisible by "
                         f"max_concurrent_steps={b.max_concurrent_steps}")
    cta_n = 2 * b.tile_n * (2 if b.cluster_n else 1)  # columns of a CTA, or of a cluster's two CTAs
    if k % b.tile_k or n % cta_n:
        raise ValueError(f"split_ragged_dot_mgpu: K={k} must be a multiple of tile_k={b.tile_k} and N={n} of "
                         f"{cta_n} (2 * tile_n{' * 2 CTAs with cluster_n' if b.cluster_n else ''})")
    pad = -m % b.tile_m  # whole row tiles: the last one's TMA load stays in bounds
    x_pad = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
    sched = tile_schedule(group_sizes_G, tuple(ws[0].shape[0] for ws in slabs), b.tile_m, m + pad)
    kernel = plgpu.kernel(
        functools.partial(_kernel, num_slabs=len(slabs), fused=fused, b=b, k_dim=k, n_dim=n,
                          alias_views=not interpret),
        out_type=jax.ShapeDtypeStruct((m + pad, n), x_MK.dtype),
        grid=(b.num_sms // 2 if b.cluster_n else b.num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        **(dict(cluster=(2,), cluster_names=("cluster",)) if b.cluster_n else {}),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None)
    out = kernel(sched, x_pad, *(w for ws in slabs for w in ws))
    return out[:m] if pad else out


def interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: the only entry point

    _interpret_transposed_wgmma_operands()
    return InterpretGPUParams()


def _interpret_transposed_wgmma_operands() -> None:
    """Mosaic GPU's interpreter reads wgmma operands through index transforms only, and fails on a transposed view
    (`ref.T`), which a K-major B operand is (FP8 wgmma needs one: `split_gemm_fp8_mgpu`), and on an A
    operand held in registers (attention's probabilities: `attention_mgpu`). Its wgmma callback is replaced, once,
    by the same product with such operands read transposed, and register operands taken as they come."""
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as cb
    from jax._src.state.types import TransposeTransform

    if getattr(cb.wgmma, "reads_transposed_operands", False):
        return

    def read(key_array, transforms, thread, info):
        if jnp.issubdtype(key_array.dtype, jnp.floating):  # the operand's values (registers), not a buffer's key
            return np.asarray(key_array)
        transforms = cb._remove_noop_transforms(transforms)
        perm = None
        if transforms and isinstance(transforms[-1], TransposeTransform):
            transforms, perm = transforms[:-1], transforms[-1].permutation
        content, _, _ = cb._get_shared_memory().get_buffer_content(
            cb.HostAllocationKey.from_array(key_array), interpret_utils.to_range(jax.tree.map(int, transforms)),
            thread, logging_info=info)
        return content if perm is None else np.transpose(content, perm)

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
              acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
              source_info=None):
        device_id, thread_id = int(device_id), int(thread_id)
        info = interpret_utils.GPULoggingInfo(device_id=device_id, thread_id=thread_id, source_info=source_info,
                                              grid_point_coords=tuple(int(c) for c in grid_point_coords))
        memory = cb._get_shared_memory()
        thread = memory.get_global_thread_id(device_id, thread_id)
        a = read(a_allocation_key_as_array, a_transforms, thread, info)
        b = read(b_allocation_key_as_array, b_transforms, thread, info)
        acc_key = cb.HostAllocationKey.from_array(acc_allocation_key_as_array)
        acc_range = interpret_utils.to_range(jax.tree.map(int, cb._remove_noop_transforms(acc_transforms)))
        acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
        memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype), thread,
                                    logging_info=info)
        return token

    wgmma.reads_transposed_operands = True
    cb.wgmma = wgmma
