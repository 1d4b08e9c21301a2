"""The simulator's request sampler: prompt lengths and arrival times, seeded, numpy only.

Why a separate one: the simulator needs only two arrays and must stay importable without the serving stack; it follows
the same conventions as dwdp_jax.serving.workload (benchmark_serving's random-range-ratio lengths, TRT-LLM's normal
lengths, Poisson or all-at-once arrivals) and could be replaced by that module's `input_lengths` / `arrival_times_s`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    """`num_requests` prompts of ISL `isl`, `osl` output tokens each.

    Lengths: uniform integers in [max(1, int(input_ratio * isl)), isl]; or, with `isl_std` set, round(N(isl, isl_std))
    clipped to [1, max_len] (max_len default 2 isl - 1, a symmetric clip). Arrivals: all at t = 0 when `rate_per_s`
    is None (saturation), else a Poisson process of that rate.
    """

    num_requests: int
    isl: int
    input_ratio: float = 1.0
    isl_std: float | None = None
    max_len: int | None = None
    rate_per_s: float | None = None
    osl: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"Workload.num_requests must be >= 1, got {self.num_requests}")
        if self.isl < 1 or self.osl < 1:
            raise ValueError(f"Workload.isl and Workload.osl must be >= 1, got isl={self.isl}, osl={self.osl}")
        if not 0.0 <= self.input_ratio <= 1.0:
            raise ValueError(f"Workload.input_ratio must be in [0, 1], got {self.input_ratio}")
        if self.isl_std is not None and not self.isl_std >= 0:
            raise ValueError(f"Workload.isl_std must be >= 0 or None, got {self.isl_std}")
        if self.max_len is not None and self.max_len < self.isl:
            raise ValueError(f"Workload.max_len must be >= isl ({self.isl}), got {self.max_len}")
        if self.rate_per_s is not None and not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"Workload.rate_per_s must be a finite number > 0 (or None for all at once), "
                             f"got {self.rate_per_s}")


def input_lengths(w: Workload) -> np.ndarray:
    """Prompt lengths [num_requests] (int64)."""
    rng = np.random.default_rng(np.random.SeedSequence([w.seed, 0]))
    if w.isl_std is None:
        return rng.integers(max(1, int(w.isl * w.input_ratio)), w.isl, size=w.num_requests, endpoint=True)
    upper = w.max_len if w.max_len is not None else 2 * w.isl - 1
    return np.clip(np.rint(rng.normal(w.isl, w.isl_std, size=w.num_requests)), 1, upper).astype(np.int64)


def arrival_times_s(w: Workload) -> np.ndarray:
    """Arrival times [num_requests], non-decreasing, seconds from the start."""
    if w.rate_per_s is None:
        return np.zeros(w.num_requests)
    rng = np.random.default_rng(np.random.SeedSequence([w.seed, 1]))
    return np.cumsum(rng.exponential(1.0 / w.rate_per_s, size=w.num_requests))
