"""The rank workers of a runtime whose ranks progress alone (DWDP, the reference): one host thread per rank, each
looping on its own: take the next batch from `source(rank)` when free (None: no more work), step the runtime on
that rank, hand the result to `sink(rank, item, result)`. No worker ever waits for another."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Protocol

from dwdp_jax.packing import PackedBatch
from dwdp_jax.runtime.step import StepResult


class RankRuntime(Protocol):
    num_ranks: int

    def step(self, rank: int, batch: PackedBatch) -> StepResult: ...


class RankWorkers:
    """`pause(rank)` holds a worker before its next step (to show the others do not depend on it)."""

    def __init__(self, runtime: RankRuntime, source: Callable[[int], Any],
                 sink: Callable[[int, Any, StepResult], None],
                 batch_of: Callable[[Any], PackedBatch] = lambda item: item):
        self.runtime, self.source, self.sink, self.batch_of = runtime, source, sink, batch_of
        self._running = [threading.Event() for _ in range(runtime.num_ranks)]
        for e in self._running:
            e.set()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._loop, args=(r,), name=f"rank{r}", daemon=True)
                         for r in range(runtime.num_ranks)]

    def start(self) -> "RankWorkers":
        for th in self._threads:
            th.start()
        return self

    def pause(self, rank: int) -> None:
        self._running[rank].clear()

    def resume(self, rank: int) -> None:
        self._running[rank].set()

    def join(self, timeout_s: float | None = None) -> None:
        for th in self._threads:
            th.join(timeout_s)
        if self.errors:
            raise self.errors[0]

    def _loop(self, rank: int) -> None:
        try:
            while True:
                self._running[rank].wait()
                item = self.source(rank)
                if item is None:
                    return
                self.sink(rank, item, self.runtime.step(rank, self.batch_of(item)))
        except BaseException as e:  # surfaced by join(); a dead worker must not look like an idle one
            self.errors.append(e)


def queue_source(queues: list[queue.Queue]) -> Callable[[int], Any]:
    """A source over per-rank queues ending with None."""
    return lambda rank: queues[rank].get()
