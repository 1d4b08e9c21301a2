"""Discrete-event simulator of DWDP and DEP context servers, alone or in disaggregated serving with generation servers.

Why: the roofline (roofline.py) assumes perfect balance and no contention. What DWDP actually buys is robustness to
imbalance (DEP ranks wait for the slowest at every MoE layer) at the price of copy-engine contention (asynchronous
pulls collide at a source). Both effects, and the serving consequences (TPS/GPU, TTFT with queueing, how many
context GPUs a TTFT target needs), need a timeline, not a formula. Per-operator times come from the roofline.

Model
- Requests (workload.py) enter one FCFS queue shared by all context servers (ideal load balancing).
- DEP: each group of N ranks takes a step when free: the FCFS prefix fitting N x (max_num_tokens, max_batch_size),
  placed head-first then longest-first onto the least-loaded rank with room (LPT, as dwdp_jax.serving.scheduler).
  Every MoE layer is a barrier: the step pays, per layer, the slowest rank's attention, the balanced routed experts
  and the slowest rank of each all-to-all. A rank's own work (compute and its own transfers) over the step time is
  its utilization; 1 - its mean over ranks is the synchronization overhead.
- DWDP: each rank takes its own FCFS batch (max_num_tokens, max_batch_size) whenever it is free and runs alone:
  dense layers, then per MoE layer attention + router + shared expert, a wait for its own prefetch of that layer, the
  routed experts with all E experts, then the issue of the prefetch two layers ahead (double buffer, write-after-
  read); the first two MoE layers are primed at the step start. With `pull_issue="after_attention"` (the engine's
  option of that name) the prefetch of the next layer is issued right after each MoE layer's attention instead,
  and only the first MoE layer is primed. Its pulls are flows on a fluid network: each source
  has `egress` bytes/s for all its readers, each destination `ingress`, each flow at most one copy stream's rate,
  under a source discipline:
    fifo         serial pulls (one per owner, whole shards, in `peer_order`); a source copy engine serves one pull at
                 a time, first come first served: the paper's baseline, where a pull at contention C takes ~C tau.
    round_robin  sliced pulls interleaved over all peers (paper Listing 1); a source serves its pending destinations
                 round-robin, slice by slice, whose fluid limit is max-min fair sharing; each slice costs
                 `slice_overhead_s` of copy-engine time on top of slice_bytes / rate.
    none         serial pulls with no source limit: the open-loop premise of the paper's contention model (used to
                 check Table 2; contention is counted, never paid).
  While a rank has a pull moving data into it, its compute runs `compute_slowdown` slower (paper Appendix A: power
  and clocks, not bandwidth), its attention `attention_slowdown` slower (default: the same).
- Static shapes (`token_buckets`, as dwdp_jax.bench runs): a batch's per-token GEMMs run over its padding to the
  next bucket (a DWDP rank's own batch, a DEP step's fullest rank for every rank); attention cores and routed
  experts skip it. None (default): a batch costs its tokens, as in a runtime without static shapes.
- Contention level of a pulling rank at an instant: the number of pulls (queued or moving) at the source it is
  reading. Its distribution is time-weighted over every pulling rank ("a rank's source at a random time", the
  premise of the paper's model), which is robust to ranks whose pull boundaries stay aligned.
- Disaggregated serving (closed loop, as benchmark_serving with a concurrency): `concurrency` requests in flight;
  a request is prefilled by the context servers (TTFT = prefill end - release, queueing included), then decoded by
  the least-loaded generation server with room; its generation rate depends on how many requests that server holds
  (roofline.decode_step_s); when it finishes, the next request is released. KV transfer is not modelled.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dwdp_jax.placement import Placement
from dwdp_jax.sim import roofline
from dwdp_jax.sim.hardware import HardwareSpec
from dwdp_jax.sim.roofline import GenServer, Precision, PrefillTimes
from dwdp_jax.sim.workload import Workload, arrival_times_s, input_lengths
from models.config import ModelConfig

STRATEGIES = ("dep", "dwdp")
DISCIPLINES = ("fifo", "round_robin", "none")
PEER_ORDERS = ("random", "rank")
PACKINGS = ("lookahead", "fcfs")
PULL_ISSUES = ("after_moe", "after_attention")  # as dwdp_jax.runtime.dwdp.PULL_ISSUES
_REL_EPS = 1e-12  # a job this close to done (relative to its size) is done


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Context servers of one strategy: `num_groups` groups of `group_size` GPUs (DEP servers or DWDP groups)."""

    strategy: str
    group_size: int = 4
    num_groups: int = 1
    local_experts: int | None = None  # DWDP L; None: the least redundant valid placement
    max_num_tokens: int = 32768
    max_batch_size: int = 64
    discipline: str = "fifo"
    slice_bytes: int = 1 << 20
    slice_overhead_s: float = 0.2e-6  # assumed copy-engine cost per slice; to be measured by the sliced transport
    peer_order: str = "random"
    packing: str = "lookahead"  # DWDP's batch filling (serving.scheduler.DwdpScheduler.PACKINGS)
    compute_slowdown: float = 0.0
    attention_slowdown: float | None = None  # None: compute_slowdown
    pull_issue: str = "after_moe"
    # None: a batch costs its tokens (a runtime without static shapes, as the paper's); k: batches pad to the next
    # multiple of max_num_tokens / k (dwdp_jax.bench.token_buckets), DWDP ranks each to their own batch's, DEP ranks
    # all to their fullest rank's (one SPMD step)
    token_buckets: int | None = None
    precision: Precision = Precision()
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ContextConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.discipline not in DISCIPLINES:
            raise ValueError(f"ContextConfig.discipline must be one of {DISCIPLINES}, got {self.discipline!r}")
        if self.peer_order not in PEER_ORDERS:
            raise ValueError(f"ContextConfig.peer_order must be one of {PEER_ORDERS}, got {self.peer_order!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"ContextConfig.packing must be one of {PACKINGS}, got {self.packing!r}")
        for name in ("group_size", "num_groups", "max_num_tokens", "max_batch_size", "slice_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "dwdp" and self.group_size < 2:
            raise ValueError(f"ContextConfig.group_size must be >= 2 for DWDP, got {self.group_size}")
        if self.pull_issue not in PULL_ISSUES:
            raise ValueError(f"ContextConfig.pull_issue must be one of {PULL_ISSUES}, got {self.pull_issue!r}")
        if self.token_buckets is not None and not (self.token_buckets >= 1
                                                   and self.max_num_tokens % self.token_buckets == 0):
            raise ValueError(f"ContextConfig.token_buckets must be None or >= 1 and divide max_num_tokens="
                             f"{self.max_num_tokens}, got {self.token_buckets}")
        for name in ("slice_overhead_s", "compute_slowdown", "attention_slowdown"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"ContextConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def slowdowns(self) -> tuple[float, float]:
        """(attention, other compute) slowdown while the rank pulls."""
        attention = self.compute_slowdown if self.attention_slowdown is None else self.attention_slowdown
        return attention, self.compute_slowdown

    @property
    def num_gpus(self) -> int:
        return self.group_size * self.num_groups

    def padded(self, tokens: int) -> int | None:
        """The static token count a batch of `tokens` runs at (None: no padding)."""
        if self.token_buckets is None:
            return None
        step = self.max_num_tokens // self.token_buckets
        return -(-tokens // step) * step

    def placement(self, cfg: ModelConfig) -> Placement:
        return Placement.for_group(cfg.n_routed_experts, self.group_size, self.local_experts)


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


# ---------------------------------------------------------------------------------------------------------------------
# The fluid discrete-event engine: timers, and jobs (compute or pulls) progressing at piecewise-constant rates.


class _Job:
    __slots__ = ("rank", "source", "group", "remaining", "initial", "t_ref", "rate", "version", "seq", "on_done",
                 "slowdown")

    def __init__(self, rank: int, source: int | None, group: int, amount: float, on_done: Callable[[], None],
                 seq: int, now_s: float, slowdown: float = 0.0):
        self.rank, self.source, self.group, self.on_done, self.seq = rank, source, group, on_done, seq
        self.slowdown = slowdown  # compute jobs: how much slower while their rank pulls
        self.remaining = self.initial = amount
        self.t_ref, self.rate, self.version = now_s, 0.0, 0


class _Engine:
    """Time, a timer heap and running jobs: compute jobs (source None) hold seconds of nominal compute, pull jobs
    bytes. Jobs interact only within their group (group = rank // group_size), so when a group's job set changes only
    that group's rates are recomputed (`rates(jobs)`); a job's remaining amount is settled lazily when its rate
    changes, and its projected finish sits in a heap (stale entries are skipped by version). `on_change(group, jobs)`
    hooks see a group's job set just before it changes."""

    def __init__(self, rates: Callable[[list[_Job]], None], group_size: int, fixed_compute: bool):
        self.fixed_compute = fixed_compute  # compute never slows down: run it as timers, not jobs
        self.now_s = 0.0
        self._timers: list = []
        self._finish: list = []
        self._groups: dict[int, list[_Job]] = collections.defaultdict(list)
        self._dirty: set[int] = set()
        self._seq = 0
        self._rates, self._group_size = rates, group_size
        self.on_change: list[Callable[[int, list[_Job]], None]] = []

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def at(self, time_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time_s, self._next_seq(), fn))

    def add_job(self, rank: int, source: int | None, amount: float, on_done: Callable[[], None],
                slowdown: float = 0.0) -> None:
        group = rank // self._group_size
        self._changing(group)
        self._groups[group].append(_Job(rank, source, group, amount, on_done, self._next_seq(), self.now_s, slowdown))

    def _changing(self, group: int) -> None:
        for hook in self.on_change:
            hook(group, self._groups[group])
        self._dirty.add(group)

    def _rerate(self, group: int) -> None:
        jobs = self._groups[group]
        old = [j.rate for j in jobs]
        self._rates(jobs)
        for job, rate in zip(jobs, old):
            if job.rate == rate and job.version:
                continue
            job.remaining -= rate * (self.now_s - job.t_ref)
            job.t_ref = self.now_s
            job.version += 1
            if job.rate > 0:
                left = job.remaining if job.remaining > _REL_EPS * job.initial else 0.0
                heapq.heappush(self._finish, (self.now_s + left / job.rate, job.seq, job.version, job))

    def run(self) -> None:
        while True:
            for group in self._dirty:
                self._rerate(group)
            self._dirty.clear()
            while self._finish and self._finish[0][2] != self._finish[0][3].version:
                heapq.heappop(self._finish)
            t_job = self._finish[0][0] if self._finish else math.inf
            t_timer = self._timers[0][0] if self._timers else math.inf
            if t_job == t_timer == math.inf:
                if any(self._groups.values()):
                    raise RuntimeError("simulator deadlock: jobs remain but none can progress")
                return
            if t_job <= t_timer:
                self.now_s = t_job
                self._complete(heapq.heappop(self._finish)[3])
            else:
                self.now_s = t_timer
                heapq.heappop(self._timers)[2]()

    def _complete(self, job: _Job) -> None:
        self._changing(job.group)
        self._groups[job.group].remove(job)
        job.version += 1
        job.on_done()


class _Process:
    """A generator of commands driven by the engine: ("compute", rank, seconds, slowdown while pulling),
    ("sleep", seconds), ("wait", register) where register(resume) arranges for resume() to be called later, or
    returns True when the condition already holds."""

    def __init__(self, engine: _Engine, gen: Iterator):
        self._engine, self._gen = engine, gen

    def resume(self) -> None:
        while True:
            try:
                cmd = next(self._gen)
            except StopIteration:
                return
            if self._block(cmd):
                return

    def _block(self, cmd) -> bool:
        kind = cmd[0]
        if kind in ("compute", "sleep"):
            seconds = cmd[2] if kind == "compute" else cmd[1]
            if seconds <= 0:
                return False
            if kind == "compute" and not self._engine.fixed_compute:
                self._engine.add_job(cmd[1], None, seconds, self.resume, cmd[3])
            else:
                self._engine.at(self._engine.now_s + seconds, self.resume)
            return True
        return not cmd[1](self.resume)


# ---------------------------------------------------------------------------------------------------------------------
# Pull-rate disciplines.


def _max_min_rates(flows: list[_Job], flow_cap: float, src_cap: float, dst_cap: float) -> None:
    """Max-min fair rates (progressive filling) with a per-flow cap and per-source / per-destination capacities."""
    for f in flows:
        f.rate = 0.0
    active = list(flows)
    src_left = collections.defaultdict(lambda: src_cap)
    dst_left = collections.defaultdict(lambda: dst_cap)
    level = 0.0
    while active:
        on_src = collections.Counter(f.source for f in active)
        on_dst = collections.Counter(f.rank for f in active)
        step = min([flow_cap - level] + [src_left[s] / k for s, k in on_src.items()]
                   + [dst_left[d] / k for d, k in on_dst.items()])
        level += step
        for s, k in on_src.items():
            src_left[s] -= step * k
        for d, k in on_dst.items():
            dst_left[d] -= step * k
        for f in active:
            f.rate = level
        tight = 1e-9 * flow_cap
        active = [f for f in active if level < flow_cap - tight and src_left[f.source] > tight
                  and dst_left[f.rank] > tight]


def _rates_fn(hw: HardwareSpec, ctx: ContextConfig) -> Callable[[list[_Job]], None]:
    single = min(hw.copy_bytes_per_s, hw.egress, hw.ingress)
    unlimited = min(hw.copy_bytes_per_s, hw.ingress)
    slice_s = ctx.slice_bytes / hw.copy_bytes_per_s
    efficiency = slice_s / (slice_s + ctx.slice_overhead_s)

    def rates(jobs: list[_Job]) -> None:
        flows = [j for j in jobs if j.source is not None]
        if ctx.discipline == "none":
            for f in flows:
                f.rate = unlimited
        elif ctx.discipline == "fifo":
            head = {}
            for f in flows:
                if f.source not in head or f.seq < head[f.source].seq:
                    head[f.source] = f
            for f in flows:
                f.rate = single if head[f.source] is f else 0.0
        else:
            _max_min_rates(flows, hw.copy_bytes_per_s * efficiency, hw.egress * efficiency, hw.ingress * efficiency)
        pulling = {f.rank for f in flows if f.rate > 0}
        for j in jobs:
            if j.source is None:
                j.rate = 1.0 / (1.0 + j.slowdown) if j.rank in pulling else 1.0
    return rates


# ---------------------------------------------------------------------------------------------------------------------
# The request queue shared by the context servers.


class _Queue:
    """FCFS requests that have arrived; idle servers register to be woken (at the same instant, after every arrival of
    that instant has been pushed) when new requests come."""

    def __init__(self, engine: _Engine, lengths: np.ndarray, ctx: ContextConfig):
        self._engine, self._lengths, self._ctx = engine, lengths, ctx
        self._pending: collections.deque[int] = collections.deque()
        self._waiters: list[Callable[[], None]] = []
        self.closed = False  # no more arrivals will come

    def push(self, rid: int) -> None:
        self._pending.append(rid)
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            self._engine.at(self._engine.now_s, wake)

    def close(self) -> None:
        self.closed = True
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            self._engine.at(self._engine.now_s, wake)

    def wait(self, wake: Callable[[], None]) -> bool:
        """A "wait" command's register: True (no wait) when work is pending or no more will come."""
        if self._pending or self.closed:
            return True
        self._waiters.append(wake)
        return False

    def _take_fcfs(self, max_tokens: int, max_count: int) -> list[int]:
        taken, tokens = [], 0
        while self._pending and len(taken) < max_count and tokens + self._lengths[self._pending[0]] <= max_tokens:
            tokens += self._lengths[self._pending[0]]
            taken.append(self._pending.popleft())
        return taken

    def take_dwdp(self) -> list[int]:
        """One rank's batch: the strict FCFS prefix, or (lookahead) the window of `take_dep` placed onto one rank."""
        if self._ctx.packing == "fcfs":
            return self._take_fcfs(self._ctx.max_num_tokens, self._ctx.max_batch_size)
        placed = self._place(1)
        return placed[0] if placed else []

    def take_dep(self) -> list[list[int]]:
        return self._place(self._ctx.group_size)

    def _place(self, num_ranks: int) -> list[list[int]]:
        """Per-rank request lists from the FCFS prefix fitting group_size x (MNT, batch size): head first, then
        longest-first onto the least-loaded rank with room; requests that fit nowhere go back to the queue front in
        order (serving.scheduler.place)."""
        n, mnt, mbs = num_ranks, self._ctx.max_num_tokens, self._ctx.max_batch_size
        candidates = self._take_fcfs(self._ctx.group_size * mnt, self._ctx.group_size * mbs)
        if not candidates:
            return []
        order = {rid: i for i, rid in enumerate(candidates)}
        rest = sorted(candidates[1:], key=lambda rid: -self._lengths[rid])
        placed, tokens, deferred = [[] for _ in range(n)], [0] * n, []
        for rid in [candidates[0], *rest]:
            fits = [r for r in range(n) if len(placed[r]) < mbs and tokens[r] + self._lengths[rid] <= mnt]
            if not fits:
                deferred.append(rid)
                continue
            rank = min(fits, key=lambda r: (tokens[r], r))
            placed[rank].append(rid)
            tokens[rank] += self._lengths[rid]
        self._pending.extendleft(sorted(deferred, key=order.get, reverse=True))
        return [sorted(rs, key=order.get) for rs in placed]


# ---------------------------------------------------------------------------------------------------------------------
# DWDP copy streams and context servers.


class _CopyStream:
    """A DWDP rank's prefetch stream: layers in issue order, each layer one pull per owner (serial, or all at once
    when sliced round-robin); tracks completion per layer of the current step and each layer's duration."""

    def __init__(self, engine: _Engine, rank: int, group_base: int, pulls: Sequence, expert_bytes: float,
                 ctx: ContextConfig, rng: np.random.Generator, stats: "_PullStats"):
        self._engine, self._rank, self._base = engine, rank, group_base
        self._pulls = [(p.owner, p.count * expert_bytes) for p in pulls]
        self._ctx, self._rng, self._stats = ctx, rng, stats
        self._queue: collections.deque[int] = collections.deque()
        self._busy = False
        self._done: set[int] = set()
        self._waiter: tuple[int, Callable[[], None]] | None = None

    def start_step(self, num_moe_layers: int, primed: int) -> None:
        self._done.clear()
        for layer in range(min(primed, num_moe_layers)):
            self.enqueue(layer)

    def enqueue(self, layer: int) -> None:
        self._queue.append(layer)
        if not self._busy:
            self._next_layer()

    def waiter_for(self, layer: int) -> Callable[[Callable[[], None]], bool]:
        def register(resume: Callable[[], None]) -> bool:
            if layer in self._done:
                return True
            self._waiter = (layer, resume)
            return False
        return register

    def _next_layer(self) -> None:
        if not self._queue:
            self._busy = False
            return
        self._busy = True
        layer = self._queue.popleft()
        order = self._rng.permutation(len(self._pulls)) if self._ctx.peer_order == "random" else range(len(self._pulls))
        pulls = [self._pulls[i] for i in order]
        started_s = self._engine.now_s
        if self._ctx.discipline == "round_robin":
            left = [len(pulls)]

            def one_done():
                left[0] -= 1
                if not left[0]:
                    self._layer_done(layer, started_s)
            for owner, nbytes in pulls:
                self._issue(owner, nbytes, one_done)
        else:
            self._serial(layer, pulls, 0, started_s)

    def _serial(self, layer: int, pulls: list, index: int, started_s: float) -> None:
        if index == len(pulls):
            self._layer_done(layer, started_s)
            return
        owner, nbytes = pulls[index]
        self._issue(owner, nbytes, lambda: self._serial(layer, pulls, index + 1, started_s))

    def _issue(self, owner: int, nbytes: float, on_done: Callable[[], None]) -> None:
        self._engine.add_job(self._rank, self._base + owner, nbytes, on_done)

    def _layer_done(self, layer: int, started_s: float) -> None:
        self._done.add(layer)
        self._stats.layer_s.append(self._engine.now_s - started_s)
        if self._waiter and self._waiter[0] == layer:
            resume, self._waiter = self._waiter[1], None
            resume()
        self._next_layer()


class _PullStats:
    """Pulling time spent at each contention level (summed over pulling ranks) and every layer's prefetch time."""

    def __init__(self, engine: _Engine, track_contention: bool):
        self._engine = engine
        self._since_s: dict[int, float] = collections.defaultdict(float)
        self.level_s: collections.Counter = collections.Counter()
        self.layer_s: list[float] = []
        if track_contention:
            engine.on_change.append(self._settle)

    def _settle(self, group: int, jobs: list[_Job]) -> None:
        """Credits the time since the group's last change to the levels of the pulls it had."""
        dt_s = self._engine.now_s - self._since_s[group]
        self._since_s[group] = self._engine.now_s
        if dt_s > 0:
            for k in collections.Counter(j.source for j in jobs if j.source is not None).values():
                self.level_s[k] += k * dt_s


@dataclasses.dataclass
class _Run:
    """Everything one simulation shares: model, hardware, config, the queue and the records."""

    cfg: ModelConfig
    hw: HardwareSpec
    ctx: ContextConfig
    engine: _Engine
    queue: _Queue
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

    def finish(self, rids: Sequence[int]) -> None:
        for r in rids:
            self.requests[r].prefill_end_s = self.engine.now_s
            self.on_prefill_done(r)


def _dwdp_rank(run: _Run, rank: int, copy: _CopyStream) -> Iterator:
    m = run.cfg.num_moe_layers
    mid = run.ctx.pull_issue == "after_attention"
    slow_attention, slow_other = run.ctx.slowdowns
    while True:
        rids = run.queue.take_dwdp()
        if not rids:
            if run.queue.closed:
                return
            yield ("wait", run.queue.wait)
            continue
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
        run.finish(rids)


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


def _dep_group(run: _Run, group: int) -> Iterator:
    while True:
        placed = run.queue.take_dep()
        if not placed:
            if run.queue.closed:
                return
            yield ("wait", run.queue.wait)
            continue
        rids = [r for rs in placed for r in rs]
        run.start(rids)
        start_s = run.engine.now_s
        tokens = [run.tokens(rs) for rs in placed]
        padded = run.ctx.padded(max(tokens))  # an idle rank runs the step's shape too
        times = [run.times(rs, padded) if rs or padded else _IDLE for rs in placed]
        step_s, busy_s = dep_step(run.cfg, run.hw, times, tokens, run.ctx.precision)
        yield ("sleep", step_s)
        run.iterations.append(IterationRecord(group, start_s, run.engine.now_s, tokens, busy_s.tolist()))
        run.finish(rids)


def _check_fits(lengths: np.ndarray, ctx: ContextConfig) -> None:
    if lengths.max() > ctx.max_num_tokens:
        raise ValueError(f"a request of {int(lengths.max())} tokens exceeds ContextConfig.max_num_tokens="
                         f"{ctx.max_num_tokens} and could never be scheduled; raise max_num_tokens or lower the "
                         f"workload's ISL / max_len")


def _start_context_servers(run: _Run, stats: _PullStats) -> None:
    ctx, engine = run.ctx, run.engine
    if ctx.strategy == "dep":
        for g in range(ctx.num_groups):
            engine.at(0.0, _Process(engine, _dep_group(run, g)).resume)
        return
    placement = ctx.placement(run.cfg)
    expert_bytes = roofline.expert_bytes(run.cfg, ctx.precision)
    rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, 2]))
    for g in range(ctx.num_groups):
        for r in range(ctx.group_size):
            rank = g * ctx.group_size + r
            copy = _CopyStream(engine, rank, g * ctx.group_size, placement.pulls(r), expert_bytes, ctx, rng, stats)
            engine.at(0.0, _Process(engine, _dwdp_rank(run, rank, copy)).resume)


