"""A simulated workload: the serving workload's synthetic requests (dwdp_jax.serving.workload), named by one value.

Why a spec of its own: studies replace one field of a workload (`dataclasses.replace`) and results files record it
whole; the lengths and arrivals themselves come from the serving sampler, so a simulated run and a served run of the
same settings see the same requests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dwdp_jax.serving import workload as served


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
        if self.isl_std is not None and self.input_ratio != 1.0:
            raise ValueError(f"Workload.input_ratio must be 1.0 when isl_std is given, got {self.input_ratio}")
        if self.max_len is not None and self.max_len < self.isl:
            raise ValueError(f"Workload.max_len must be >= isl ({self.isl}), got {self.max_len}")
        if self.rate_per_s is not None and not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"Workload.rate_per_s must be a finite number > 0 (or None for all at once), "
                             f"got {self.rate_per_s}")


def input_lengths(w: Workload) -> np.ndarray:
    """Prompt lengths [num_requests] (int64)."""
    return served.input_lengths(w.num_requests, w.isl, input_ratio=w.input_ratio, isl_std=w.isl_std,
                                max_len=w.max_len, seed=w.seed)


def arrival_times_s(w: Workload) -> np.ndarray:
    """Arrival times [num_requests], non-decreasing, seconds from the start."""
    return served.arrival_times_s(w.num_requests, w.rate_per_s, seed=w.seed)


def requests(w: Workload) -> list[served.Request]:
    """The requests, ids 0..n-1, with their lengths and arrivals."""
    return served.synthetic_requests(w.num_requests, w.isl, input_ratio=w.input_ratio, isl_std=w.isl_std,
                                     max_len=w.max_len, rate_per_s=w.rate_per_s, seed=w.seed)
