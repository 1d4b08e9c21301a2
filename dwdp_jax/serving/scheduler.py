"""Context-only scheduling for DWDP and DEP: which requests each rank prefills in each iteration.

An iteration packs whole requests (no chunked prefill) up to max_num_tokens (MNT) and max_batch_size. Both strategies
pack the same way: the FCFS prefix that fits num_ranks x (MNT, max_batch_size) is the window, the queue head is placed
first (the oldest request always runs: nothing starves), then the rest longest-first onto the least-loaded rank with
room, and what fits nowhere goes back to the front in order (`place`). They differ only in who decides and when:
- DWDP ranks never wait for each other, so each rank fills its next batch from one shared queue when it is free
  (`DwdpScheduler.next_batch`, thread-safe: one host thread per device calls it), the window placed onto one rank.
  `packing="fcfs"` is the ablation that stops at the first request that does not fit (sessions 4-6 ran with it).
- DEP ranks meet at every MoE layer's all-to-all, so each iteration hands every rank a batch at once, balanced by
  tokens, and all ranks step together (`DepScheduler.next_step`).
Both keep a ledger of what was handed out and what the runtime reported complete; `finish()` is the end-of-run count
check that no request was lost or run twice. The simulator (dwdp_jax.sim.servers) batches with these same schedulers;
its closed-loop clients hand them requests as they release them (`submit`).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from dwdp_jax.serving.workload import Request


class CountCheckError(RuntimeError):
    """The end-of-run count check failed: some request was never completed, completed twice, or is unknown."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """The requests one rank prefills in one iteration (its `iteration`-th for DWDP, the global step for DEP)."""

    rank: int
    iteration: int
    requests: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(r.input_len for r in self.requests)

    @property
    def request_ids(self) -> tuple[int, ...]:
        return tuple(r.id for r in self.requests)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Where a request ran: the rank and that rank's (DWDP) or the global (DEP) iteration number."""

    request_id: int
    rank: int
    iteration: int


