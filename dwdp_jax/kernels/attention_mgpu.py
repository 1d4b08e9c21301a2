"""MLA prefill attention on Hopper in FlashAttention-3's schedule: Pallas Mosaic GPU, q/k 192 and v 128 natively.

tokamax's SM90 kernel (`attention_tokamax`) runs 585 TFLOP/s on 32K packed tokens on H200 (issue 28 asks 650). It
ping-pongs its two compute warpgroups, so one warpgroup's softmax runs while the other's GEMMs hold the tensor
cores, but within a warpgroup every step waits: QK^T, then the softmax, then PV. At 192/128 a warpgroup's softmax
of a 64 x 128 block (8192 exp2 at 16 an SM and clock, and the scale, max, sum and conversion on the FP32 lanes)
takes most of the time of the other warpgroup's two GEMMs (5.2 MFLOP, 1280 tensor-core cycles an SM), so any
delay in one leaves the tensor cores idle. FlashAttention-3's second overlap is within the warpgroup: the QK^T of
block j+1 and the PV of block j are issued together, and block j+1's softmax runs while PV(j) is still on the
tensor cores (the paper's ablation on H100, head dim 128: 661 TFLOP/s with it, 582 without).

Per CTA: 128 query rows of one head (64 per compute warpgroup), the key/value blocks from the first sequence start
among those rows to the causal diagonal; a memory warpgroup streams K and V blocks into `num_stages` shared-memory
stages with TMA. Per compute warpgroup and key block j (after the first):
  issue S_j = Q K_j^T; issue O += P_{j-1} V_{j-1} (P in registers); wait for S_j only (PV stays in flight);
  release K_j's stage; mask (only blocks on the diagonal or before a row's sequence start), running max, P_j,
  row sums; wait for PV; release V_{j-1}'s stage; rescale O.
The maximum is rescaled lazily as in `attention_tokamax` (`RESCALE_THRESHOLD`, FlashAttention-4's 2^8): O and the
row sum keep a stale maximum until a row's grows by more than 2^8, and the final division cancels it exactly.
Packing is the per-row sequence start (`attention_tokamax.sequence_starts`): no key of another sequence enters a
softmax, and there is no bound on sequences per batch. Padding rows attend within the padding run (finite values
that callers discard). The output leaves through the warpgroup's own Q rows in shared memory (Q is read by no one
after the warpgroup's last QK^T), which keeps two stages of 128-key blocks within Hopper's 227 KiB.

Checked on CPU by lowering for CUDA at MLA's widths (Mosaic GPU's layout inference and shared-memory bound) and
in Mosaic GPU's interpreter against the XLA reference on packed batches (its wgmma synchronous, and O accumulated
through a fresh accumulator: it has no `run_state`); the compiled kernel against the same reference is a
`pytest -m gpu` test. Not yet timed on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dwdp_jax.kernels import attention_tokamax as tk, tuning
from dwdp_jax.kernels.split_gemm_mgpu import interpret_params

NAME = "attention_mgpu"
KERNEL = NAME  # its entries in the kernel block cache (`tuning`: k = q/k head width, n = v head width, rows = tokens)
BLOCK_Q = 64  # query rows per compute warpgroup: one wgmma M
COMPUTE_WGS = 2
TILE_Q = BLOCK_Q * COMPUTE_WGS  # query rows per CTA
MAX_SMEM_BYTES = 227 * 1024
# fp32 registers per compute-warpgroup thread the live tiles may take (O, S and two P tiles), of the 232 the
# warpgroup gets (the memory warpgroup keeps 40); the rest hold addresses, row statistics and the mask.
MAX_TILE_REGISTERS = 200
ROW = plgpu.Layout.WGMMA.reduce(1)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Key rows per stage, stages in flight, whether the two compute warpgroups take turns issuing their GEMMs
    (FlashAttention-3's ping-pong), and whether a block's softmax runs under the previous block's PV (the overlap
    within a warpgroup; False waits for both GEMMs first: FlashAttention-3's ablation of it)."""

    block_kv: int = 128
    num_stages: int = 2
    ping_pong: bool = True
    overlap: bool = True

    def __post_init__(self):
        if self.block_kv not in (64, 128, 192, 256):
            raise ValueError(f"attention_mgpu Blocks.block_kv must be 64, 128, 192 or 256 (a wgmma N), got "
                             f"{self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"attention_mgpu Blocks.num_stages must be >= 2 (K/V of block j+1 load while block j "
                             f"computes), got {self.num_stages}")

    def smem_bytes(self, qk_dim: int, v_dim: int, itemsize: int = 2) -> int:
        """Q of both warpgroups (the output reuses it) and the K and V stages."""
        return (TILE_Q * qk_dim + self.num_stages * self.block_kv * (qk_dim + v_dim)) * itemsize

    def tile_registers(self, v_dim: int) -> int:
        """Per compute-warpgroup thread: O (64 x v fp32), S (64 x block_kv fp32), P of two blocks (bf16)."""
        return BLOCK_Q * (v_dim + self.block_kv + self.block_kv) // 128

    def fits(self, qk_dim: int, v_dim: int) -> bool:
        return (self.smem_bytes(qk_dim, v_dim) <= MAX_SMEM_BYTES
                and self.tile_registers(v_dim) <= MAX_TILE_REGISTERS)


DEFAULT_BLOCKS = Blocks()


def candidate_blocks(qk_dim: int, v_dim: int) -> list[Blocks]:
    """The schedules a sweep times: every one that fits, and the default without the overlap (its ablation)."""
    out = [Blocks(block_kv=bkv, num_stages=st, ping_pong=pp)
           for bkv in (64, 128) for st in (2, 3, 4) for pp in (True, False)]
    return [b for b in out + [dataclasses.replace(DEFAULT_BLOCKS, overlap=False)] if b.fits(qk_dim, v_dim)]


def blocks_for(tokens: int, qk_dim: int, v_dim: int, device_kind: str) -> Blocks:
    """The cached blocks of this card and head widths nearest in tokens, else the defaults."""
    cached = tuning.lookup(KERNEL, Blocks, device_kind, qk_dim, v_dim, False, tokens)
    return cached if cached is not None and cached.fits(qk_dim, v_dim) else DEFAULT_BLOCKS


def check_head_dims(qk_dim: int, v_dim: int, blocks: Blocks = DEFAULT_BLOCKS) -> None:
    """ValueError naming the head width the kernel does not take."""
    for name, dim in (("q/k head_dim", qk_dim), ("v head_dim", v_dim)):
        if dim % tk.HEAD_DIM_MULTIPLE or not tk.MIN_HEAD_DIM <= dim <= tk.MAX_HEAD_DIM:
            raise ValueError(f"{NAME}: {name}={dim} is not supported: a multiple of {tk.HEAD_DIM_MULTIPLE} in "
                             f"[{tk.MIN_HEAD_DIM}, {tk.MAX_HEAD_DIM}] (MLA: q/k 192, v 128)")
    if v_dim > qk_dim or (BLOCK_Q * qk_dim) % v_dim:
        raise ValueError(f"{NAME}: v head_dim={v_dim} must be <= q/k head_dim={qk_dim} and divide 64 * {qk_dim} (the "
                         f"output leaves through the warpgroup's Q rows in shared memory)")
    if not blocks.fits(qk_dim, v_dim):
        raise ValueError(f"{NAME}: {blocks} at q/k {qk_dim}, v {v_dim} needs {blocks.smem_bytes(qk_dim, v_dim)} bytes "
                         f"of shared memory (at most {MAX_SMEM_BYTES}) and {blocks.tile_registers(v_dim)} tile "
                         f"registers a thread (at most {MAX_TILE_REGISTERS})")


def tile_ranges(starts_T: jax.Array, block_kv: int) -> jax.Array:
    """int32 [2 + COMPUTE_WGS, tiles] per 128-row query tile: the first key block (of the earliest sequence start
    among its rows), the end of its key blocks (the causal diagonal of its last row), and per compute warpgroup the
    latest sequence start among its 64 rows (key blocks before it need the sequence mask). starts_T: each row's
    sequence start, T a multiple of TILE_Q."""
    per_tile = starts_T.reshape(-1, TILE_Q)
    tiles = per_tile.shape[0]
    first = per_tile.min(axis=1) // block_kv
    end = ((jnp.arange(tiles, dtype=jnp.int32) + 1) * TILE_Q + block_kv - 1) // block_kv
    latest = per_tile.reshape(tiles, COMPUTE_WGS, BLOCK_Q).max(axis=2).T
    return jnp.concatenate([first[None], end[None], latest]).astype(jnp.int32)


def _accumulate(o, body, others, interpret: bool):
    """(o plus what `body(acc)`'s wgmmas add into the accumulator acc, body's other results: arrays shaped as
    `others`). On GPU the accumulator starts at o (`pl.run_state`, which waits for every wgmma before it returns);
    Mosaic GPU's interpreter has no run_state, so there it starts at zero and o is added after (the same sum up to
    fp32 rounding)."""
    if interpret:
        def scoped(acc):
            rest = body(acc)
            return acc[...], rest

        add, rest = pl.run_scoped(scoped, plgpu.ACC(o.shape, jnp.float32))
        return o + add, rest

    def step(refs):
        acc, rest_refs = refs
        for ref, value in zip(rest_refs, body(acc)):
            ref[...] = value

    return pl.run_state(step)((plgpu.ACC.init(o), others))


def _kernel(q_gmem, k_gmem, v_gmem, starts_gmem, ranges_gmem, out_gmem, qo_smem, starts_smem, k_smem, v_smem,
            q_full, k_full, v_full, k_free, v_free, turn, *, b: Blocks, scale: float, threshold: float,
            num_tiles: int, interpret: bool):
    # Register layouts are hints to Mosaic GPU's layout inference, which its interpreter does not take.
    layout = (lambda x, _: x) if interpret else plgpu.layout_cast
    iota = ((lambda dtype, shape, dim, layout: jax.lax.broadcasted_iota(dtype, shape, dim)) if interpret
            else plgpu.broadcasted_iota)
    v_dim = v_gmem.shape[-1]
    q_smem, o_smem = qo_smem
    h = jax.lax.axis_index("heads")
    qi = num_tiles - 1 - jax.lax.axis_index("tiles")  # the longest key ranges first
    row0 = qi * TILE_Q
    first, end = ranges_gmem[0, qi], ranges_gmem[1, qi]
    wg = jax.lax.axis_index("wg")

    def stage(j):
        return jax.lax.rem(j - first, b.num_stages)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        for w in range(COMPUTE_WGS):
            plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(row0 + w * BLOCK_Q, BLOCK_Q), h], q_smem.at[w], q_full)
        plgpu.copy_gmem_to_smem(starts_gmem.at[:, pl.ds(row0, TILE_Q)], starts_smem, q_full)

        @pl.loop(first, end)
        def _load(j):
            s = stage(j)
            reuse = j - first >= b.num_stages
            pl.when(reuse)(lambda: plgpu.barrier_wait(k_free.at[s]))
            plgpu.copy_gmem_to_smem(k_gmem.at[pl.ds(j * b.block_kv, b.block_kv), h], k_smem.at[s], k_full.at[s])
            pl.when(reuse)(lambda: plgpu.barrier_wait(v_free.at[s]))
            plgpu.copy_gmem_to_smem(v_gmem.at[pl.ds(j * b.block_kv, b.block_kv), h], v_smem.at[s], v_full.at[s])

        @pl.loop(jnp.maximum(first, end - b.num_stages), end)
        def _drain(j):  # the last stages' releases: every phase of a barrier is observed before the CTA ends
            plgpu.barrier_wait(k_free.at[stage(j)])
            plgpu.barrier_wait(v_free.at[stage(j)])

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_base = row0 + wg * BLOCK_Q
        latest_start = ranges_gmem[2 + wg, qi]
        rows = pl.ds(wg * BLOCK_Q, BLOCK_Q)
        q_rows = q_smem.at[wg]
        c = scale * math.log2(math.e)
        plgpu.barrier_wait(q_full)
        starts = layout(starts_smem[0, rows], ROW)

        # Ping-pong: a warpgroup issues its GEMMs only after the other has issued its own, then hands the turn
        # back, so one's softmax runs under the other's GEMMs (turn[w] completes when warpgroup w may issue).
        def my_turn():
            if b.ping_pong:
                plgpu.barrier_wait(turn.at[wg])

        def pass_turn():
            if b.ping_pong:
                plgpu.barrier_arrive(turn.at[1 - wg])

        def k_t(j):
            return k_smem.at[stage(j)].T

        def softmax(s, j, m_scale, m, l):
            """Block j's probabilities (bf16, relative to m_scale), the new m_scale, running max and row sum, and
            the factor O takes."""
            k_base = j * b.block_kv

            def masked():
                shape = (BLOCK_Q, b.block_kv)
                q_pos = q_base + iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                k_pos = k_base + iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                keep = (k_pos <= q_pos) & (k_pos >= jax.lax.broadcast_in_dim(starts, shape, (0,)))
                return jnp.where(keep, s, -jnp.inf)

            s = jax.lax.cond((k_base < latest_start) | (k_base + b.block_kv > q_base), masked, lambda: s)
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            valid = m_new != -jnp.inf  # a row whose keys all lie before its sequence start so far
            alpha = jnp.where(valid, jnp.exp2(m_scale - m_new), 1.0)
            rescale = alpha < threshold
            m_scale = jnp.where(rescale, m_new, m_scale)
            bcast = functools.partial(jax.lax.broadcast_in_dim, shape=s.shape, broadcast_dimensions=(0,))
            p = jnp.exp2(s * c - bcast(jnp.where(valid, m_scale, 0.0)))
            l = jnp.where(rescale, l * alpha, l) + p.sum(axis=1)
            return p.astype(v_gmem.dtype), m_scale, m_new, l, jnp.where(rescale, alpha, 1.0)

        def scores(j, then=None):
            """Issue S_j = Q K_j^T (and `then`, the previous block's PV), and return S_j once it alone is done."""
            def issue(s_acc):
                my_turn()
                plgpu.wgmma(s_acc, q_rows, k_t(j))
                if then is not None:
                    then()
                pass_turn()
                return plgpu.wgmma_accumulator_load(s_acc, wait_n=1 if then is not None and b.overlap else 0)

            plgpu.barrier_wait(k_full.at[stage(j)])
            s = pl.run_scoped(issue, plgpu.ACC((BLOCK_Q, b.block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[stage(j)])
            return s

        pl.when(wg == 1)(pass_turn)  # warpgroup 0 issues first
        neg_inf = layout(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), ROW)
        p, m_scale, m, l, _ = softmax(scores(first), first, neg_inf, neg_inf,
                                      layout(jnp.zeros((BLOCK_Q,), jnp.float32), ROW))
        o = layout(jnp.zeros((BLOCK_Q, v_dim), jnp.float32), plgpu.Layout.WGMMA)

        def block(j, carry):
            o, p, m_scale, m, l = carry

            def step(o_acc):
                def pv():
                    plgpu.barrier_wait(v_full.at[stage(j - 1)])
                    plgpu.wgmma(o_acc, p, v_smem.at[stage(j - 1)])

                return softmax(scores(j, then=pv), j, m_scale, m, l)

            o, (p, m_scale, m, l, alpha) = _accumulate(o, step, (p, m_scale, m, l, m), interpret)
            plgpu.barrier_arrive(v_free.at[stage(j - 1)])
            return o * jax.lax.broadcast_in_dim(alpha, o.shape, (0,)), p, m_scale, m, l

        o, p, m_scale, m, l = jax.lax.fori_loop(first + 1, end, block, (o, p, m_scale, m, l))

        def last_pv(o_acc):
            plgpu.barrier_wait(v_full.at[stage(end - 1)])
            my_turn()
            plgpu.wgmma(o_acc, p, v_smem.at[stage(end - 1)])
            pass_turn()
            return ()

        o, _ = _accumulate(o, last_pv, (), interpret)
        plgpu.barrier_arrive(v_free.at[stage(end - 1)])
        pl.when(wg == 0)(my_turn)  # observes warpgroup 1's last hand-back: every barrier phase is waited for
        out = o / jax.lax.broadcast_in_dim(l, o.shape, (0,))
        out_rows = o_smem.at[wg, pl.ds(0, BLOCK_Q)]  # within this warpgroup's Q bytes
        out_rows[...] = out.astype(out_gmem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_rows, out_gmem.at[pl.ds(q_base, BLOCK_Q), h])
        plgpu.wait_smem_to_gmem(0)


def _smem(shape, dtype):
    """A TMA/wgmma operand tile: 8-row tiles, the widest swizzle its rows take."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def mgpu_attention(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale: float, blocks: Blocks | None = None,
                   device: jax.Device | None = None, rescale_threshold: float = tk.RESCALE_THRESHOLD,
                   interpret: bool = False) -> jax.Array:
    """Causal attention within each packed sequence (`attention` module's contract); [T, H, V] in v's dtype.
    Shapes, dtypes, blocks and the device are checked when traced, before anything launches. `blocks` overrides
    the cached schedule (a sweep's); `rescale_threshold` 1.0 rescales at every change of a row's maximum;
    `interpret` runs it in Mosaic GPU's interpreter on any device (the CPU tests)."""
    device = device or jax.devices()[0]
    t, heads, qk_dim = q_THK.shape
    v_dim = v_THV.shape[2]
    b = blocks or blocks_for(t, qk_dim, v_dim, device.device_kind)
    tk.check_inputs(q_THK, k_THK, v_THV, segment_ids_T, positions_T, NAME,
                    functools.partial(check_head_dims, blocks=b))
    if not 0.0 < rescale_threshold <= 1.0:
        raise ValueError(f"{NAME}: rescale_threshold must be in (0, 1], got {rescale_threshold}")
    if not interpret:
        tk.check_device(device, "mgpu")
    del positions_T  # contiguous sequences: index order is position order within each
    pad = -t % math.lcm(TILE_Q, b.block_kv)  # whole query tiles and key blocks; the pad is one more sequence
    starts_T = tk.sequence_starts(jnp.pad(segment_ids_T, (0, pad), constant_values=-2) if pad else segment_ids_T)
    q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0))) if pad else a for a in (q_THK, k_THK, v_THV))
    num_tiles = (t + pad) // TILE_Q
    dtype = q.dtype
    q_and_out = (_smem((COMPUTE_WGS, BLOCK_Q, qk_dim), dtype), _smem((COMPUTE_WGS, BLOCK_Q * qk_dim // v_dim, v_dim),
                                                                     dtype))
    scratch = (q_and_out if interpret else plgpu.RefUnion(*q_and_out),  # the interpreter cannot alias
               plgpu.SMEM((1, TILE_Q), jnp.int32),
               _smem((b.num_stages, b.block_kv, qk_dim), dtype), _smem((b.num_stages, b.block_kv, v_dim), dtype),
               plgpu.Barrier(num_arrivals=COMPUTE_WGS + 1), plgpu.Barrier(num_barriers=b.num_stages),
               plgpu.Barrier(num_barriers=b.num_stages),
               plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=b.num_stages),
               plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=b.num_stages),
               plgpu.Barrier(num_barriers=COMPUTE_WGS))
    kernel = plgpu.kernel(
        functools.partial(_kernel, b=b, scale=scale, threshold=rescale_threshold, num_tiles=num_tiles,
                          interpret=interpret),
        out_type=jax.ShapeDtypeStruct((t + pad, heads, v_dim), dtype), scratch_types=scratch,
        grid=(num_tiles, heads), grid_names=("tiles", "heads"), num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True,
                                             lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None)
    out = kernel(q, k, v, starts_T[None], tile_ranges(starts_T, b.block_kv))
    return out[:t] if pad else out
