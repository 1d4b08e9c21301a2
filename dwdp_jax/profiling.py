"""Where a strategy's time goes, beyond its served metrics: the traced pass (XLA's HLO dump and the profiler's
device kernels, by stage), the stage-by-stage profile of the first DEP step in the paper's categories, DWDP's
copy-engine pull timeline and the pull contention over a served run."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from dwdp_jax import stage_trace
from dwdp_jax.packing import PackedBatch
from dwdp_jax.progress import progress_bar
from dwdp_jax.run_plan import Plan
from dwdp_jax.runtime.dwdp import DwdpEngine
from dwdp_jax.serving import metrics, scheduler
from dwdp_jax.sim import contention


def breakdown_ms(stages_s: dict[str, float]) -> dict[str, float]:
    """DWDP profiled stages in the paper's categories (see the results' breakdown labels): attention of every
    layer, the MoE layers' FFN (router, shared expert, grouped GEMMs), dense MLPs with embedding and head (the
    head program only: the outputs' host copies, in no category, once ran inside it)."""
    return {"attention": 1e3 * stages_s.get("attention", 0.0), "grouped_gemm": 1e3 * stages_s.get("moe", 0.0),
            "dense_gemm": 1e3 * (stages_s.get("embed", 0.0) + stages_s.get("dense_mlp", 0.0)
                                 + stages_s.get("head", 0.0)),
            "p2p_exposed_wait": 1e3 * stages_s.get("pull_wait", 0.0), "communication": 0.0, "synchronization": 0.0}


def trace_dump_flags(trace: str) -> str:
    return f"--xla_dump_to={Path(trace) / 'hlo'} --xla_dump_hlo_as_text"


def start_trace_dump(trace: str) -> None:
    """Turns on XLA's HLO dump into config.trace for `traced_pass`; call before the backend starts. The directory
    must be new or empty: XLA numbers its modules per process, so another run's dumps would name other programs."""
    root = Path(trace)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"config.trace={trace!r} is not empty; give a new directory (its HLO dumps would mix "
                         f"with this run's)")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {trace_dump_flags(trace)}".strip()


def traced_pass(name: str, serve_pass: Callable[[], list], p: Plan, ranks: int, lock_step: bool
                ) -> dict[str, Any]:
    """One more served pass (`serve_pass`, returning its iteration records) under the profiler: per rank its
    iterations (with `lock_step` every rank runs every iteration) and its device's time by stage in that pass
    (`stage_trace.breakdown`; ranks that ran nothing are left out), and their per-iteration means over the ranks."""
    trace_dir = Path(p.measure.trace) / name
    with jax.profiler.trace(str(trace_dir)):
        iters = serve_pass()
    per_rank = collections.Counter(i.rank for i in iters)
    iterations = {r: len({i.iteration for i in iters}) if lock_step else per_rank[r] for r in range(ranks)}
    kernels = stage_trace.device_kernels(stage_trace.newest_xplane(trace_dir))
    events = {d.id: kernels[d.id] for d in p.devices[:ranks] if kernels.get(d.id)}
    scopes = stage_trace.hlo_scopes(Path(p.measure.trace) / "hlo", [e for es in events.values() for e in es])
    by_device = stage_trace.breakdown(events, scopes)
    traced = {rank: by_device[d.id] for rank, d in enumerate(p.devices[:ranks]) if d.id in by_device}
    per_iteration = collections.defaultdict(list)
    for rank, t in traced.items():
        for key, ms in [(k, t[k]) for k in ("span_ms", "busy_ms", "idle_ms")] + list(t["stages_ms"].items()):
            per_iteration[key.removesuffix("_ms")].append(ms / max(iterations[rank], 1))
    return {"iterations": iterations, "ranks": traced,
            "per_iteration_ms": {k: float(np.mean(v)) for k, v in per_iteration.items()}}


def first_step_batches(p: Plan) -> list[PackedBatch | None]:
    """Each rank's batch of the workload's first DEP step (the profiled and timed batches)."""
    first = scheduler.DepScheduler(p.requests, num_ranks=p.dep.num_ranks, max_num_tokens=p.batching.max_num_tokens,
                                   balance=p.dep.balance,
                                   max_batch_size=p.batching.max_batch_size).next_step(float("inf"))
    budget = p.batching.bucket_for(max(b.num_tokens for b in first))
    return [p.batching.pack(b, budget) if b.requests else None for b in first]


