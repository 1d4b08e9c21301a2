"""Serving metrics from per-request and per-iteration records: what the paper reports for context-only serving.

TTFT here is queue + prefill (context-only: the first token comes out of the prefill), TPS/GPU is input tokens over
the run's makespan per rank, and the DEP synchronization overhead is the share of a step that the average rank spends
waiting for the slowest one (paper Fig. 1: 1 - mean(rank compute) / step time, against the per-step CV of rank
tokens). The per-layer breakdown uses the paper's Table 1 categories and keeps every number labelled measured or
estimated, because on some machines parts of it can only come from the roofline model.
Pure numpy: no JAX, so the simulator and the figure pipeline can use it anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from dwdp_jax.serving.scheduler import Batch

CATEGORIES = ("attention", "grouped_gemm", "dense_gemm", "others", "communication", "p2p_exposed_wait",
              "synchronization")
MEASURED = "measured"
ESTIMATED = "estimated"


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request's life on the run's clock (seconds from the run start, the time base of arrival_s)."""

    request_id: int
    input_len: int
    arrival_s: float
    start_s: float
    end_s: float
    rank: int

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.end_s - self.arrival_s


@dataclasses.dataclass(frozen=True)
class IterationRecord:
    """One forward step of one rank. `layer_ms` maps a category of CATEGORIES to its milliseconds summed over the
    step's layers (optional: only when the step was profiled)."""

    rank: int
    iteration: int
    start_s: float
    end_s: float
    num_tokens: int
    layer_ms: Mapping[str, float] | None = None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


@dataclasses.dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    mean: float


@dataclasses.dataclass(frozen=True)
class RankTime:
    """Busy = sum of the rank's step latencies; idle = makespan - busy (waiting for arrivals or a drained queue)."""

    rank: int
    busy_s: float
    idle_s: float


@dataclasses.dataclass(frozen=True)
class DepSteps:
    """DEP steps in iteration order: step latency (first rank start to last rank end) and tokens per rank."""

    iteration: np.ndarray  # [steps] int
    step_s: np.ndarray  # [steps]
    rank_tokens: np.ndarray  # [steps, ranks]


def records_for_batch(batch: Batch, start_s: float, end_s: float,
                      layer_ms: Mapping[str, float] | None = None) -> tuple[IterationRecord, list[RequestRecord]]:
    """The records of one executed batch: every request of a context-only batch starts and ends with its step."""
    iteration = IterationRecord(batch.rank, batch.iteration, start_s, end_s, batch.num_tokens, layer_ms)
    requests = [RequestRecord(r.id, r.input_len, r.arrival_s, start_s, end_s, batch.rank) for r in batch.requests]
    return iteration, requests


def percentiles(values: Sequence[float]) -> Percentiles:
    """p50/p90 (numpy's linear interpolation) and mean; raises on no values rather than reporting NaN."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarize")
    return Percentiles(float(np.percentile(array, 50)), float(np.percentile(array, 90)), float(array.mean()))


def ttft(requests: Sequence[RequestRecord]) -> Percentiles:
    return percentiles([r.ttft_s for r in requests])


def makespan_s(requests: Sequence[RequestRecord]) -> float:
    """From the first arrival (or start, if earlier) to the last end: the run's wall time as a client sees it."""
    if not requests:
        raise ValueError("no request records")
    begin_s = min(min(r.arrival_s for r in requests), min(r.start_s for r in requests))
    return max(r.end_s for r in requests) - begin_s