# ---------------------------------------------------------------------------------------------------------------------
# Context-only serving.


@dataclasses.dataclass
class ContextResult:
    """A context-only run: per-request and per-step records plus pull statistics (DWDP)."""

    ctx: ContextConfig
    requests: list[RequestRecord]
    iterations: list[IterationRecord]
    contention_s: dict[int, float]  # pulling time (summed over ranks) at each contention level
    prefetch_layer_s: list[float]
    ideal_prefetch_s: float

    @property
    def makespan_s(self) -> float:
        return max(r.prefill_end_s for r in self.requests) - min(r.arrival_s for r in self.requests)

    @property
    def tps_per_gpu(self) -> float:
        return sum(r.input_len for r in self.requests) / self.makespan_s / self.ctx.num_gpus

    def ttft_s(self) -> np.ndarray:
        return np.array([r.ttft_s for r in self.requests])

    @property
    def sync_overhead(self) -> float:
        """Step-time-weighted overhead over the run: 1 - total mean-rank busy time / total step time."""
        total = sum(it.duration_s for it in self.iterations)
        return 1.0 - sum(float(np.mean(it.rank_busy_s)) for it in self.iterations) / total

    @property
    def prefetch_stretch(self) -> float:
        """Mean prefetch time of a layer over its contention-free time (1: no contention)."""
        return float(np.mean(self.prefetch_layer_s)) / self.ideal_prefetch_s if self.prefetch_layer_s else math.nan

    def contention_frequencies(self) -> dict[int, float]:
        """Pr[C = c] for a pulling rank at a random time."""
        total = sum(self.contention_s.values())
        return {c: k / total for c, k in sorted(self.contention_s.items())} if total else {}

    def summary(self) -> dict:
        ttft = self.ttft_s()
        iters = np.array([it.duration_s for it in self.iterations])
        return {"strategy": self.ctx.strategy, "num_gpus": self.ctx.num_gpus, "num_requests": len(self.requests),
                "tps_per_gpu": self.tps_per_gpu, "makespan_s": self.makespan_s,
                "ttft_p50_s": float(np.median(ttft)), "ttft_p90_s": float(np.percentile(ttft, 90)),
                "ttft_mean_s": float(ttft.mean()), "iteration_p50_s": float(np.median(iters)),
                "num_iterations": len(self.iterations), "sync_overhead": self.sync_overhead,
                "exposed_wait_fraction": sum(it.exposed_wait_s for it in self.iterations) / float(iters.sum()),
                "prefetch_stretch": self.prefetch_stretch}