def validate_requests(requests: Sequence[Request], *, max_num_tokens: int, max_batch_size: int,
                      num_ranks: int) -> None:
    """Raises ValueError before any device work when the run cannot be scheduled: bad limits, no requests, duplicate
    ids, or requests longer than MNT (all of them listed, by id and length, since prefill is never chunked)."""
    for name, value in (("max_num_tokens", max_num_tokens), ("max_batch_size", max_batch_size),
                        ("num_ranks", num_ranks)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not requests:
        raise ValueError("no requests to schedule")
    seen, duplicates = set(), set()
    for r in requests:
        (duplicates if r.id in seen else seen).add(r.id)
    if duplicates:
        raise ValueError(f"duplicate request ids: {sorted(duplicates)[:20]}")
    too_long = [r for r in requests if r.input_len > max_num_tokens]
    if too_long:
        listed = ", ".join(f"request {r.id} has {r.input_len} tokens" for r in too_long[:20])
        more = f" and {len(too_long) - 20} more" if len(too_long) > 20 else ""
        raise ValueError(f"{len(too_long)} request(s) longer than max_num_tokens={max_num_tokens} (prefill is not "
                         f"chunked, so they can never be scheduled): {listed}{more}")


class _Ledger:
    """What was handed out and what was reported complete, for the count check. Callers hold the scheduler lock."""

    def __init__(self, request_ids: Iterable[int]):
        self._ids = set(request_ids)
        self._issued: dict[int, Assignment] = {}
        self._completions: collections.Counter[int] = collections.Counter()

    def add(self, request_id: int) -> None:
        if request_id in self._ids:
            raise ValueError(f"duplicate request ids: [{request_id}]")
        self._ids.add(request_id)

    def issue(self, batch: Batch) -> None:
        for rid in batch.request_ids:
            self._issued[rid] = Assignment(rid, batch.rank, batch.iteration)

    def complete(self, batch: Batch) -> None:
        self._completions.update(batch.request_ids)

    def finish(self) -> list[Assignment]:
        never = sorted(self._ids - {rid for rid, n in self._completions.items() if n > 0})
        twice = sorted(rid for rid, n in self._completions.items() if n > 1)
        unknown = sorted(set(self._completions) - self._ids)
        unissued = sorted(set(self._completions) & (self._ids - set(self._issued)))
        problems = []
        if never:
            problems.append(f"{len(never)} request(s) never completed: {never[:20]}")
        if twice:
            problems.append(f"{len(twice)} request(s) completed more than once: "
                            f"{[(rid, self._completions[rid]) for rid in twice[:20]]}")
        if unknown:
            problems.append(f"{len(unknown)} completed id(s) not in the workload: {unknown[:20]}")
        if unissued:
            problems.append(f"{len(unissued)} request(s) completed but never handed out: {unissued[:20]}")
        if problems:
            raise CountCheckError(f"count check failed ({len(self._ids)} requests): " + "; ".join(problems))
        return [self._issued[rid] for rid in sorted(self._ids)]


class _FcfsQueue:
    """Pending requests in arrival order (ties by id), behind one lock shared with the ledger."""

    def __init__(self, requests: Sequence[Request], *, max_num_tokens: int, max_batch_size: int, num_ranks: int):
        validate_requests(requests, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                          num_ranks=num_ranks)
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.num_ranks = num_ranks
        self._pending = collections.deque(sorted(requests, key=lambda r: (r.arrival_s, r.id)))
        self._ledger = _Ledger(r.id for r in requests)
        self._lock = threading.Lock()

    @property
    def drained(self) -> bool:
        """True once every request has been handed out (they may still be running)."""
        with self._lock:
            return not self._pending

    def next_arrival_s(self) -> float | None:
        """Arrival time of the oldest request not yet handed out, None when drained: a worker that got no batch waits
        until then."""
        with self._lock:
            return self._pending[0].arrival_s if self._pending else None

    def submit(self, request: Request) -> None:
        """Queues a request that comes after the scheduler was made (a closed-loop client releases one when another
        finishes): checked as at construction, and arriving no earlier than any request still pending."""
        validate_requests([request], max_num_tokens=self.max_num_tokens, max_batch_size=self.max_batch_size,
                          num_ranks=self.num_ranks)
        with self._lock:
            if self._pending and request.arrival_s < self._pending[-1].arrival_s:
                raise ValueError(f"request {request.id} arrives at {request.arrival_s} s, before pending request "
                                 f"{self._pending[-1].id} ({self._pending[-1].arrival_s} s)")
            self._ledger.add(request.id)
            self._pending.append(request)

    def _take_fcfs(self, now_s: float, max_tokens: int, max_count: int) -> list[Request]:
        """Pops the longest arrived FCFS prefix within the limits; stops at the first request that does not fit, so a
        long request is never overtaken (head-of-line order is the point of FCFS)."""
        taken, tokens = [], 0
        while (self._pending and len(taken) < max_count and self._pending[0].arrival_s <= now_s
               and tokens + self._pending[0].input_len <= max_tokens):
            tokens += self._pending[0].input_len
            taken.append(self._pending.popleft())
        return taken

    def complete(self, batch: Batch) -> None:
        """The runtime reports that every request of `batch` has finished its prefill."""
        with self._lock:
            self._ledger.complete(batch)

    def finish(self) -> list[Assignment]:
        """The end-of-run count check: raises CountCheckError unless every request was completed exactly once; returns
        where each request ran, by request id."""
        with self._lock:
            return self._ledger.finish()


def place(candidates: list[Request], num_ranks: int, max_num_tokens: int, max_batch_size: int,
          balance: str = "tokens") -> tuple[list[list[Request]], list[Request]]:
    """Head first, then the rest (longest-first when balancing tokens, FCFS when balancing requests) onto the
    least-loaded rank with room; returns (per-rank lists in FCFS order, deferred requests in FCFS order)."""
    head, rest = candidates[0], candidates[1:]
    if balance == "tokens":
        rest = sorted(rest, key=lambda r: -r.input_len)  # stable: ties stay FCFS
    placed: list[list[Request]] = [[] for _ in range(num_ranks)]
    tokens = [0] * num_ranks
    deferred = []
    for request in [head, *rest]:
        fits = [rank for rank in range(num_ranks) if len(placed[rank]) < max_batch_size
                and tokens[rank] + request.input_len <= max_num_tokens]
        if not fits:
            deferred.append(request)
            continue
        load = tokens if balance == "tokens" else [len(p) for p in placed]
        rank = min(fits, key=lambda k: (load[k], k))
        placed[rank].append(request)
        tokens[rank] += request.input_len
    order = {r.id: i for i, r in enumerate(candidates)}
    return [sorted(rs, key=lambda r: order[r.id]) for rs in placed], sorted(deferred, key=lambda r: order[r.id])


class DwdpScheduler(_FcfsQueue):
    """One shared queue; each DWDP rank fills its next batch when it is free."""

    PACKINGS = ("lookahead", "fcfs")

    def __init__(self, requests: Sequence[Request], *, num_ranks: int, max_num_tokens: int, max_batch_size: int,
                 packing: str = "lookahead"):
        if packing not in self.PACKINGS:
            raise ValueError(f"packing must be one of {self.PACKINGS}, got {packing!r}")
        super().__init__(requests, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size, num_ranks=num_ranks)
        self.packing = packing
        self._iterations = [0] * num_ranks

    def next_batch(self, rank: int, now_s: float) -> Batch | None:
        """The next batch for `rank` among requests that arrived by now_s, or None when none has arrived (see
        `next_arrival_s`) or the queue is drained (see `drained`)."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in [0, {self.num_ranks}), got {rank}")
        with self._lock:
            if self.packing == "fcfs":
                requests = self._take_fcfs(now_s, self.max_num_tokens, self.max_batch_size)
            else:
                window = self._take_fcfs(now_s, self.num_ranks * self.max_num_tokens,
                                         self.num_ranks * self.max_batch_size)
                requests, deferred = [], []
                if window:
                    (requests,), deferred = place(window, 1, self.max_num_tokens, self.max_batch_size)
                self._pending.extendleft(reversed(deferred))
            if not requests:
                return None
            batch = Batch(rank, self._iterations[rank], tuple(requests))
            self._iterations[rank] += 1
            self._ledger.issue(batch)
            return batch

    def wait_for_batch(self, rank: int, clock_s: Callable[[], float] = time.monotonic,
                       sleep_s: Callable[[float], None] = time.sleep) -> Batch | None:
        """Blocking `next_batch` for a worker thread: sleeps until the next arrival while nothing is eligible; None
        only when the queue is drained. `clock_s` must be on the same time base as the requests' arrival_s."""
        while True:
            batch = self.next_batch(rank, clock_s())
            if batch is not None:
                return batch
            arrival_s = self.next_arrival_s()
            if arrival_s is None:
                return None
            sleep_s(max(0.0, arrival_s - clock_s()))


class DepScheduler(_FcfsQueue):
    """DEP iterations: every rank gets a batch at once and all step together, so the batches are balanced by tokens.

    Each step places the window (module docstring) over all ranks (`place`: LPT onto the least-loaded rank).

    `balance="requests"` is the ablation without token balancing: each request, in FCFS order, goes to the rank
    holding the fewest requests that still has room, so ranks differ in tokens as much as their requests do.
    """

    BALANCES = ("tokens", "requests")

    def __init__(self, requests: Sequence[Request], *, num_ranks: int, max_num_tokens: int, max_batch_size: int,
                 balance: str = "tokens"):
        if balance not in self.BALANCES:
            raise ValueError(f"balance must be one of {self.BALANCES}, got {balance!r}")
        super().__init__(requests, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size, num_ranks=num_ranks)
        self.balance = balance
        self._step = 0

    def next_step(self, now_s: float) -> list[Batch] | None:
        """One batch per rank (some possibly empty) for the next step, or None when no request has arrived by now_s
        (see `next_arrival_s`) or the queue is drained (see `drained`)."""
        with self._lock:
            candidates = self._take_fcfs(now_s, self.num_ranks * self.max_num_tokens,
                                         self.num_ranks * self.max_batch_size)
            if not candidates:
                return None
            placed, deferred = place(candidates, self.num_ranks, self.max_num_tokens, self.max_batch_size,
                                     self.balance)
            self._pending.extendleft(reversed(deferred))
            batches = [Batch(rank, self._step, tuple(rs)) for rank, rs in enumerate(placed)]
            self._step += 1
            for batch in batches:
                self._ledger.issue(batch)
            return batches
