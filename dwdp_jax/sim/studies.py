"""The simulator's studies: each turns the roofline or the simulator into one results document (config, raw, metrics).

Why a module of its own: the absl mains (experiments/roofline.py, experiments/simulate.py) stay thin and the tests
call exactly what the mains run. Every study validates its inputs before doing any work and raises ValueError naming
the field. Documents are plain dicts: {"config", "raw", "metrics"} for dwdp_jax.results.write_results. The studies of
measured runs (calibration, grid) are in calibration.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from dwdp_jax import memory
from dwdp_jax.placement import Placement
from dwdp_jax.sim import contention, planner, roofline, simulate
from dwdp_jax.sim.config import DISCIPLINES, ContextConfig, E2EConfig
from dwdp_jax.sim.hardware import HardwareSpec
from dwdp_jax.sim.roofline import GenServer, Precision
from dwdp_jax.sim.workload import Workload
from models.config import ModelConfig

Progress = Callable[[Iterable], Iterable]


def _identity(items: Iterable) -> Iterable:
    return items


def require_positive(name: str, values: Sequence[float]) -> None:
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{name} must be a non-empty list of numbers > 0, got {list(values)}")


# ---------------------------------------------------------------------------------------------------------------------
# Roofline (blog Table 1).


def roofline_study(cfg: ModelConfig, hw: HardwareSpec, isls: Sequence[int], batches: Sequence[int], group_size: int,
                   prec: Precision, local_experts: int | None = None) -> dict:
    """T_compute/T_prefetch and T_DEP/T_DWDP over ISL x batch; the crossover ISL and the speedup peak per batch; the
    distance to blog Table 1 at batch 1."""
    require_positive("isls", isls)
    require_positive("batches", batches)
    placement = Placement.for_group(cfg.n_routed_experts, group_size, local_experts)
    points = roofline.roofline_table(cfg, hw, sorted(isls), sorted(batches), placement, prec)
    per_batch = {}
    for b in sorted(batches):
        rows = [p for p in points if p.batch == b]
        peak = max(rows, key=lambda p: p.dep_over_dwdp)
        per_batch[b] = {"crossover_isl": roofline.crossover_isl(points, b), "speedup_peak_isl": peak.isl,
                        "speedup_peak": peak.dep_over_dwdp}
    return {"config": {"hardware": hw, "precision": prec, "group_size": group_size, "placement": placement,
                       "isls": sorted(isls), "batches": sorted(batches), "model": cfg},
            "raw": {"points": [p.as_dict() for p in points]},
            "metrics": {"per_batch": per_batch, "published": roofline.published_distance(points),
                        "prefetch_bytes_per_layer": roofline.prefetch_bytes(cfg, placement, prec),
                        "expert_bytes": roofline.expert_bytes(cfg, prec)}}


# ---------------------------------------------------------------------------------------------------------------------
# Memory: which groups hold the full model on which card.


def memory_study(cfgs: Sequence[ModelConfig], cards: Sequence[HardwareSpec], group_sizes: Sequence[int],
                 max_num_tokens: Sequence[int], fraction: float) -> dict:
    """Per model (FP8 experts or not), group size and MNT: one DWDP rank's and one DEP rank's memory plan, term by
    term (`memory.plan_dwdp` / `plan_dep`, FlashAttention activations, two prefetch slots; DEP's FP8 experts take
    their tokens quantized, as the GPU's split kernels do), and whether it fits
    `fraction` of each card's memory; beside it, the same with every replicated projection FP8 as the checkpoint
    stores them (`ModelConfig.fp8_dense`, `memory.replicated_bytes`)."""
    require_positive("group_sizes", group_sizes)
    require_positive("max_num_tokens", max_num_tokens)
    if not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction}")
    rows = []
    for cfg in cfgs:
        fp8_projections = memory.replicated_bytes(cfg, fp8_dense=True)
        for n in group_sizes:
            placement = Placement.for_group(cfg.n_routed_experts, n)
            for mnt in max_num_tokens:
                plans = {"dwdp": memory.plan_dwdp(cfg, placement, mnt, attention_impl="flash")}
                if cfg.n_routed_experts % n == 0:
                    plans["dep"] = memory.plan_dep(cfg, n, mnt, attention_impl="flash", fp8_dispatch=cfg.fp8_experts)
                for strategy, plan in plans.items():
                    fp8_dense = plan.total_bytes - plan.replicated_weight_bytes + fp8_projections
                    rows.append({"fp8_experts": cfg.fp8_experts, "strategy": strategy, "group_size": n,
                                 "max_num_tokens": mnt, **dataclasses.asdict(plan), "total_bytes": plan.total_bytes,
                                 "fits": {hw.name: plan.total_bytes <= fraction * hw.memory_bytes for hw in cards},
                                 "total_bytes_fp8_dense": fp8_dense,
                                 "fits_fp8_dense": {hw.name: fp8_dense <= fraction * hw.memory_bytes
                                                                    for hw in cards}})
    return {"config": {"models": list(cfgs), "cards": {hw.name: hw.memory_bytes for hw in cards},
                       "group_sizes": list(group_sizes), "max_num_tokens": list(max_num_tokens),
                       "memory_fraction": fraction},
            "raw": {"rows": rows},
            "metrics": {"smallest_dwdp_group": {
                f"{'fp8' if cfg.fp8_experts else cfg.dtype} experts, MNT {mnt}, {hw.name}": min(
                    (r["group_size"] for r in rows if r["strategy"] == "dwdp" and r["fits"][hw.name]
                     and r["fp8_experts"] == cfg.fp8_experts and r["max_num_tokens"] == mnt), default=None)
                for cfg in cfgs for mnt in max_num_tokens for hw in cards}}}


# ---------------------------------------------------------------------------------------------------------------------
# Projection: context-only DWDP-N against DEP-N where no machine of ours runs it (full-depth R1 on 8 GPUs).


def projection_study(cfg: ModelConfig, hw: HardwareSpec, workloads: dict[str, Workload], dwdp: ContextConfig,
                     dep: ContextConfig, memory_fraction: float = 0.9) -> dict:
    """Per workload, context-only serving by DWDP and DEP groups (`simulate.simulate_context`): TPS/GPU, TTFT, the
    ratio, and beside them each rank's memory plan (`memory.plan_dwdp` / `plan_dep`, FlashAttention activations)
    and whether it fits `memory_fraction` of the card (unknown when the spec has no memory)."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    placement = Placement.for_group(cfg.n_routed_experts, dwdp.group_size, dwdp.local_experts)
    plans = {"dwdp": memory.plan_dwdp(cfg, placement, dwdp.max_num_tokens, attention_impl="flash"),
             "dep": memory.plan_dep(cfg, dep.group_size, dep.max_num_tokens, attention_impl="flash",
                                    fp8_dispatch=cfg.fp8_experts)}
    fits = {k: None if not hw.memory_bytes else p.total_bytes <= memory_fraction * hw.memory_bytes
            for k, p in plans.items()}
    rows, metrics = [], {}
    for name, w in workloads.items():
        results = {"dwdp": simulate.simulate_context(cfg, hw, dwdp, w),
                   "dep": simulate.simulate_context(cfg, hw, dep, w)}
        ratio = results["dwdp"].tps_per_gpu / results["dep"].tps_per_gpu
        rows.append({"workload": name, **{k: r.summary() for k, r in results.items()}, "dwdp_over_dep": ratio})
        metrics[name] = {"dwdp_tps_per_gpu": results["dwdp"].tps_per_gpu, "dep_tps_per_gpu": results["dep"].tps_per_gpu,
                         "dwdp_over_dep": ratio}
    return {"config": {"model": cfg, "hardware": hw, "workloads": workloads, "dwdp": dwdp, "dep": dep,
                       "memory_fraction": memory_fraction},
            "raw": {"rows": rows, "memory": {k: dataclasses.asdict(p) | {"total_bytes": p.total_bytes}
                                             for k, p in plans.items()}},
            "metrics": {"workloads": metrics, "memory_gb_per_rank": {k: p.total_bytes / 1e9 for k, p in plans.items()},
                        "fits": fits}}


# ---------------------------------------------------------------------------------------------------------------------
# Contention (paper Table 2).


def contention_study(cfg: ModelConfig, hw: HardwareSpec, group_sizes: Sequence[int], disciplines: Sequence[str],
                     min_pulls: int = 80000, isl: int = 1024, seed: int = 0, progress: Progress = _identity) -> dict:
    """Exact Pr[C = c] against paper Table 2, and what the simulator's pulls see, per discipline.

    The simulated regime is prefetch-bound (one ISL-`isl` request per step, so every rank pulls almost all the time),
    which is the model's premise; each group runs enough steps for at least `min_pulls` pulls. Empirical frequencies
    are time-weighted (a pulling rank's level at a random time). Under `none` they test the premise itself
    (asynchronous serial pulls in a random peer order, no feedback); under `fifo` contention feeds back into pull
    times (contended pulls last longer and are seen more often). Under `round_robin` every destination deliberately
    reads all its peers at once, so the level is N - 1 by construction and only the prefetch stretch (layer prefetch
    time over its contention-free time) is reported.
    """
    for n in group_sizes:
        contention.contention_pmf(n)
    if min_pulls < 1:
        raise ValueError(f"min_pulls must be >= 1, got {min_pulls}")
    bad = [d for d in disciplines if d not in DISCIPLINES]
    if bad:
        raise ValueError(f"disciplines: unknown {bad}; choose from {DISCIPLINES}")
    rows, raw = {}, {}
    for n in progress(list(group_sizes)):
        pmf = contention.contention_pmf(n)
        row = {"model_percent": [100 * p for p in pmf], "expected_slowdown_model": contention.expected_slowdown(n)}
        if n in contention.PAPER_TABLE2:
            row["paper"] = contention.matches_paper(n)
            row["paper_match"] = all(m["match"] for m in row["paper"])
        pulls_per_step = n * (n - 1) * max(1, cfg.num_moe_layers)
        workload = Workload(n * math.ceil(min_pulls / pulls_per_step), isl, input_ratio=0.8, seed=seed)
        for discipline in disciplines:
            ctx = ContextConfig("dwdp", group_size=n, max_num_tokens=isl, max_batch_size=1, discipline=discipline,
                                seed=seed)
            result = simulate.simulate_context(cfg, hw, ctx, workload)
            row[discipline] = {"layer_prefetches": len(result.prefetch_layer_s),
                               "prefetch_stretch": result.prefetch_stretch}
            if discipline != "round_robin":
                freq = result.contention_frequencies()
                empirical = [100 * freq.get(c, 0.0) for c in range(1, n)]
                row[discipline].update(empirical_percent=empirical, mean_level=sum(c * f for c, f in freq.items()),
                                       max_abs_diff_pp=max(abs(e - 100 * p) for e, p in zip(empirical, pmf)))
            raw[f"{n}_{discipline}"] = result.contention_s
        rows[n] = row
    return {"config": {"hardware": hw, "group_sizes": list(group_sizes), "disciplines": list(disciplines),
                       "min_pulls": min_pulls, "isl": isl, "seed": seed, "model": cfg},
            "raw": {"contention_s": raw}, "metrics": {"per_group": rows}}


# ---------------------------------------------------------------------------------------------------------------------
# Synchronization overhead vs imbalance (paper Fig. 1).

CV_BANDWIDTH = 0.025  # Gaussian kernel width of the overhead-vs-CV regression: half of the 5% bins of the figure
CURVE_MIN_STEPS = 20  # the trend is reported only where at least this many steps lie within two kernel widths


def local_linear(x: np.ndarray, y: np.ndarray, weight: np.ndarray, x0: float, bandwidth: float) -> float:
    """Weighted local-linear regression of y on x at x0 (Gaussian kernel): the level of the local trend line; NaN
    where fewer than CURVE_MIN_STEPS points lie within two bandwidths (no extrapolation across gaps)."""
    if np.count_nonzero(np.abs(x - x0) <= 2 * bandwidth) < CURVE_MIN_STEPS:
        return math.nan
    w = weight * np.exp(-0.5 * ((x - x0) / bandwidth) ** 2)
    design = np.stack([np.ones_like(x), x - x0], axis=1)
    a = (design * w[:, None]).T @ design
    if np.linalg.cond(a) > 1e12:
        return math.nan
    return float(np.linalg.solve(a, (design * w[:, None]).T @ y)[0])


def sync_cv_study(cfg: ModelConfig, hw: HardwareSpec, isl: int = 8192, input_ratio: float = 0.8,
                  group_size: int = 4, max_num_tokens: int = 32768, loads: Sequence[float] = (0.3, 0.5, 0.7, 0.8,
                  0.9, 1.0), seeds: Sequence[int] = (0, 1), num_requests: int = 2000, cv_target: float = 0.2,
                  prec: Precision = Precision(), progress: Progress = _identity) -> dict:
    """DEP synchronization overhead against the per-step CV of per-rank token counts.

    How CV is controlled: not set directly. Requests (lengths uniform in [r ISL, ISL]) arrive as a Poisson process at
    `loads` x the DEP group's saturation throughput (measured by a saturated run of the same simulator). At
    saturation every rank holds max_num_tokens worth of whole requests and the CV is a few percent; at lower loads a
    step carries whatever arrived during the previous one, a number of whole requests that rarely divides evenly over
    the ranks, so the CV spreads over 0-60%. Each step gives a point (CV, overhead = 1 - mean rank busy / step); the
    curve is a step-time-weighted local-linear regression (Gaussian kernel, width CV_BANDWIDTH) and, for reference,
    5%-wide bins. Nothing is fitted to the paper: the overhead follows from the roofline times of the ranks' batches.
    """
    require_positive("loads", loads)
    if num_requests < 1 or not 0 < cv_target < 1:
        raise ValueError(f"num_requests must be >= 1 and cv_target in (0, 1), got {num_requests}, {cv_target}")
    ctx = ContextConfig("dep", group_size=group_size, max_num_tokens=max_num_tokens, precision=prec)
    saturated = simulate.simulate_context(cfg, hw, ctx, Workload(8 * group_size * (max_num_tokens // isl + 1), isl,
                                                                   input_ratio))
    capacity_rps = len(saturated.requests) / saturated.makespan_s
    points = []
    for seed in progress(list(seeds)):
        for load in loads:
            w = Workload(num_requests, isl, input_ratio, rate_per_s=load * capacity_rps, seed=seed)
            for it in simulate.simulate_context(cfg, hw, ctx, w).iterations:
                points.append((it.token_cv, it.sync_overhead, it.duration_s))
    cv, overhead, step_s = np.array(points).T
    grid = np.round(np.arange(0.0, 0.51, 0.01), 2)
    curve = [local_linear(cv, overhead, step_s, g, CV_BANDWIDTH) for g in grid]
    edges = np.arange(-0.025, 0.60, 0.05)
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        m = (cv >= lo) & (cv < hi)
        if m.any():
            bins.append({"cv_center": (lo + hi) / 2, "steps": int(m.sum()),
                         "overhead": float(np.sum(overhead[m] * step_s[m]) / np.sum(step_s[m]))})
    at_target = [b for b in bins if abs(b["cv_center"] - cv_target) < 1e-9]
    return {"config": {"hardware": hw, "isl": isl, "input_ratio": input_ratio, "group_size": group_size,
                       "max_num_tokens": max_num_tokens, "loads": list(loads), "seeds": list(seeds),
                       "num_requests": num_requests, "precision": prec, "cv_bandwidth": CV_BANDWIDTH, "model": cfg},
            "raw": {"points": {"cv": cv, "overhead": overhead, "step_s": step_s}},
            "metrics": {"capacity_requests_per_s": capacity_rps, "cv_target": cv_target,
                        "overhead_at_target": local_linear(cv, overhead, step_s, cv_target, CV_BANDWIDTH),
                        "overhead_bin_at_target": at_target[0]["overhead"] if at_target else math.nan,
                        "curve": {"cv": grid, "overhead": curve}, "bins": bins}}


# ---------------------------------------------------------------------------------------------------------------------
# End-to-end Pareto frontier (Tables 5-6) and the planner.


@dataclasses.dataclass(frozen=True)
class Band:
    """One of the paper's e2e operating points (dwdp_reference.md 3.1): the generation server and the context GPU
    counts tried for each strategy."""

    name: str
    gen: GenServer
    dep_ctx_gpus: tuple[int, ...]
    dwdp_ctx_gpus: tuple[int, ...]


def paper_bands(mtp_acceptance: float = 0.8) -> list[Band]:
    """The five TPS/user bands of the paper's e2e configs (gen TP, batch per GPU, MTP; ctx GPUs incl. "-k")."""
    def gen(tp, batch, mtp):
        return GenServer(num_gpus=tp, max_batch=tp * batch, mtp_tokens=mtp, mtp_acceptance=mtp_acceptance)
    return [Band("20-40", gen(8, 256, 1), (20, 16), (20, 16)),
            Band("40-60", gen(8, 128, 1), (16, 12), (16, 12)),
            Band("60-80", gen(16, 64, 1), (28, 24), (28, 24, 20)),
            Band("80-100", gen(16, 32, 3), (16,), (16, 12)),
            Band("160-180", gen(32, 2, 3), (8,), (8, 4))]


def _e2e_workload(isl: int, osl: int, input_ratio: float, concurrency: int, cycles: int, seed: int) -> Workload:
    return Workload(max(4, cycles) * concurrency, isl, input_ratio, osl=osl, seed=seed)


def e2e_point(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, gen: GenServer, workload: Workload) -> dict:
    result = simulate.simulate_e2e(cfg, hw, E2EConfig(ctx, gen), workload)
    return result.summary()


def _ctx(strategy: str, gpus: int, group_size: int, base: ContextConfig) -> ContextConfig:
    if gpus % group_size:
        raise ValueError(f"context GPUs ({gpus}) must be a multiple of the group size ({group_size})")
    return dataclasses.replace(base, strategy=strategy, group_size=group_size, num_groups=gpus // group_size)


def pareto_study(cfg: ModelConfig, hw: HardwareSpec, bands: Sequence[Band], isl: int = 8192, osl: int = 1024,
                 input_ratio: float = 0.8, cycles: int = 5, group_size: int = 4,
                 base: ContextConfig = ContextConfig("dep", max_num_tokens=33000, max_batch_size=4), seed: int = 0,
                 progress: Progress = _identity) -> dict:
    """Every (band, strategy, ctx GPUs) point of the paper's e2e configs. Per band, as Tables 5-6: the DWDP point
    with the highest output TPS/GPU, paired with the DEP point of the closest TPS/user (the paper's pairing), and
    their TPS/user and TPS/GPU speedups and median TTFTs."""
    if not bands:
        raise ValueError("bands must not be empty")
    jobs = [(band, s, g) for band in bands for s, gpus in (("dep", band.dep_ctx_gpus), ("dwdp", band.dwdp_ctx_gpus))
            for g in gpus]
    for band, strategy, gpus in jobs:
        _ctx(strategy, gpus, group_size, base)
    points = []
    for band, strategy, gpus in progress(jobs):
        w = _e2e_workload(isl, osl, input_ratio, band.gen.max_batch, cycles, seed)
        points.append({"band": band.name, **e2e_point(cfg, hw, _ctx(strategy, gpus, group_size, base), band.gen, w)})
    table = []
    for band in bands:
        dwdp = max((p for p in points if p["band"] == band.name and p["strategy"] == "dwdp"),
                   key=lambda p: p["output_tps_per_gpu"])
        dep = min((p for p in points if p["band"] == band.name and p["strategy"] == "dep"),
                  key=lambda p: abs(p["tps_per_user_p50"] - dwdp["tps_per_user_p50"]))
        table.append({"band": band.name, "dep_ctx_gpus": dep["ctx_gpus"], "dwdp_ctx_gpus": dwdp["ctx_gpus"],
                      "tps_per_user_speedup": dwdp["tps_per_user_p50"] / dep["tps_per_user_p50"],
                      "tps_per_gpu_speedup": dwdp["output_tps_per_gpu"] / dep["output_tps_per_gpu"],
                      "ttft_dep_ms": 1e3 * dep["ttft_p50_s"], "ttft_dwdp_ms": 1e3 * dwdp["ttft_p50_s"]})
    return {"config": {"hardware": hw, "bands": list(bands), "isl": isl, "osl": osl, "input_ratio": input_ratio,
                       "cycles": cycles, "group_size": group_size, "context": base, "seed": seed, "model": cfg},
            "raw": {"points": points},
            "metrics": {"table": table, "frontier": {s: pareto_frontier([p for p in points if p["strategy"] == s])
                                                     for s in ("dep", "dwdp")}}}


def pareto_frontier(points: Sequence[dict]) -> list[dict]:
    """Points not dominated in (TPS/user, output TPS/GPU), sorted by TPS/user."""
    def key(p):
        return p["tps_per_user_p50"], p["output_tps_per_gpu"]

    def dominates(q, p):
        return key(q) != key(p) and all(a >= b for a, b in zip(key(q), key(p)))
    return sorted((p for p in points if not any(dominates(q, p) for q in points)), key=key)


def planner_study(cfg: ModelConfig, hw: HardwareSpec, band: Band, ttft_targets_s: Sequence[float],
                  group_sizes: Sequence[int] = (3, 4, 6, 8), max_ctx_gpus: int = 32, isl: int = 8192,
                  osl: int = 1024, input_ratio: float = 0.8, cycles: int = 5,
                  base: ContextConfig = ContextConfig("dwdp", max_num_tokens=33000, max_batch_size=4), seed: int = 0,
                  progress: Progress = _identity) -> dict:
    """For each TTFT target, the DWDP group size and context GPU count (any multiple of the group size up to
    `max_ctx_gpus`) with the highest output TPS/GPU, beside DEP-4 servers over the same range. Group sizes whose
    weights do not fit device memory are reported and skipped."""
    require_positive("ttft_targets_s", ttft_targets_s)
    if max_ctx_gpus < 1:
        raise ValueError(f"max_ctx_gpus must be >= 1, got {max_ctx_gpus}")
    for g in group_sizes:
        Placement.for_group(cfg.n_routed_experts, g)
    infeasible = [g for g in group_sizes if not planner.fits_memory(cfg, hw, _ctx("dwdp", g, g, base))]
    jobs = [("dwdp", g, k * g) for g in group_sizes if g not in infeasible for k in range(1, max_ctx_gpus // g + 1)]
    jobs += [("dep", 4, k * 4) for k in range(1, max_ctx_gpus // 4 + 1)]
    w = _e2e_workload(isl, osl, input_ratio, band.gen.max_batch, cycles, seed)
    points = [e2e_point(cfg, hw, _ctx(s, gpus, g, base), band.gen, w) for s, g, gpus in progress(jobs)]
    choices = {s: planner.plan([p for p in points if p["strategy"] == s], ttft_targets_s) for s in ("dwdp", "dep")}
    rows = [{"ttft_target_s": t, "dwdp": choices["dwdp"][i].best, "dep": choices["dep"][i].best}
            for i, t in enumerate(ttft_targets_s)]
    return {"config": {"hardware": hw, "band": band, "ttft_targets_s": list(ttft_targets_s),
                       "group_sizes": list(group_sizes), "max_ctx_gpus": max_ctx_gpus, "isl": isl, "osl": osl,
                       "input_ratio": input_ratio, "cycles": cycles, "context": base, "seed": seed, "model": cfg},
            "raw": {"points": points}, "metrics": {"choices": rows, "infeasible_group_sizes": infeasible}}
