"""DEP dispatch: the all-to-alls that move each (token, choice) row to the rank owning its expert and back.

Every rank routes its tokens, sends every (token, choice) row to the rank owning the chosen expert (E/N
consecutive experts along the expert axis), runs one grouped GEMM over the experts it owns, and receives the
results back, where the routing-weighted sum over the K choices is taken. Dropless and exact: every buffer is
sized for the worst case (all T*K rows of every rank landing on one rank), no capacity factor.

Two dispatch backends move the rows (both exchange the per-(rank, expert) row counts first, with one small
all_to_all, so every MoE layer has three all-to-alls: counts, dispatch, combine):
- "dense": `jax.lax.all_to_all` of fixed [N, T*K, D] blocks, valid rows first in each block. Runs on every
  platform (CPU virtual devices included); moves the worst case every time.
- "ragged": `jax.lax.ragged_all_to_all`, which moves only the real rows and writes them straight into the
  owner's buffer grouped by local expert (no local permute). XLA:CPU has no kernel for it (checked in jax
  0.10.2: "HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so it is GPU/TPU only.
The default is "ragged" on GPU and "dense" elsewhere; the GPU default stands only as long as
experiments/bench_dep_dispatch.py measures it faster on the card at hand. Measured 2026-11-27, 4xH200 NV18,
jax 0.11.2, R1 width (D 7168, E 256, K 8, bf16), one layer's dispatch + combine: ragged 2.1-2.6x faster than
dense at 2K-16K tokens per rank with uniform routing, 1.5x with ranks filled 100%..60% and skewed routing.
Neither is near the NVLink floor: XLA's one-shot ragged kernel moves ~100 GB/s per rank off-rank (NCCL's
all_to_all ~340 GB/s, but dense moves N-fold more bytes); the NCCL send/recv fallback of ragged_all_to_all
(XLA flags) did not finish a 16K-token dispatch within 500 s there.

The functions here run per rank, inside `shard_map` over the mesh axis AXIS; `dep` builds the runtime on them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dwdp_jax.kernels import fp8_rows
from models.experts import ExpertSlab, combine, grouped_ffn_over_slabs, sort_by_expert, take_rows

AXIS = "ep"
DISPATCH_BACKENDS = ("dense", "ragged")
# Platforms with a ragged-all-to-all kernel (XLA:CPU has none in jax 0.10.2).
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """`jax.shard_map` (jax >= 0.7) or the experimental one of older releases. Replication is not checked:
    the per-rank program mixes replicated weights and per-rank data freely and is never differentiated."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def default_dispatch(platform: str) -> str:
    return "ragged" if platform in RAGGED_PLATFORMS else "dense"


# ---------------------------------------------------------------------------------------------------------------
# Row movement. A "segment" moves `size` consecutive rows from `src_start` to `dst_start`; the destination
# segments are given in ascending order, which lets one searchsorted find every destination row's segment.


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _move_segments(x_RD: jax.Array, sizes_G: jax.Array, src_start_G: jax.Array, dst_start_G: jax.Array,
                   num_rows: int) -> jax.Array:
    """[num_rows, D] with each segment's rows copied to its destination; uncovered rows are zero."""
    rows_Q = jnp.arange(num_rows, dtype=jnp.int32)
    seg_Q = jnp.searchsorted(dst_start_G + sizes_G, rows_Q, side="right")
    seg_Q = jnp.minimum(seg_Q, sizes_G.shape[0] - 1)
    inside_Q = (rows_Q >= dst_start_G[seg_Q]) & (rows_Q < dst_start_G[seg_Q] + sizes_G[seg_Q])
    src_Q = jnp.where(inside_Q, src_start_G[seg_Q] + rows_Q - dst_start_G[seg_Q], x_RD.shape[0])
    return take_rows(x_RD, src_Q)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """What a rank keeps between dispatch and combine.

    order_M: the (token, choice) rows sorted by global expert (padding last); row m is token order_M[m] // K.
    counts_NL: rows this rank sends to rank j's local expert l (its sorted rows are in this order).
    peer_counts: the counts exchanged with the peers, layout per backend (dense [S, L], ragged [S, N, L]).
    x_scale_SR: the received rows' `fp8.quantize_rows` scales when they were sent quantized (FP8 experts), else None.
    """

    order_M: jax.Array
    counts_NL: jax.Array
    peer_counts: jax.Array
    x_scale_SR: jax.Array | None = None


