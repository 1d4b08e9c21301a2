"""What a run shows on stderr while it runs: its phases as they start (with their wall seconds kept for the
results), and progress bars over the steps that take seconds each."""

from __future__ import annotations

import sys
import threading
import time

import jax
from tqdm import tqdm


def progress_bar(items: list, desc: str, unit: str):
    """`items` under a progress bar on stderr, for the steps that compile (seconds each, a minute in all)."""
    return tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)


class Progress:
    """A request-counting progress bar several worker threads update."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="req", leave=False)
        self.lock = threading.Lock()

    def update(self, n: int):
        with self.lock:
            self.bar.update(n)

    def close(self):
        self.bar.close()


class Phases:
    """Wall seconds of the run's phases, in order (raw.phase_s): where a GPU run's minutes go besides serving. Each
    phase is announced on stderr as it starts, since compiling comes first and takes a minute on CPU, more on GPU."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = self._mark = time.perf_counter()

    def begin(self, text: str) -> None:
        tqdm.write(f"[{time.perf_counter() - self._start:6.1f} s] {text}", file=sys.stderr)

    def lap(self, name: str, value=None):
        """Ends phase `name` once `value`'s device work is done; returns `value`."""
        jax.block_until_ready(value)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now
        return value
