"""The fluid discrete-event engine: timers, and jobs (compute or pulls) progressing at piecewise-constant rates.

Why fluid: pulls that share a copy engine or a link progress together at rates that change whenever a pull starts or
ends; settling each job's progress only at those instants makes a run cost events, not time steps. What the rates
are is not this module's business (the pull disciplines, sim/pulls.py); neither is what the processes do (the
context servers, sim/servers.py).
"""

from __future__ import annotations

import collections
import heapq
import math
from collections.abc import Callable, Iterator

REL_EPS = 1e-12  # a job this close to done (relative to its size) is done


class Job:
    __slots__ = ("rank", "source", "group", "remaining", "initial", "t_ref", "rate", "version", "seq", "on_done",
                 "slowdown")

    def __init__(self, rank: int, source: int | None, group: int, amount: float, on_done: Callable[[], None],
                 seq: int, now_s: float, slowdown: float = 0.0):
        self.rank, self.source, self.group, self.on_done, self.seq = rank, source, group, on_done, seq
        self.slowdown = slowdown  # compute jobs: how much slower while their rank pulls
        self.remaining = self.initial = amount
        self.t_ref, self.rate, self.version = now_s, 0.0, 0


class Engine:
    """Time, a timer heap and running jobs: compute jobs (source None) hold seconds of nominal compute, pull jobs
    bytes. Jobs interact only within their group (group = rank // group_size), so when a group's job set changes only
    that group's rates are recomputed (`rates(jobs)`); a job's remaining amount is settled lazily when its rate
    changes, and its projected finish sits in a heap (stale entries are skipped by version). `on_change(group, jobs)`
    hooks see a group's job set just before it changes."""

    def __init__(self, rates: Callable[[list[Job]], None], group_size: int, fixed_compute: bool):
        self.fixed_compute = fixed_compute  # compute never slows down: run it as timers, not jobs
        self.now_s = 0.0
        self._timers: list = []
        self._finish: list = []
        self._groups: dict[int, list[Job]] = collections.defaultdict(list)
        self._dirty: set[int] = set()
        self._seq = 0
        self._rates, self._group_size = rates, group_size
        self.on_change: list[Callable[[int, list[Job]], None]] = []

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def at(self, time_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time_s, self._next_seq(), fn))

    def add_job(self, rank: int, source: int | None, amount: float, on_done: Callable[[], None],
                slowdown: float = 0.0) -> None:
        group = rank // self._group_size
        self._changing(group)
        self._groups[group].append(Job(rank, source, group, amount, on_done, self._next_seq(), self.now_s, slowdown))

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
                left = job.remaining if job.remaining > REL_EPS * job.initial else 0.0
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

    def _complete(self, job: Job) -> None:
        self._changing(job.group)
        self._groups[job.group].remove(job)
        job.version += 1
        job.on_done()


class Process:
    """A generator of commands driven by the engine: ("compute", rank, seconds, slowdown while pulling),
    ("sleep", seconds), ("wait", register) where register(resume) arranges for resume() to be called later, or
    returns True when the condition already holds."""

    def __init__(self, engine: Engine, gen: Iterator):
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
