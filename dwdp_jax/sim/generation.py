"""Generation servers of disaggregated serving, as fluid processor-sharing queues beside the context servers.

Why fluid: a decode step serves every request a server holds at once, at a rate that depends on how many it holds
(roofline.decode_step_s); advancing a per-server token clock turns that into one event per completion.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable

from dwdp_jax.sim.config import E2EConfig
from dwdp_jax.sim.engine import Engine


class GenPool:
    """Generation servers as fluid processor-sharing queues: every request on a server advances by
    tokens_per_step / decode_step_s(active) tokens per second; a virtual token clock per server orders completions."""

    def __init__(self, engine: Engine, rate_fn: Callable[[int], float], e2e: E2EConfig, osl: int,
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

