"""The context servers as processes of the engine: DWDP ranks and DEP groups taking work from the serving scheduler.

Why the serving scheduler itself: the simulator must batch exactly as the runtimes do (dwdp_jax.serving.scheduler),
so a simulated run and a served run of one workload differ only in time, never in who ran what. The scheduler decides
who runs what; this module decides when: a DWDP rank runs its layers alone, waiting only for its own prefetch, a DEP
group pays a barrier at every MoE layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dwdp_jax.serving.scheduler import Batch, DepScheduler, DwdpScheduler
from dwdp_jax.serving.workload import Request
from dwdp_jax.sim import roofline
from dwdp_jax.sim.config import ContextConfig
from dwdp_jax.sim.engine import Engine, Process
from dwdp_jax.sim.hardware import HardwareSpec
from dwdp_jax.sim.pulls import CopyStream, PullStats
from dwdp_jax.sim.roofline import Precision, PrefillTimes
from models.config import ModelConfig


@dataclasses.dataclass
class RequestRecord:
    id: int
    input_len: int
    arrival_s: float
    start_s: float = math.nan
    prefill_end_s: float = math.nan
    gen_start_s: float = math.nan
    end_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        return self.prefill_end_s - self.arrival_s


@dataclasses.dataclass
class IterationRecord:
    """One context step: a DWDP rank's batch, or a DEP group's step (then rank_tokens / rank_busy_s per rank)."""

    server: int  # DWDP: global rank; DEP: group
    start_s: float
    end_s: float
    rank_tokens: list[int]
    rank_busy_s: list[float]
    exposed_wait_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def sync_overhead(self) -> float:
        return 1.0 - float(np.mean(self.rank_busy_s)) / self.duration_s

    @property
    def token_cv(self) -> float:
        t = np.asarray(self.rank_tokens, dtype=np.float64)
        return float(t.std() / t.mean()) if t.mean() > 0 else math.nan


class RequestQueue:
    """The scheduler every context server of a run takes from, and the waiting of idle servers.

    One scheduler over a window of `group_size` ranks, shared by all groups (ideal load balancing): a DWDP rank fills
    its batch with `next_batch` (as rank `rank % group_size` of the window), a DEP group takes a step with `next_step`.
    A server that finds nothing waits; waiters are woken (in the order they came) when the next pending request
    arrives, or when a request is submitted later (a closed-loop client), after every request of that instant.
    The scheduler's clock never goes back: a generation server's completion time can land an ulp before the instant
    that scheduled it, and a request released then has still arrived.
    """

    def __init__(self, engine: Engine, ctx: ContextConfig, requests: Sequence[Request], later: int = 0):
        self._engine, self._group_size = engine, ctx.group_size
        limits = dict(num_ranks=ctx.group_size, max_num_tokens=ctx.max_num_tokens, max_batch_size=ctx.max_batch_size)
        self.scheduler = (DwdpScheduler(requests, packing=ctx.packing, **limits) if ctx.strategy == "dwdp"
                          else DepScheduler(requests, **limits))
        self._later = later  # requests still to be submitted
        self._waiters: list[Callable[[], None]] = []
        self._wake_at_s: float | None = None
        self._clock_s = 0.0

    def _now_s(self) -> float:
        self._clock_s = max(self._clock_s, self._engine.now_s)
        return self._clock_s

    @property
    def done(self) -> bool:
        """Every request handed out and none to come."""
        return not self._later and self.scheduler.drained

    def submit(self, request: Request) -> None:
        """Queues `request`, arriving now."""
        self.scheduler.submit(dataclasses.replace(request, arrival_s=self._now_s()))
        self._later -= 1
        self._wake()

    def take_dwdp(self, rank: int) -> Batch | None:
        return self.scheduler.next_batch(rank % self._group_size, self._now_s())

    def take_dep(self) -> list[Batch] | None:
        return self.scheduler.next_step(self._now_s())

    def wait(self, wake: Callable[[], None]) -> bool:
        """A "wait" command's register: True (no wait) when a request has arrived or none will come."""
        head_s = self.scheduler.next_arrival_s()
        if self.done or (head_s is not None and head_s <= self._now_s()):
            return True
        self._waiters.append(wake)
        if head_s is not None and head_s != self._wake_at_s:
            self._wake_at_s = head_s
            self._engine.at(head_s, self._wake)
        return False

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            self._engine.at(self._engine.now_s, wake)


@dataclasses.dataclass
class Run:
    """Everything one simulation shares: model, hardware, config, the queue and the records."""

    cfg: ModelConfig
    hw: HardwareSpec
    ctx: ContextConfig
    engine: Engine
    queue: RequestQueue
    lengths: np.ndarray
    requests: list[RequestRecord]
    iterations: list[IterationRecord]
    on_prefill_done: Callable[[int], None]
    times_cache: dict = dataclasses.field(default_factory=dict)

    def times(self, rids: Sequence[int], padded_tokens: int | None = None) -> PrefillTimes:
        """Roofline times of a batch (run at `padded_tokens` if given), cached by its sorted lengths."""
        key = (tuple(sorted(int(self.lengths[r]) for r in rids)), padded_tokens)
        if key not in self.times_cache:
            self.times_cache[key] = roofline.prefill_times(self.cfg, self.hw, key[0], self.ctx.precision,
                                                           padded_tokens)
        return self.times_cache[key]

    def tokens(self, rids: Sequence[int]) -> int:
        return int(sum(self.lengths[r] for r in rids))

    def start(self, rids: Sequence[int]) -> None:
        for r in rids:
            self.requests[r].start_s = self.engine.now_s

    def finish(self, batches: Sequence[Batch]) -> None:
        for batch in batches:
            self.queue.scheduler.complete(batch)
            for r in batch.request_ids:
                self.requests[r].prefill_end_s = self.engine.now_s
                self.on_prefill_done(r)


