"""The serve loops: one pass of the workload on a warm runtime, request records and iteration records out.

Ranks that progress alone (DWDP, the reference; `run_rank_by_rank`): one worker thread per rank
(`workers.RankWorkers`) takes its rank's next batch from the shared scheduler (`DwdpScheduler.wait_for_batch`),
packs it (`Batching.pack`), steps the rank (`DwdpEngine.step`: the front, then per MoE layer the pulled experts'
slot, attention and the MoE over local and pulled experts, the next pull, then the head), and records the
iteration as it ends (`metrics.records_for_batch`). DEP (`run_dep`) steps every rank together in lock-step
iterations, with its synchronization estimate. `served` takes the median of the plan's repeats."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np

from dwdp_jax.profiling import breakdown_ms
from dwdp_jax.progress import Progress
from dwdp_jax.run_plan import Plan
from dwdp_jax.serving import metrics, scheduler
from dwdp_jax.serving.workers import RankRuntime, RankWorkers


def run_rank_by_rank(runtime: RankRuntime, p: Plan, name: str) -> tuple[list, list, list]:
    sched = scheduler.DwdpScheduler(p.requests, num_ranks=runtime.num_ranks, max_num_tokens=p.batching.max_num_tokens,
                                    max_batch_size=p.batching.max_batch_size, packing=p.dwdp.packing)
    req_records, iter_records, lock = [], [], threading.Lock()
    progress = Progress(len(p.requests), name)
    t0 = time.perf_counter()

    def clock():
        return time.perf_counter() - t0

    def sink(rank, batch, result):
        it, reqs = metrics.records_for_batch(batch, result.start_s - t0, result.end_s - t0,
                                             breakdown_ms(result.stages_s) if result.stages_s else None)
        with lock:
            iter_records.append(it)
            req_records.extend(reqs)
        sched.complete(batch)
        progress.update(len(batch.requests))

    workers = RankWorkers(runtime, lambda rank: sched.wait_for_batch(rank, clock), sink, batch_of=p.batching.pack)
    workers.start().join()
    progress.close()
    return req_records, iter_records, [dataclasses.asdict(a) for a in sched.finish()]


def run_dep(dep, p: Plan, sync: bool = True) -> tuple[list, list, list, dict]:
    sched = scheduler.DepScheduler(p.requests, num_ranks=dep.num_ranks, max_num_tokens=p.batching.max_num_tokens,
                                   balance=p.dep.balance, max_batch_size=p.batching.max_batch_size)
    req_records, iter_records, steps = [], [], []
    progress = Progress(len(p.requests), "dep")
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        step = sched.next_step(now)
        if step is None:
            if sched.drained:
                break
            time.sleep(max(0.0, sched.next_arrival_s() - now))
            continue
        budget = p.batching.bucket_for(max(b.num_tokens for b in step))
        packed = [p.batching.pack(b, budget) if b.requests else None for b in step]
        start = time.perf_counter() - t0
        dep.step(packed)
        end = time.perf_counter() - t0
        steps.append((packed, end - start))
        for b in step:
            if b.requests:
                it, reqs = metrics.records_for_batch(b, start, end)
                iter_records.append(it)
                req_records.extend(reqs)
            sched.complete(b)
        progress.update(sum(len(b.requests) for b in step))
    progress.close()
    return (req_records, iter_records, [dataclasses.asdict(a) for a in sched.finish()],
            sync_estimate(dep, steps, p.dep.sync_samples) if sync else {})


def sync_estimate(dep, steps: list, samples: int) -> dict[str, Any]:
    """Synchronization overhead of DEP (paper Fig. 1) on sampled steps: each rank's batch alone (the other ranks
    empty) is that rank's compute time; overhead = 1 - mean(rank compute) / step time (`DepRuntime.sync_times`)."""
    if not steps:
        return {}
    idx = np.linspace(0, len(steps) - 1, min(samples, len(steps))).round().astype(int)
    step_s, rank_s, tokens = [], [], []
    for i in sorted(set(idx.tolist())):
        packed, _ = steps[i]
        step, alone = dep.sync_times(packed)
        step_s.append(step)
        rank_s.append(alone)
        tokens.append([0 if b is None else b.num_tokens for b in packed])
    rank_s = np.asarray(rank_s)
    band = metrics.sync_overhead_band(step_s, rank_s)
    return {"sampled_steps": len(step_s), "step_s": step_s, "rank_compute_s": rank_s.tolist(),
            "rank_tokens": tokens, "sync_overhead": metrics.overall_sync_overhead(step_s, rank_s),
            "sync_overhead_band": list(band), "sync_overhead_within_noise": metrics.within_noise(band),
            "rank_cv_mean": float(np.nanmean(metrics.rank_token_cv(np.asarray(tokens, float))))}


# DEP's synchronization estimate (`sync_estimate`) in the strategy's summary
SYNC_KEYS = ("sync_overhead", "sync_overhead_band", "sync_overhead_within_noise", "sampled_steps", "rank_cv_mean")


def served(strategy, runtime, p: Plan, ranks: int) -> tuple[dict, dict]:
    """The plan's repeats (`strategy.serve`) of p's requests on a warm runtime: (summary, raw records) of the pass of
    median TPS/GPU (the lower middle one of an even count), with every pass's TPS/GPU beside it."""
    repeats = [strategy.serve(runtime, p, sync=i == 0) for i in range(p.measure.repeats)]
    summaries = [metrics.summarize(reqs, iters, ranks) for reqs, iters, _, _ in repeats]
    tps = [s["tps_per_gpu"] for s in summaries]
    median = sorted(range(len(tps)), key=tps.__getitem__)[(len(tps) - 1) // 2]
    reqs, iters, assignments, extra = repeats[median]
    extra = {**repeats[0][3], **extra}  # DEP's synchronization estimate comes with the first pass
    summary = {**summaries[median], "repeats_tps_per_gpu": tps, "tps_per_gpu_band": [min(tps), max(tps)],
               **{k: v for k, v in extra.items() if k in SYNC_KEYS}}
    if "pull_contention" in extra:
        summary["pull_contention"] = {k: extra["pull_contention"][k] for k in ("measured", "model")}
    raw = {"requests": [dataclasses.asdict(r) for r in reqs],
           "iterations": [dataclasses.asdict(i) for i in iters], "assignments": assignments, **extra}
    return summary, raw
