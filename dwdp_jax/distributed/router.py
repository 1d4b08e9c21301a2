"""Groups behind one entry point: requests placed on the least-loaded live group, a failed group isolated.

Each rank thread of every group connects, then asks for its next batch when free (DWDP: a free rank fills its
own batch from its group's queue). A group fails when one of its ranks' connections drops (the process died) or
a batch stays in a rank's hands past the step deadline (it stalled): the group gets no more work, every request
it had not finished (queued or in flight) goes back to the least-loaded live groups, and whatever its ranks still
report is discarded, so each request is completed exactly once. The failure is recorded with the rank it names.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from multiprocessing.connection import Listener

import numpy as np

from dwdp_jax.serving import metrics


@dataclasses.dataclass
class Failure:
    group: int
    rank: int
    reason: str
    at_s: float
    requeued: list[int]


class Router:
    def __init__(self, requests: list[tuple[int, list[int]]], num_groups: int, group_size: int, token_budget: int,
                 max_batch_size: int, step_deadline_s: float, authkey: bytes, address=("127.0.0.1", 0)):
        self.requests = dict(requests)
        self.num_groups, self.group_size = num_groups, group_size
        self.token_budget, self.max_batch_size, self.step_deadline_s = token_budget, max_batch_size, step_deadline_s
        self.listener = Listener(address, authkey=authkey)
        self.address = "%s:%d" % self.listener.address
        self.lock = threading.Condition()
        self.queues = [collections.deque() for _ in range(num_groups)]
        self.inflight: dict[tuple[int, int], tuple[int, list[int], float]] = {}
        self.completed: dict[int, dict] = {}
        self.completions = collections.Counter()
        self.discarded: list[dict] = []
        self.failures: dict[int, Failure] = {}
        self.iterations: list[metrics.IterationRecord] = []
        self.records: list[tuple[int, metrics.RequestRecord]] = []
        self.placed = collections.Counter()
        self.pids: dict[tuple[int, int], int] = {}
        self.t0 = time.time()
        self._next_batch = 0
        for rid in self.requests:
            self._place(rid)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    # -- placement ------------------------------------------------------------------------------------------------

    def _load(self, group: int) -> int:
        queued = sum(len(self.requests[r]) for r in self.queues[group])
        running = sum(len(self.requests[r]) for (g, _), (_, rids, _) in self.inflight.items() if g == group
                      for r in rids)
        return queued + running

    def _place(self, rid: int) -> None:
        live = [g for g in range(self.num_groups) if g not in self.failures]
        if not live:
            return  # nothing can serve it; `done` reports it lost
        group = min(live, key=lambda g: (self._load(g), g))
        self.queues[group].append(rid)
        self.placed[group] += 1

    def _take(self, group: int) -> list[int]:
        q, rids, tokens = self.queues[group], [], 0
        while q and len(rids) < self.max_batch_size and tokens + len(self.requests[q[0]]) <= self.token_budget:
            tokens += len(self.requests[q[0]])
            rids.append(q.popleft())
        return rids

    def fail(self, group: int, rank: int, reason: str) -> None:
        with self.lock:
            if group in self.failures:
                return
            lost = list(self.queues[group]) + [r for (g, _), (_, rids, _) in self.inflight.items() if g == group
                                               for r in rids]
            self.queues[group].clear()
            for key in [k for k in self.inflight if k[0] == group]:
                del self.inflight[key]
            self.failures[group] = Failure(group, rank, reason, time.time() - self.t0, sorted(lost))
            for rid in sorted(lost):
                self._place(rid)
            self.lock.notify_all()

    # -- connections ----------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        group = rank = None
        try:
            _, group, rank, pid = conn.recv()
            self.pids[(group, rank)] = pid
            while True:
                message = conn.recv()
                if message[0] == "next":
                    conn.send(self._next(group, rank))
                elif message[0] == "done":
                    self._done(*message[1:])
                elif message[0] == "bye":
                    return
        except (EOFError, OSError):  # no goodbye: the process is gone
            if group is not None:
                self.fail(group, rank, f"rank {rank} of group {group} (pid {self.pids.get((group, rank))}) "
                                       f"dropped its connection: the process died")

    def _next(self, group: int, rank: int):
        with self.lock:
            while True:
                if group in self.failures or self.all_done():
                    return None
                rids = self._take(group)
                if rids:
                    batch_id, self._next_batch = self._next_batch, self._next_batch + 1
                    self.inflight[(group, rank)] = (batch_id, rids, time.time())
                    return batch_id, [(r, self.requests[r]) for r in rids]
                self.lock.wait(0.2)  # idle: a failed group's requests may still come this way

    def _done(self, group, rank, batch_id, start, end, logits) -> None:
        with self.lock:
            held = self.inflight.get((group, rank))
            if group in self.failures or held is None or held[0] != batch_id:
                self.discarded.append(dict(group=group, rank=rank, batch=batch_id, requests=sorted(logits)))
                return
            del self.inflight[(group, rank)]
            tokens = sum(len(self.requests[r]) for r in logits)
            global_rank = group * self.group_size + rank
            self.iterations.append(metrics.IterationRecord(global_rank, batch_id, start - self.t0, end - self.t0,
                                                           tokens))
            for rid, row in logits.items():
                self.completions[rid] += 1
                self.completed[rid] = dict(group=group, rank=rank, batch=batch_id, logits=np.asarray(row))
                self.records.append((group, metrics.RequestRecord(rid, len(self.requests[rid]), 0.0,
                                                                  start - self.t0, end - self.t0, global_rank)))
            self.lock.notify_all()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.time()
            with self.lock:
                late = [(g, r, b, now - t) for (g, r), (b, _, t) in self.inflight.items()
                        if now - t > self.step_deadline_s and g not in self.failures]
            for g, r, b, waited in late:
                self.fail(g, r, f"rank {r} of group {g} (pid {self.pids.get((g, r))}) stalled: batch {b} not done "
                                f"after {waited:.1f} s (step deadline {self.step_deadline_s:g} s)")

    # -- outcome --------------------------------------------------------------------------------------------------

    def all_done(self) -> bool:
        return len(self.completed) == len(self.requests)

    def wait(self, timeout_s: float) -> bool:
        deadline = time.time() + timeout_s
        with self.lock:
            while not self.all_done() and len(self.failures) < self.num_groups:
                if not self.lock.wait(max(0.0, min(0.5, deadline - time.time()))) and time.time() > deadline:
                    break
            self.lock.notify_all()
            return self.all_done()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def summary(self) -> dict:
        with self.lock:
            def stats(records, iterations, ranks):
                if not records:
                    return dict(requests=0)
                ttft = metrics.ttft(records)
                return dict(requests=len(records), tokens=sum(r.input_len for r in records), batches=len(iterations),
                            makespan_s=metrics.makespan_s(records),
                            tps_per_gpu=metrics.context_tps_per_gpu(records, ranks),
                            ttft_p50_s=ttft.p50, ttft_p90_s=ttft.p90)

            per_group = {}
            for g in range(self.num_groups):
                recs = [r for gg, r in self.records if gg == g]
                its = [i for i in self.iterations if i.rank // self.group_size == g]
                per_group[g] = dict(placed=self.placed[g], live=g not in self.failures,
                                    **stats(recs, its, self.group_size))
            live_ranks = self.group_size * max(1, self.num_groups - len(self.failures))
            return dict(
                requests=len(self.requests), completed=len(self.completed),
                lost=sorted(set(self.requests) - set(self.completed)),
                served_twice=sorted(r for r, n in self.completions.items() if n > 1),
                failures=[dataclasses.asdict(f) for f in self.failures.values()],
                discarded=self.discarded, per_group=per_group,
                overall=stats([r for _, r in self.records], self.iterations, live_ranks))
