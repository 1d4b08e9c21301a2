"""Split-weight grouped GEMM on Mosaic GPU with a ping-pong schedule: each compute warpgroup owns whole tiles.

The cooperative kernel (`split_gemm_mgpu`) splits every tile between its two compute warpgroups, so both run
their epilogue (accumulators to shared memory, TMA store) at the same time and the tensor cores idle meanwhile: at
down's K of 2048 a tile is 32 k steps, and the epilogue is a visible share of it. Here the CTA's tiles alternate
between the two warpgroups: while one stores its tile, the other runs its wgmmas (CUTLASS's ping-pong Hopper
GEMM). A memory warpgroup streams the tiles' x and weight blocks with TMA, in tile order, through one ring of
stages; the tensor cores pass from one warpgroup to the other as the ring moves on to the next tile. (A ring per
warpgroup leaves each 3 stages in shared memory: 0.58 of the dense GEMM on H200, WORKSPACE.md session 10.)

Same tile schedule as the other split kernels (`split_gemm.tile_schedule`). Tested on CPU in Mosaic GPU interpret
mode against `jax.lax.ragged_dot`, and lowered for CUDA there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dwdp_jax.kernels import tuning
from dwdp_jax.kernels.split_gemm import require_positive, slab_weights, tile_schedule
from dwdp_jax.kernels.split_gemm_mgpu import _store

_MEMORY_REGISTERS, _COMPUTE_REGISTERS = 40, 232  # 128 x (40 + 2 x 232) of an SM's 64K registers


@dataclasses.dataclass(frozen=True)
class PingPongBlocks:
    """A tile is tile_m rows x tile_n columns of one warpgroup; `stages` shared-memory stages, shared."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 6
    num_sms: int = 132  # H100 / H200 SXM
    # The output leaves through a buffer of half the tile's rows, one half after the other (as
    # `MgpuBlocks.half_store`): 16 of a 128 x 128 tile's 32 KiB per warpgroup, which the sixth stage needs.
    half_store: bool = True

    def __post_init__(self):
        require_positive(self, ("tile_m", "tile_n", "tile_k", "stages", "num_sms"))
        if self.tile_m % (128 if self.half_store else 64):
            raise ValueError(f"PingPongBlocks.tile_m must be a multiple of 64 (wgmma rows), of 128 with half_store "
                             f"(halves of whole wgmma blocks), got {self.tile_m}")


DEFAULT_PINGPONG_BLOCKS = PingPongBlocks()
FUSED_PINGPONG_BLOCKS = PingPongBlocks(tile_n=64)