def _new_run(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, lengths: np.ndarray, arrivals_s: np.ndarray,
             on_prefill_done: Callable[[int], None], track_contention: bool) -> tuple[_Run, _PullStats]:
    _check_fits(lengths, ctx)
    engine = _Engine(_rates_fn(hw, ctx), ctx.group_size, fixed_compute=max(ctx.slowdowns) == 0)
    stats = _PullStats(engine, track_contention)
    requests = [RequestRecord(i, int(n), float(t)) for i, (n, t) in enumerate(zip(lengths, arrivals_s))]
    run = _Run(cfg, hw, ctx, engine, _Queue(engine, lengths, ctx), lengths, requests, [], on_prefill_done)
    _start_context_servers(run, stats)
    return run, stats


def _ideal_prefetch_s(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig) -> float:
    return roofline.prefetch_s(cfg, hw, ctx.placement(cfg), ctx.precision) if ctx.strategy == "dwdp" else math.nan


def simulate_context(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, workload: Workload) -> ContextResult:
    """Context-only serving of `workload` (arrivals from the workload; OSL ignored)."""
    lengths, arrivals_s = input_lengths(workload), arrival_times_s(workload)
    run, stats = _new_run(cfg, hw, ctx, lengths, arrivals_s, lambda rid: None, track_contention=True)
    for rid in np.argsort(arrivals_s, kind="stable"):
        run.engine.at(float(arrivals_s[rid]), functools.partial(run.queue.push, int(rid)))
    run.engine.at(float(arrivals_s.max()), run.queue.close)
    run.engine.run()
    return ContextResult(ctx, run.requests, run.iterations, dict(stats.level_s), stats.layer_s,
                         _ideal_prefetch_s(cfg, hw, ctx))