def _dwdp_rank(run: Run, rank: int, copy: CopyStream) -> Iterator:
    m = run.cfg.num_moe_layers
    mid = run.ctx.pull_issue == "after_attention"
    slow_attention, slow_other = run.ctx.slowdowns
    while True:
        batch = run.queue.take_dwdp(rank)
        if batch is None:
            if run.queue.done:
                return
            yield ("wait", run.queue.wait)
            continue
        rids = batch.request_ids
        run.start(rids)
        start_s, waited_s = run.engine.now_s, 0.0
        tokens = run.tokens(rids)
        t = run.times(rids, run.ctx.padded(tokens))
        ahead = 1 if mid else 2  # the layer a MoE layer's issue prefetches, counted from it
        copy.start_step(m, ahead)
        k = run.cfg.first_k_dense_replace
        for _ in range(k):
            yield ("compute", rank, t.attention_s, slow_attention)
            yield ("compute", rank, t.dense_s / k - t.attention_s, slow_other)
        for layer in range(m):
            yield ("compute", rank, t.attention_s, slow_attention)
            if mid and layer + ahead < m:
                copy.enqueue(layer + ahead)
            yield ("compute", rank, t.pre_moe_s - t.attention_s, slow_other)
            wait_from_s = run.engine.now_s
            yield ("wait", copy.waiter_for(layer))
            waited_s += run.engine.now_s - wait_from_s
            yield ("compute", rank, t.routed_s, slow_other)
            if not mid and layer + ahead < m:
                copy.enqueue(layer + ahead)
        yield ("compute", rank, t.head_s, slow_other)
        busy_s = run.engine.now_s - start_s - waited_s
        run.iterations.append(IterationRecord(rank, start_s, run.engine.now_s, [tokens], [busy_s], waited_s))
        run.finish([batch])


_IDLE = PrefillTimes(0.0, 0.0, 0.0, 0.0)


def dep_step(cfg: ModelConfig, hw: HardwareSpec, rank_times: Sequence[PrefillTimes], rank_tokens: Sequence[int],
             prec: Precision) -> tuple[float, np.ndarray]:
    """A DEP step with a barrier at every MoE layer: (step time, each rank's own busy time [ranks])."""
    n, m = len(rank_tokens), cfg.num_moe_layers
    dense = np.array([t.dense_s for t in rank_times])
    pre = np.array([t.pre_moe_s for t in rank_times])
    head = np.array([t.head_s for t in rank_times])
    if m == 0:
        return float(np.max(dense + head)), dense + head
    routed = roofline.dep_routed_s(cfg, hw, float(sum(rank_tokens)), n, prec)
    a2a_s, a2a_busy = roofline.dep_all_to_all_s(cfg, hw, rank_tokens, prec)
    step_s = float(np.max(dense + pre) + (m - 1) * np.max(pre) + m * (routed + a2a_s) + np.max(head))
    busy_s = dense + head + m * (pre + routed + a2a_busy)
    return step_s, busy_s


def _dep_group(run: Run, group: int) -> Iterator:
    while True:
        batches = run.queue.take_dep()
        if batches is None:
            if run.queue.done:
                return
            yield ("wait", run.queue.wait)
            continue
        placed = [b.request_ids for b in batches]
        rids = [r for rs in placed for r in rs]
        run.start(rids)
        start_s = run.engine.now_s
        tokens = [run.tokens(rs) for rs in placed]
        padded = run.ctx.padded(max(tokens))  # an idle rank runs the step's shape too
        times = [run.times(rs, padded) if rs or padded else _IDLE for rs in placed]
        step_s, busy_s = dep_step(run.cfg, run.hw, times, tokens, run.ctx.precision)
        yield ("sleep", step_s)
        run.iterations.append(IterationRecord(group, start_s, run.engine.now_s, tokens, busy_s.tolist()))
        run.finish(batches)


def start_context_servers(run: Run, stats: PullStats) -> None:
    """Every context server of the run as a process from t = 0: a DEP group each, or a DWDP rank each with its
    prefetch stream (peer orders drawn from one generator, by rank)."""
    ctx, engine = run.ctx, run.engine
    if ctx.strategy == "dep":
        for g in range(ctx.num_groups):
            engine.at(0.0, Process(engine, _dep_group(run, g)).resume)
        return
    placement = ctx.placement(run.cfg)
    expert_bytes = roofline.expert_bytes(run.cfg, ctx.precision)
    rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, 2]))
    for g in range(ctx.num_groups):
        for r in range(ctx.group_size):
            rank = g * ctx.group_size + r
            copy = CopyStream(engine, rank, g * ctx.group_size, placement.pulls(r), expert_bytes, ctx, rng, stats)
            engine.at(0.0, Process(engine, _dwdp_rank(run, rank, copy)).resume)