def context_tps_per_gpu(requests: Sequence[RequestRecord], num_ranks: int) -> float:
    """Total input tokens / makespan / ranks: the paper's context-only TPS/GPU."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    return sum(r.input_len for r in requests) / makespan_s(requests) / num_ranks


def iteration_latency(iterations: Sequence[IterationRecord]) -> Percentiles:
    return percentiles([it.latency_s for it in iterations])


def rank_times(iterations: Sequence[IterationRecord], num_ranks: int, makespan_s: float) -> list[RankTime]:
    """Busy and idle time of every rank (ranks that never ran are idle throughout). A rank busier than the makespan
    means overlapping or misattributed steps, which is a runtime bug, so it raises."""
    busy_s = np.zeros(num_ranks)
    for it in iterations:
        if not 0 <= it.rank < num_ranks:
            raise ValueError(f"iteration record has rank {it.rank}, outside [0, {num_ranks})")
        busy_s[it.rank] += it.latency_s
    over = [k for k in range(num_ranks) if busy_s[k] > makespan_s * (1 + 1e-9)]
    if over:
        raise ValueError(f"ranks {over} are busy longer than the makespan {makespan_s} s: overlapping steps")
    return [RankTime(k, float(busy_s[k]), float(makespan_s - busy_s[k])) for k in range(num_ranks)]


def dep_steps(iterations: Sequence[IterationRecord], num_ranks: int) -> DepSteps:
    """Groups DEP per-rank records by iteration number (ranks without a record in a step had no tokens)."""
    if not iterations:
        raise ValueError("no iteration records")
    numbers = sorted({it.iteration for it in iterations})
    row = {n: i for i, n in enumerate(numbers)}
    start_s, end_s = np.full(len(numbers), np.inf), np.full(len(numbers), -np.inf)
    rank_tokens = np.zeros((len(numbers), num_ranks), dtype=np.int64)
    for it in iterations:
        if not 0 <= it.rank < num_ranks:
            raise ValueError(f"iteration record has rank {it.rank}, outside [0, {num_ranks})")
        i = row[it.iteration]
        start_s[i], end_s[i] = min(start_s[i], it.start_s), max(end_s[i], it.end_s)
        rank_tokens[i, it.rank] += it.num_tokens
    return DepSteps(np.asarray(numbers), end_s - start_s, rank_tokens)


def sync_overhead(step_s: Sequence[float], rank_compute_s: np.ndarray) -> np.ndarray:
    """Per-step DEP synchronization overhead [steps]: 1 - mean over ranks of the rank's standalone compute time
    [steps, ranks] / the synchronized step time [steps]. Not clipped: a negative value flags noisy compute timings."""
    step_s = np.asarray(step_s, dtype=np.float64)
    rank_compute_s = np.asarray(rank_compute_s, dtype=np.float64)
    if rank_compute_s.ndim != 2 or rank_compute_s.shape[0] != step_s.shape[0]:
        raise ValueError(f"rank_compute_s must be [steps, ranks] with steps={step_s.shape[0]}, "
                         f"got shape {rank_compute_s.shape}")
    if (step_s <= 0).any():
        raise ValueError("step times must be > 0")
    return 1.0 - rank_compute_s.mean(axis=1) / step_s


def overall_sync_overhead(step_s: Sequence[float], rank_compute_s: np.ndarray) -> float:
    """The run's synchronization overhead: per-step overheads weighted by step time (1 - total mean compute / total
    step time), so a few short steps do not dominate."""
    step_s = np.asarray(step_s, dtype=np.float64)
    return float(np.sum(sync_overhead(step_s, rank_compute_s) * step_s) / np.sum(step_s))


def sync_overhead_band(step_s: Sequence[float], rank_compute_s: np.ndarray, z: float = 2.0) -> tuple[float, float]:
    """`overall_sync_overhead` +- z standard errors of that step-time-weighted mean over the sampled steps: the
    per-step estimates scatter with the timing noise (and with real step-to-step differences). One step gives no
    scatter to measure: a band of zero width."""
    step_s = np.asarray(step_s, dtype=np.float64)
    per_step = sync_overhead(step_s, rank_compute_s)
    weights = step_s / step_s.sum()
    mean = overall_sync_overhead(step_s, rank_compute_s)  # the band's centre is the reported value, to the bit
    n = per_step.size
    se = float(np.sqrt(np.sum(weights**2 * (per_step - mean) ** 2) * n / (n - 1))) if n > 1 else 0.0
    return mean - z * se, mean + z * se


def within_noise(band: Sequence[float]) -> bool:
    """Whether a cost measured with this band cannot be told from zero: its band reaches zero or below."""
    return band[0] <= 0.0


def rank_token_cv(rank_tokens: np.ndarray) -> np.ndarray:
    """Per-step coefficient of variation sigma/mu (population sigma) of tokens over ranks [steps]; NaN for a step where
    no rank has tokens, where the CV is undefined."""
    rank_tokens = np.asarray(rank_tokens, dtype=np.float64)
    mean = rank_tokens.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, rank_tokens.std(axis=1) / mean, np.nan)


def breakdown(iterations: Sequence[IterationRecord],
              estimated_ms: Mapping[str, float] | None = None) -> dict[str, dict[str, float | str]]:
    """Per-iteration latency breakdown {category: {"ms", "source"}} in CATEGORIES order.

    A measured category is the mean of `layer_ms[category]` over the iterations that report it; `estimated_ms` (e.g.
    from the roofline model) fills only categories nobody measured. Categories in neither are left out, never
    invented as zero. Unknown category names or negative times raise.
    """
    measured: dict[str, list[float]] = {}
    for it in iterations:
        for category, ms in (it.layer_ms or {}).items():
            _check_category(category, ms, f"rank {it.rank} iteration {it.iteration}")
            measured.setdefault(category, []).append(ms)
    for category, ms in (estimated_ms or {}).items():
        _check_category(category, ms, "estimated_ms")
    out: dict[str, dict[str, float | str]] = {}
    for category in CATEGORIES:
        if category in measured:
            out[category] = {"ms": float(np.mean(measured[category])), "source": MEASURED}
        elif estimated_ms and category in estimated_ms:
            out[category] = {"ms": float(estimated_ms[category]), "source": ESTIMATED}
    return out


def _check_category(category: str, ms: float, where: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"{where}: unknown breakdown category {category!r}; allowed: {', '.join(CATEGORIES)}")
    if not ms >= 0:
        raise ValueError(f"{where}: {category} time must be >= 0 ms, got {ms}")


def summarize(requests: Sequence[RequestRecord], iterations: Sequence[IterationRecord],
              num_ranks: int) -> dict[str, float | int | list[float]]:
    """The headline metrics of one strategy's run, with the key names the results files and figures use."""
    span_s = makespan_s(requests)
    ttft_s = ttft(requests)
    latency_s = iteration_latency(iterations)
    ranks = rank_times(iterations, num_ranks, span_s)
    return {
        "num_requests": len(requests),
        "total_input_tokens": sum(r.input_len for r in requests),
        "makespan_s": span_s,
        "tps_per_gpu": context_tps_per_gpu(requests, num_ranks),
        "ttft_p50_s": ttft_s.p50,
        "ttft_p90_s": ttft_s.p90,
        "ttft_mean_s": ttft_s.mean,
        "queue_mean_s": float(np.mean([r.queue_s for r in requests])),
        "num_iterations": len(iterations),
        "iteration_p50_s": latency_s.p50,
        "iteration_p90_s": latency_s.p90,
        "rank_busy_s": [r.busy_s for r in ranks],
        "rank_idle_s": [r.idle_s for r in ranks],
    }