def pull_timeline(engine: DwdpEngine, batches: list[PackedBatch | None]) -> dict[str, Any]:
    """Copy-engine pulls on the device clock, each rank's batch run alone (unprofiled, so pulls overlap as when
    serving): per-layer pull GB/s and the exposed wait (XLA's stream stalled at a MoE's read-after-write fence)
    as a fraction of the step."""
    bytes_per_expert = engine.cfg.expert_params() * jax.numpy.dtype(engine.cfg.dtype).itemsize
    gbps, exposed, per_rank = [], [], []
    for r, b in enumerate(batches):
        if b is None or r >= engine.num_ranks:
            continue
        result = engine.step(r, b)
        marks = engine.transport.timeline(r)
        starts = {layer: ms for label, layer, ms in marks if label == "copy_start"}
        ends = {layer: ms for label, layer, ms in marks if label == "copy_end"}
        arrive = [ms for label, _, ms in marks if label == "wait_arrive"]
        resume = [ms for label, _, ms in marks if label == "wait_resume"]
        layer_bytes = engine.placement.bytes_pulled_per_layer(r, bytes_per_expert)
        rank_gbps = [layer_bytes / (ends[m] - starts[m]) / 1e6 for m in starts]
        wait_ms = float(sum(b_ - a for a, b_ in zip(arrive, resume)))
        step_ms = 1e3 * (result.end_s - result.start_s)
        gbps += rank_gbps
        exposed.append(wait_ms / step_ms)
        per_rank.append({"rank": r, "pull_gbps": rank_gbps, "exposed_wait_ms": wait_ms, "step_ms": step_ms,
                         "layer_bytes": layer_bytes, "marks": marks})
    return {"pull_gbps_median": float(np.median(gbps)), "exposed_wait_fraction_mean": float(np.mean(exposed)),
            "ranks": per_rank, "source": metrics.MEASURED}


def pull_contention(engine: DwdpEngine) -> dict[str, Any]:
    """Copy-engine contention over the served run (GPU with `timeline`): Pr[C = c] from every rank's per-source pull
    spans on the host clock, next to the paper's model for this group size (sim.contention)."""
    spans = engine.transport.source_intervals()
    t0 = min((start for *_, start, _ in spans), default=0.0)
    n = engine.num_ranks
    return {"measured": contention.measured_levels([(d, s, a, b) for d, s, _, a, b in spans]),
            "model": dict(enumerate(contention.contention_pmf(n), start=1)) if n >= 3 else {1: 1.0},
            "spans": [(d, s, layer, a - t0, b - t0) for d, s, layer, a, b in spans], "source": metrics.MEASURED}


def rank_by_rank_breakdown(runtime, batches: list[PackedBatch | None]) -> dict[str, dict[str, Any]]:
    """Per-iteration milliseconds in the paper's categories for a runtime whose ranks step alone (DWDP, the
    reference): each rank's batch of the first DEP step profiled alone (on rank r mod its ranks) and averaged.
    Stage times are measured one program at a time with a device sync; grouped_gemm includes the router and shared
    expert (one program)."""
    runs = []
    for r, b in enumerate(progress_bar(batches, "profile", "rank")):
        if b is not None:
            runtime.step(r % runtime.num_ranks, b, profile=True)  # compiles the per-stage programs
            runs.append(breakdown_ms(runtime.step(r % runtime.num_ranks, b, profile=True).stages_s))
    return {k: {"ms": float(np.mean([run[k] for run in runs])), "source": metrics.MEASURED} for k in runs[0]}


def dep_breakdown(dep, batches: list[PackedBatch | None], cfg) -> dict[str, dict[str, Any]]:
    """Per-iteration milliseconds in the paper's categories on the first DEP step, profiled one program at a time
    with a device sync; the router and shared expert are in others, and synchronization is estimated (sync
    overhead x step time)."""
    prof = dep.profile(batches)
    t = {k: 1e3 * v for k, v in prof.stage_total_s.items()}
    measured = {"attention": t.get("attention", 0.0), "grouped_gemm": t.get("moe_gmm", 0.0),
                "dense_gemm": t.get("dense_mlp", 0.0) + t.get("head", 0.0) + t.get("embed", 0.0),
                "others": t.get("router", 0.0) + t.get("shared_expert", 0.0),
                "communication": t.get("dispatch", 0.0) + t.get("combine", 0.0), "p2p_exposed_wait": 0.0}
    out = {k: {"ms": v, "source": metrics.MEASURED} for k, v in measured.items()}
    moved = all2all_bytes_per_rank(prof.outputs, batches, dep.num_ranks, cfg)
    out["communication"].update(bytes_per_rank=moved, gbps_per_rank=moved / max(measured["communication"], 1e-9) / 1e6)
    out["synchronization"] = {"ms": max(prof.sync_overhead, 0.0) * 1e3 * prof.step_s, "source": metrics.ESTIMATED}
    return out


def all2all_bytes_per_rank(outputs, batches, num_ranks: int, cfg) -> float:
    """Mean bytes a DEP rank sends to other ranks in one step, dispatch and combine over every MoE layer: each of
    its (token, choice) rows whose expert lives on another rank crosses twice, hidden_size wide."""
    per_rank = cfg.n_routed_experts // num_ranks
    row_bytes = cfg.hidden_size * jax.numpy.dtype(cfg.dtype).itemsize
    sent = [sum(int((np.asarray(ids) // per_rank != r).sum()) for ids in out.expert_ids) if b is not None else 0
            for r, (out, b) in enumerate(zip(outputs, batches))]
    return 2.0 * row_bytes * float(np.mean(sent))