def _kernel(sched_gmem, x_gmem, *refs, num_slabs: int, fused: bool, b: PingPongBlocks, k_dim: int, n_dim: int):
    w_gmems, out_gmem = refs[:-1], refs[-1]
    per_slab = 2 if fused else 1
    dtype = x_gmem.dtype
    n_blocks, k_iters = n_dim // b.tile_n, k_dim // b.tile_k
    swizzle = plgpu.find_swizzle(b.tile_k * jnp.dtype(dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    out_rows = b.tile_m // 2 if b.half_store else b.tile_m

    def tile_of(j):
        """The CTA's j-th (row tile, column block): row-tile-major over the real tiles, strided over the SMs."""
        lin = jax.lax.axis_index("sm") + j * b.num_sms
        ti, ni = lin // n_blocks, lin % n_blocks
        return tuple(sched_gmem[i, ti] for i in range(5)) + (ni,)

    # One ring of stages in tile order. Both compute warpgroups wait on every stage's load and both release it
    # (the owner after its wgmmas, the other at once): Pallas tracks a barrier's phase per thread, one flip per
    # wait, so a warpgroup must see every phase; and a stage cannot be refilled before both saw it, so neither
    # falls two phases behind.
    @functools.partial(
        pl.run_scoped,
        x_smem=plgpu.SMEM((b.stages, b.tile_m, b.tile_k), dtype, transforms=transforms),
        w_smem=[plgpu.SMEM((b.stages, b.tile_k, b.tile_n), dtype, transforms=transforms)] * per_slab,
        out_smem=plgpu.SMEM((2, out_rows, b.tile_n), dtype),
        full=plgpu.Barrier(num_arrivals=1 + per_slab, num_barriers=b.stages),
        empty=plgpu.Barrier(num_arrivals=2, num_barriers=b.stages),
        collective_axes="wg")
    def _scope(x_smem, w_smem, out_smem, full, empty):
        wg = jax.lax.axis_index("wg")
        sm = jax.lax.axis_index("sm")
        items = sched_gmem[5, 0] * n_blocks
        mine = (items - sm + b.num_sms - 1) // b.num_sms  # (tile, column block) pairs of this CTA

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

            @pl.loop(0, mine)
            def _item(j):
                slab, group, block, _, _, ni = tile_of(j)

                @pl.loop(0, k_iters)
                def _step(k):
                    count = j * k_iters + k
                    slot = count % b.stages

                    @pl.when(count >= b.stages)
                    def _():
                        plgpu.barrier_wait(empty.at[slot])

                    ks = pl.ds(k * b.tile_k, b.tile_k)
                    plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(block * b.tile_m, b.tile_m), ks], x_smem.at[slot],
                                            full.at[slot])
                    for s in range(num_slabs):
                        @pl.when(slab == s)
                        def _(s=s):
                            for w_gmem, w_ref in zip(w_gmems[per_slab * s: per_slab * (s + 1)], w_smem):
                                plgpu.copy_gmem_to_smem(w_gmem.at[group, ks, pl.ds(ni * b.tile_n, b.tile_n)],
                                                        w_ref.at[slot], full.at[slot])

            loads = mine * k_iters

            @pl.loop(jnp.maximum(loads - b.stages, 0), loads)  # the last releases: every phase observed
            def _release(count):
                plgpu.barrier_wait(empty.at[count % b.stages])

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")

            @pl.loop(0, mine)
            def _item(j):
                @pl.when(j % 2 != wg)
                def _pass():  # the other warpgroup's tile: see each stage loaded, release it
                    @pl.loop(0, k_iters)
                    def _step(k):
                        slot = (j * k_iters + k) % b.stages
                        plgpu.barrier_wait(full.at[slot])
                        plgpu.barrier_arrive(empty.at[slot])

                @pl.when(j % 2 == wg)
                def _own():
                    _, _, block, lo, hi, ni = tile_of(j)

                    def mma(accs):
                        def step(k, accs):
                            slot = (j * k_iters + k) % b.stages
                            plgpu.barrier_wait(full.at[slot])
                            for acc, w_ref in zip(accs, w_smem):
                                plgpu.wgmma(acc, x_smem.at[slot], w_ref.at[slot])
                            plgpu.wgmma_wait(1)  # the last step's wgmmas are done: release its stage

                            @pl.when(k > 0)
                            def _():
                                plgpu.barrier_arrive(empty.at[(j * k_iters + k - 1) % b.stages])
                            return accs

                        accs = jax.lax.fori_loop(0, k_iters, step, accs)
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(empty.at[(j * k_iters + k_iters - 1) % b.stages])
                        vals = tuple(a[...] for a in accs)
                        out = jax.nn.silu(vals[0]) * vals[1] if fused else vals[0]
                        for h in range(b.tile_m // out_rows):  # halves: each waits until the last left the buffer
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                            h_lo = jnp.clip(lo - h * out_rows, 0, out_rows)
                            h_hi = jnp.clip(hi - h * out_rows, 0, out_rows)
                            _store(out[h * out_rows:(h + 1) * out_rows].astype(dtype), out_smem.at[wg], None,
                                   out_gmem, h_lo, h_hi, block * b.tile_m + h * out_rows, ni * b.tile_n, b.tile_n)

                    pl.run_scoped(mma, tuple(plgpu.ACC((b.tile_m, b.tile_n), jnp.float32) for _ in range(per_slab)))

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("fused", "blocks", "interpret"))
def split_ragged_dot_pingpong(x_MK: jax.Array, group_sizes_G: jax.Array, weights: tuple, *, fused: bool = False,
                              blocks: PingPongBlocks | None = None, interpret: bool = False) -> jax.Array:
    """`split_gemm.split_ragged_dot` with the ping-pong schedule (same arguments and contract: rows past
    sum(group_sizes) are not written). blocks: None takes the tuned ones for this shape and card (`tuning`), else
    the defaults."""
    slabs, n = slab_weights(x_MK, weights, fused, "split_ragged_dot_pingpong")
    m, k = x_MK.shape
    b = blocks or tuning.lookup("split_pingpong", PingPongBlocks, jax.devices()[0].device_kind, k, n, fused, m) or (
        FUSED_PINGPONG_BLOCKS if fused else DEFAULT_PINGPONG_BLOCKS)
    if k % b.tile_k or n % b.tile_n:
        raise ValueError(f"split_ragged_dot_pingpong: K={k} must be a multiple of tile_k={b.tile_k} and N={n} of "
                         f"tile_n={b.tile_n}")
    pad = -m % b.tile_m  # whole row tiles: the last one's TMA load stays in bounds
    x_pad = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
    sched = tile_schedule(group_sizes_G, tuple(ws[0].shape[0] for ws in slabs), b.tile_m, m + pad)
    kernel = plgpu.kernel(
        functools.partial(_kernel, num_slabs=len(slabs), fused=fused, b=b, k_dim=k, n_dim=n),
        out_type=jax.ShapeDtypeStruct((m + pad, n), x_MK.dtype),
        grid=(b.num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None)
    out = kernel(sched, x_pad, *(w for ws in slabs for w in ws))
    return out[:m] if pad else out


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: the only entry point

    return InterpretGPUParams()
