"""DWDP's remote-expert pulls in the simulator: how fast concurrent pulls move (the source disciplines), a rank's
prefetch stream, and the contention and prefetch-time statistics.

Why: the contention a DWDP rank meets at a source is the price of its independence; it depends on how a source's copy
engine serves its readers (ContextConfig.discipline), which is the one thing these rates encode.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

from dwdp_jax.sim.config import ContextConfig
from dwdp_jax.sim.engine import Engine, Job
from dwdp_jax.sim.hardware import HardwareSpec


def _max_min_rates(flows: list[Job], flow_cap: float, src_cap: float, dst_cap: float) -> None:
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


def rates_fn(hw: HardwareSpec, ctx: ContextConfig) -> Callable[[list[Job]], None]:
    single = min(hw.copy_bytes_per_s, hw.egress, hw.ingress)
    unlimited = min(hw.copy_bytes_per_s, hw.ingress)
    slice_s = ctx.slice_bytes / hw.copy_bytes_per_s
    efficiency = slice_s / (slice_s + ctx.slice_overhead_s)

    def rates(jobs: list[Job]) -> None:
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



class CopyStream:
    """A DWDP rank's prefetch stream: layers in issue order, each layer one pull per owner (serial, or all at once
    when sliced round-robin); tracks completion per layer of the current step and each layer's duration."""

    def __init__(self, engine: Engine, rank: int, group_base: int, pulls: Sequence, expert_bytes: float,
                 ctx: ContextConfig, rng: np.random.Generator, stats: PullStats):
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


class PullStats:
    """Pulling time spent at each contention level (summed over pulling ranks) and every layer's prefetch time."""

    def __init__(self, engine: Engine, track_contention: bool):
        self._engine = engine
        self._since_s: dict[int, float] = collections.defaultdict(float)
        self.level_s: collections.Counter = collections.Counter()
        self.layer_s: list[float] = []
        if track_contention:
            engine.on_change.append(self._settle)

    def _settle(self, group: int, jobs: list[Job]) -> None:
        """Credits the time since the group's last change to the levels of the pulls it had."""
        dt_s = self._engine.now_s - self._since_s[group]
        self._since_s[group] = self._engine.now_s
        if dt_s > 0:
            for k in collections.Counter(j.source for j in jobs if j.source is not None).values():
                self.level_s[k] += k * dt_s