class DenseAllToAll:
    """Fixed-size blocks: rank j receives an [M, D] block from every rank (M = T*K, the worst case), valid
    rows first. The receiver regroups its N blocks by local expert for the grouped GEMM and back."""

    name = "dense"

    @staticmethod
    def exchange_counts(counts_NL: jax.Array) -> jax.Array:
        """[S, L]: rows each source sends to each of this rank's experts."""
        return jax.lax.all_to_all(counts_NL, AXIS, 0, 0, tiled=True)

    @staticmethod
    def local_group_sizes(peer_SL: jax.Array) -> jax.Array:
        return peer_SL.sum(0)

    @staticmethod
    def _grouped_layout(peer_SL: jax.Array, m: int):
        """Start of each (source, expert) run in the received blocks and in the expert-major grouped buffer."""
        n = peer_SL.shape[0]
        block_start_SL = (jnp.arange(n, dtype=jnp.int32) * m)[:, None] + _exclusive_cumsum(peer_SL, axis=1)
        grouped_start_SL = _exclusive_cumsum(peer_SL.T.reshape(-1)).reshape(peer_SL.T.shape).T
        return block_start_SL, grouped_start_SL

    def dispatch(self, x_sorted_MD: jax.Array, counts_NL: jax.Array, peer_SL: jax.Array,
                 receive_RD: jax.Array | None = None) -> jax.Array:
        del receive_RD  # the blocks are regrouped into a fresh buffer
        n = counts_NL.shape[0]
        m, d = x_sorted_MD.shape
        send_N = counts_NL.sum(1)
        send_NMD = _move_segments(x_sorted_MD, send_N, _exclusive_cumsum(send_N), jnp.arange(n) * m, n * m)
        recv_RD = jax.lax.all_to_all(send_NMD.reshape(n, m, d), AXIS, 0, 0, tiled=True).reshape(n * m, d)
        block_start_SL, grouped_start_SL = self._grouped_layout(peer_SL, m)
        # Destination segments in (expert, source) order: ascending in the grouped buffer.
        return _move_segments(recv_RD, peer_SL.T.reshape(-1), block_start_SL.T.reshape(-1),
                              grouped_start_SL.T.reshape(-1), n * m)

    def combine(self, y_grouped_RD: jax.Array, counts_NL: jax.Array, peer_SL: jax.Array,
                out_MD: jax.Array | None = None) -> jax.Array:
        del out_MD  # the blocks come back into a fresh buffer
        n = counts_NL.shape[0]
        m = y_grouped_RD.shape[0] // n
        d = y_grouped_RD.shape[1]
        block_start_SL, grouped_start_SL = self._grouped_layout(peer_SL, m)
        y_blocks_RD = _move_segments(y_grouped_RD, peer_SL.reshape(-1), grouped_start_SL.reshape(-1),
                                     block_start_SL.reshape(-1), n * m)
        back_RD = jax.lax.all_to_all(y_blocks_RD.reshape(n, m, d), AXIS, 0, 0, tiled=True).reshape(n * m, d)
        send_N = counts_NL.sum(1)
        return _move_segments(back_RD, send_N, jnp.arange(n) * m, _exclusive_cumsum(send_N), m)