# ---------------------------------------------------------------------------------------------------------------------
# Disaggregated serving: context servers + fixed generation servers, closed loop.


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    context: ContextConfig
    gen: GenServer
    num_gen_servers: int = 1
    concurrency: int | None = None  # requests in flight; None: all generation slots

    def __post_init__(self):
        if self.num_gen_servers < 1:
            raise ValueError(f"E2EConfig.num_gen_servers must be >= 1, got {self.num_gen_servers}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"E2EConfig.concurrency must be >= 1, got {self.concurrency}")

    @property
    def in_flight(self) -> int:
        return self.concurrency or self.num_gen_servers * self.gen.max_batch

    @property
    def num_gpus(self) -> int:
        return self.context.num_gpus + self.num_gen_servers * self.gen.num_gpus


class _GenPool:
    """Generation servers as fluid processor-sharing queues: every request on a server advances by
    tokens_per_step / decode_step_s(active) tokens per second; a virtual token clock per server orders completions."""

    def __init__(self, engine: _Engine, rate_fn: Callable[[int], float], e2e: E2EConfig, osl: int,
                 on_done: Callable[[int], None]):
        self._engine, self._rate, self._osl, self._on_done = engine, rate_fn, osl, on_done
        self._max_batch = e2e.gen.max_batch
        self._servers = [{"clock": 0.0, "since_s": 0.0, "heap": [], "version": 0}
                         for _ in range(e2e.num_gen_servers)]
        self._waiting: collections.deque[int] = collections.deque()
        self.started_s: dict[int, float] = {}

    def admit(self, rid: int) -> None:
        free = [s for s in self._servers if len(s["heap"]) < self._max_batch]
        if not free:
            self._waiting.append(rid)
            return
        self._join(min(free, key=lambda s: len(s["heap"])), rid)

    def _sync(self, s: dict) -> None:
        now = self._engine.now_s
        if s["heap"]:
            s["clock"] += (now - s["since_s"]) * self._rate(len(s["heap"]))
        s["since_s"] = now

    def _join(self, s: dict, rid: int) -> None:
        self._sync(s)
        heapq.heappush(s["heap"], (s["clock"] + self._osl, rid))
        self.started_s[rid] = self._engine.now_s
        self._reschedule(s)

    def _reschedule(self, s: dict) -> None:
        s["version"] += 1
        if s["heap"]:
            version = s["version"]
            due_s = self._engine.now_s + (s["heap"][0][0] - s["clock"]) / self._rate(len(s["heap"]))
            self._engine.at(due_s, lambda: self._complete(s, version))

    def _complete(self, s: dict, version: int) -> None:
        if version != s["version"]:
            return
        self._sync(s)
        _, rid = heapq.heappop(s["heap"])
        if self._waiting:
            self._join(s, self._waiting.popleft())
        else:
            self._reschedule(s)
        self._on_done(rid)


@dataclasses.dataclass
class E2EResult:
    e2e: E2EConfig
    requests: list[RequestRecord]
    osl: int
    window: tuple[float, float]

    def steady(self) -> list[RequestRecord]:
        """Requests released inside the steady-state window."""
        lo, hi = self.window
        return [r for r in self.requests if lo <= r.arrival_s <= hi]

    def summary(self) -> dict:
        lo, hi = self.window
        done_in_window = sum(1 for r in self.requests if lo < r.end_s <= hi)
        output_tps = done_in_window * self.osl / (hi - lo)
        steady = self.steady()
        ttft = np.array([r.ttft_s for r in steady])
        per_user = np.array([self.osl / (r.end_s - r.gen_start_s) for r in steady])
        ctx = self.e2e.context
        return {"strategy": ctx.strategy, "ctx_gpus": ctx.num_gpus, "group_size": ctx.group_size,
                "gen_gpus": self.e2e.num_gen_servers * self.e2e.gen.num_gpus, "concurrency": self.e2e.in_flight,
                "output_tps": output_tps, "output_tps_per_gpu": output_tps / self.e2e.num_gpus,
                "tps_per_user_p50": float(np.median(per_user)), "ttft_p50_s": float(np.median(ttft)),
                "ttft_p90_s": float(np.percentile(ttft, 90)), "steady_requests": len(steady)}


def simulate_e2e(cfg: ModelConfig, hw: HardwareSpec, e2e: E2EConfig, workload: Workload) -> E2EResult:
    """Closed-loop disaggregated serving of `workload` (its lengths and OSL; arrival rate ignored). Steady-state
    statistics use the window from the completion of the first `in_flight` requests to the release of the last
    `in_flight` (the start-up burst and the drain are excluded): throughput counts completions inside it, TTFT and
    TPS/user the requests released inside it."""
    if workload.num_requests < 4 * e2e.in_flight:
        raise ValueError(f"Workload.num_requests={workload.num_requests} must be >= 4 x concurrency "
                         f"({e2e.in_flight}) for a steady-state window")
    lengths = input_lengths(workload)
    context_len = float(lengths.mean()) + workload.osl / 2
    gen = e2e.gen

    @functools.lru_cache(maxsize=None)
    def token_rate(active: int) -> float:
        return gen.tokens_per_step / roofline.decode_step_s(cfg, hw, gen, active, context_len, e2e.context.precision)

    released = [0]
    completions: list[float] = []

    def release() -> None:
        rid = released[0]
        if rid == workload.num_requests:
            return
        released[0] += 1
        run.requests[rid].arrival_s = run.engine.now_s
        run.queue.push(rid)
        if released[0] == workload.num_requests:
            run.queue.close()

    def decode_done(rid: int) -> None:
        run.requests[rid].gen_start_s = pool.started_s[rid]
        run.requests[rid].end_s = run.engine.now_s
        completions.append(run.engine.now_s)
        release()

    run, _ = _new_run(cfg, hw, e2e.context, lengths, np.zeros(len(lengths)), lambda rid: pool.admit(rid),
                      track_contention=False)
    pool = _GenPool(run.engine, token_rate, e2e, workload.osl, decode_done)
    for _ in range(e2e.in_flight):
        run.engine.at(0.0, release)
    run.engine.run()
    window = (completions[e2e.in_flight - 1], sorted(r.arrival_s for r in run.requests)[-e2e.in_flight])
    return E2EResult(e2e, run.requests, workload.osl, window)


# ---------------------------------------------------------------------------------------------------------------------
# Planner: context GPUs and group size for a TTFT target.


def fits_memory(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, fraction: float = 0.9) -> bool:
    """Whether a DWDP rank's weights fit `fraction` of device memory (always True when memory is unknown or DEP)."""
    if ctx.strategy != "dwdp" or not hw.memory_bytes:
        return True
    return roofline.weights_bytes_per_rank(cfg, ctx.placement(cfg), ctx.precision) <= fraction * hw.memory_bytes


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    ttft_target_s: float
    best: dict | None  # the summary of the chosen point, None when no point meets the target
    candidates: list[dict]


def plan(points: Sequence[dict], ttft_targets_s: Sequence[float]) -> list[PlanChoice]:
    """For each TTFT target, the simulated point (an E2EResult summary) with the highest output TPS/GPU whose median
    TTFT meets the target."""
    out = []
    for target in ttft_targets_s:
        if not target > 0:
            raise ValueError(f"TTFT target must be > 0 s, got {target}")
        ok = [p for p in points if p["ttft_p50_s"] <= target]
        out.append(PlanChoice(target, max(ok, key=lambda p: p["output_tps_per_gpu"]) if ok else None, ok))
    return out