@dataclasses.dataclass(frozen=True)
class RaggedAllToAll:
    """`ragged_all_to_all` with one slice per (destination, local expert): every rank knows every rank's
    counts, so each sender computes where its rows land in the owner's expert-major buffer, and the owner
    runs the grouped GEMM on what it received as is. Moves only the real rows.

    collective: the `jax.lax.ragged_all_to_all` signature (a CPU test substitutes an emulation); fill: a fresh
    buffer's rows past the received (sent) total (a test fills them with NaN)."""

    collective: Callable = jax.lax.ragged_all_to_all
    fill: float = 0.0
    name = "ragged"

    @staticmethod
    def exchange_counts(counts_NL: jax.Array) -> jax.Array:
        """[S, N, L]: every rank's counts (an all_to_all of this rank's counts repeated N times)."""
        n = counts_NL.shape[0]
        return jax.lax.all_to_all(jnp.broadcast_to(counts_NL, (n, *counts_NL.shape)), AXIS, 0, 0, tiled=True)

    @staticmethod
    def local_group_sizes(all_SNL: jax.Array) -> jax.Array:
        return all_SNL[:, jax.lax.axis_index(AXIS), :].sum(0)

    @staticmethod
    def _grouped_start_JLS(all_SNL: jax.Array) -> jax.Array:
        """Start of source s's rows for expert l in rank j's expert-major buffer."""
        n, _, l = all_SNL.shape
        return _exclusive_cumsum(all_SNL.transpose(1, 2, 0).reshape(n, l * n)).reshape(n, l, n)

    def dispatch(self, x_sorted_MD: jax.Array, counts_NL: jax.Array, all_SNL: jax.Array,
                 receive_RD: jax.Array | None = None) -> jax.Array:
        """Into `receive_RD` (an earlier layer's receive buffer, rows past this layer's total left as they were)
        or a fresh buffer of self.fill."""
        n = counts_NL.shape[0]
        m, d = x_sorted_MD.shape
        me = jax.lax.axis_index(AXIS)
        send_E = counts_NL.reshape(-1)
        if receive_RD is None:
            receive_RD = jnp.full((n * m, d), self.fill, x_sorted_MD.dtype)
        return self.collective(x_sorted_MD, receive_RD,
                               _exclusive_cumsum(send_E), send_E,
                               self._grouped_start_JLS(all_SNL)[:, :, me].reshape(-1),
                               all_SNL[:, me, :].reshape(-1), axis_name=AXIS)

    def combine(self, y_grouped_RD: jax.Array, counts_NL: jax.Array, all_SNL: jax.Array,
                out_MD: jax.Array | None = None) -> jax.Array:
        """Into `out_MD` (an earlier layer's combine output, rows past this layer's sent total left as they were)
        or a fresh buffer of self.fill."""
        n, l = counts_NL.shape
        m = y_grouped_RD.shape[0] // n
        me = jax.lax.axis_index(AXIS)
        # Where source s keeps its rows for my expert l: its sorted buffer is in global expert order.
        source_start_SL = _exclusive_cumsum(all_SNL.reshape(n, n * l)).reshape(n, n, l)[:, me, :]
        if out_MD is None:
            out_MD = jnp.full((m, y_grouped_RD.shape[1]), self.fill, y_grouped_RD.dtype)
        return self.collective(y_grouped_RD, out_MD,
                               self._grouped_start_JLS(all_SNL)[me].T.reshape(-1),
                               all_SNL[:, me, :].reshape(-1), source_start_SL.reshape(-1),
                               counts_NL.reshape(-1), axis_name=AXIS)


DISPATCHERS = {"dense": DenseAllToAll(), "ragged": RaggedAllToAll()}


# ---------------------------------------------------------------------------------------------------------------
# The three MoE stages, per rank (inside shard_map). The fast path composes them in one program; the profiled
# path runs each as its own program.


def dispatch_tokens(x_TD: jax.Array, ids_TK: jax.Array, valid_T: jax.Array | None, num_experts: int,
                    dispatcher, receive: ReceiveBuffer | None = None,
                    quantize: bool = False) -> tuple[jax.Array, DispatchPlan]:
    """Sorts the rows by expert and sends each to its owner; returns the owner-side expert-major buffer
    [N*M, D] (rows past the received total are not read: zero, or with `receive` its earlier rows, the buffer
    it then holds) and the plan. `quantize` (FP8 experts on a split backend, `experts.quantizes_tokens`): each
    token is quantized once before it is sent, as DeepEP's FP8 dispatch does: the rows travel as e4m3 (as bytes:
    collectives take no float8 type everywhere) with their fp32 scales (D/128 per row), about half of bf16's
    bytes, and the owner's kernel takes them as they come."""
    n = jax.lax.axis_size(AXIS)
    k = ids_TK.shape[1]
    with jax.named_scope("dispatch"):
        order_M, group_sizes_E = sort_by_expert(ids_TK, num_experts, valid_T)
        counts_NL = group_sizes_E.reshape(n, num_experts // n)
        peer_counts = dispatcher.exchange_counts(counts_NL)
        token_M = order_M // k
        scale_SR = None
        if quantize:
            x_TD, scale_ST = fp8_rows.quantize_rows(x_TD)
            scale_RS = dispatcher.dispatch(scale_ST.T[token_M], counts_NL, peer_counts,
                                           receive.scales_RS if receive else None)
            if receive is not None:
                receive.scales_RS = scale_RS
            scale_SR = scale_RS.T
        rows_MD = x_TD[token_M]
        sent_MD = jax.lax.bitcast_convert_type(rows_MD, jnp.uint8) if quantize else rows_MD
        x_grouped_RD = dispatcher.dispatch(sent_MD, counts_NL, peer_counts, receive.rows_RD if receive else None)
        if receive is not None:
            receive.rows_RD = x_grouped_RD
        if quantize:
            x_grouped_RD = jax.lax.bitcast_convert_type(x_grouped_RD, rows_MD.dtype)
    return x_grouped_RD, DispatchPlan(order_M, counts_NL, peer_counts, scale_SR)


def expert_ffn(x_grouped_RD: jax.Array, plan: DispatchPlan, slab: ExpertSlab, backend: str, dispatcher,
               out_dtype=None) -> jax.Array:
    """The grouped GEMM over this rank's own experts, ids local to the slab (its start is 0); rows sent quantized
    (`plan.x_scale_SR`) give their output in `out_dtype` (the model's)."""
    with jax.named_scope("moe_gmm"):
        return grouped_ffn_over_slabs(x_grouped_RD, dispatcher.local_group_sizes(plan.peer_counts), (slab,), backend,
                                      x_scale_SM=plan.x_scale_SR, out_dtype=out_dtype)


def combine_tokens(y_grouped_RD: jax.Array, plan: DispatchPlan, weights_TK: jax.Array, dispatcher,
                   valid_T: jax.Array | None = None, receive: ReceiveBuffer | None = None) -> jax.Array:
    """Sends the expert outputs back to their tokens' ranks and takes the routing-weighted sum over K; padding
    tokens (not `valid_T`) get zero. With `receive`, the rows come back into its combine buffer."""
    with jax.named_scope("combine"):
        y_sorted_MD = dispatcher.combine(y_grouped_RD, plan.counts_NL, plan.peer_counts,
                                         receive.combined_MD if receive else None)
        if receive is not None:
            receive.combined_MD = y_sorted_MD
        y_TD = combine(y_sorted_MD, plan.order_M, weights_TK)
        # padding tokens' rows lie past the sent total: stale rows of a threaded buffer
        return y_TD if valid_T is None else jnp.where(valid_T[:, None], y_TD, 0).astype(y_TD.dtype)


class ReceiveBuffer:
    """The all-to-all output buffers threaded through the MoE layers of one traced step: the dispatch's receive
    buffer and the combine's output.

    XLA:GPU (jax 0.11.2) gives every ragged_all_to_all output its own collective-memory buffer, never shared
    between layers: DEP4 at T 32768 grew by the [N*T*K, D] worst case (14 GiB) per MoE layer on 4x H200, and by the
    combine's [T*K, D] (3.5 GiB) per layer after the receive buffer was threaded (DEP2). Writing each layer's rows
    into the previous layer's buffer keeps one (measured for the receive buffer on a 3-layer probe: 3.0 -> 1.0 GiB,
    same speed). Rows past a layer's received (sent) total then hold an earlier layer's rows; nothing reads them:
    the grouped GEMM covers the received groups, the combine sends back only those rows, and the tokens whose rows
    lie past the sent total are padding, whose MoE output is zeroed (`combine_tokens`)."""

    def __init__(self):
        self.rows_RD: jax.Array | None = None
        self.scales_RS: jax.Array | None = None  # the rows' scales, when they are sent quantized
        self.combined_MD: jax.Array | None = None

