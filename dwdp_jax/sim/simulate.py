"""Discrete-event simulator of DWDP and DEP context servers, alone or in disaggregated serving with generation servers.

Why: the roofline (roofline.py) assumes perfect balance and no contention. What DWDP actually buys is robustness to
imbalance (DEP ranks wait for the slowest at every MoE layer) at the price of copy-engine contention (asynchronous
pulls collide at a source). Both effects, and the serving consequences (TPS/GPU, TTFT with queueing, how many
context GPUs a TTFT target needs), need a timeline, not a formula. Per-operator times come from the roofline.

Model
- Requests (workload.py: the serving workload's) enter one FCFS queue shared by all context servers (ideal load
  balancing), batched by the serving scheduler itself (dwdp_jax.serving.scheduler; servers.py).
- DEP: each group of N ranks takes a step when free: the FCFS prefix fitting N x (max_num_tokens, max_batch_size),
  placed head-first then longest-first onto the least-loaded rank with room (DepScheduler.next_step).
  Every MoE layer is a barrier: the step pays, per layer, the slowest rank's attention, the balanced routed experts
  and the slowest rank of each all-to-all. A rank's own work (compute and its own transfers) over the step time is
  its utilization; 1 - its mean over ranks is the synchronization overhead.
- DWDP: each rank takes its own batch (DwdpScheduler.next_batch) whenever it is free and runs alone:
  dense layers, then per MoE layer attention + router + shared expert, a wait for its own prefetch of that layer, the
  routed experts with all E experts, then the issue of the prefetch two layers ahead (double buffer, write-after-
  read); the first two MoE layers are primed at the step start. With `pull_issue="after_attention"` (the engine's
  option of that name) the prefetch of the next layer is issued right after each MoE layer's attention instead,
  and only the first MoE layer is primed. Its pulls are flows on a fluid network (engine.py, pulls.py): each source
  has `egress` bytes/s for all its readers, each destination `ingress`, each flow at most one copy stream's rate,
  under a source discipline:
    fifo         serial pulls (one per owner, whole shards, in `peer_order`); a source copy engine serves one pull at
                 a time, first come first served: the paper's baseline, where a pull at contention C takes ~C tau.
    round_robin  sliced pulls interleaved over all peers (paper Listing 1); a source serves its pending destinations
                 round-robin, slice by slice, whose fluid limit is max-min fair sharing; each slice costs
                 `slice_overhead_s` of copy-engine time on top of slice_bytes / rate.
    none         serial pulls with no source limit: the open-loop premise of the paper's contention model (used to
                 check Table 2; contention is counted, never paid).
  While a rank has a pull moving data into it, its compute runs `compute_slowdown` slower (paper Appendix A: power
  and clocks, not bandwidth), its attention `attention_slowdown` slower (default: the same).
- Static shapes (`token_buckets`, as dwdp_jax.bench runs): a batch's per-token GEMMs run over its padding to the
  next bucket (a DWDP rank's own batch, a DEP step's fullest rank for every rank); attention cores and routed
  experts skip it. None (default): a batch costs its tokens, as in a runtime without static shapes.
- Contention level of a pulling rank at an instant: the number of pulls (queued or moving) at the source it is
  reading. Its distribution is time-weighted over every pulling rank ("a rank's source at a random time", the
  premise of the paper's model), which is robust to ranks whose pull boundaries stay aligned.
- Disaggregated serving (closed loop, as benchmark_serving with a concurrency): `concurrency` requests in flight;
  a request is prefilled by the context servers (TTFT = prefill end - release, queueing included), then decoded by
  the least-loaded generation server with room; its generation rate depends on how many requests that server holds
  (roofline.decode_step_s; generation.py); when it finishes, the next request is released. KV transfer is not
  modelled.
The planner (planner.py) reads the disaggregated runs.
"""

from __future__ import annotations

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from dwdp_jax.serving.scheduler import validate_requests
from dwdp_jax.serving.workload import Request
from dwdp_jax.sim import roofline
from dwdp_jax.sim.config import ContextConfig, E2EConfig
from dwdp_jax.sim.engine import Engine
from dwdp_jax.sim.generation import GenPool
from dwdp_jax.sim.hardware import HardwareSpec
from dwdp_jax.sim.pulls import PullStats, rates_fn
from dwdp_jax.sim.servers import IterationRecord, RequestQueue, RequestRecord, Run, start_context_servers
from dwdp_jax.sim.workload import Workload, input_lengths, requests
from models.config import ModelConfig


@dataclasses.dataclass
class ContextResult:
    """A context-only run: per-request and per-step records plus pull statistics (DWDP)."""

    ctx: ContextConfig
    requests: list[RequestRecord]
    iterations: list[IterationRecord]
    contention_s: dict[int, float]  # pulling time (summed over ranks) at each contention level
    prefetch_layer_s: list[float]
    ideal_prefetch_s: float

    @property
    def makespan_s(self) -> float:
        return max(r.prefill_end_s for r in self.requests) - min(r.arrival_s for r in self.requests)

    @property
    def tps_per_gpu(self) -> float:
        return sum(r.input_len for r in self.requests) / self.makespan_s / self.ctx.num_gpus

    def ttft_s(self) -> np.ndarray:
        return np.array([r.ttft_s for r in self.requests])

    @property
    def sync_overhead(self) -> float:
        """Step-time-weighted overhead over the run: 1 - total mean-rank busy time / total step time."""
        total = sum(it.duration_s for it in self.iterations)
        return 1.0 - sum(float(np.mean(it.rank_busy_s)) for it in self.iterations) / total

    @property
    def prefetch_stretch(self) -> float:
        """Mean prefetch time of a layer over its contention-free time (1: no contention)."""
        return float(np.mean(self.prefetch_layer_s)) / self.ideal_prefetch_s if self.prefetch_layer_s else math.nan

    def contention_frequencies(self) -> dict[int, float]:
        """Pr[C = c] for a pulling rank at a random time."""
        total = sum(self.contention_s.values())
        return {c: k / total for c, k in sorted(self.contention_s.items())} if total else {}

    def summary(self) -> dict:
        ttft = self.ttft_s()
        iters = np.array([it.duration_s for it in self.iterations])
        return {"strategy": self.ctx.strategy, "num_gpus": self.ctx.num_gpus, "num_requests": len(self.requests),
                "tps_per_gpu": self.tps_per_gpu, "makespan_s": self.makespan_s,
                "ttft_p50_s": float(np.median(ttft)), "ttft_p90_s": float(np.percentile(ttft, 90)),
                "ttft_mean_s": float(ttft.mean()), "iteration_p50_s": float(np.median(iters)),
                "num_iterations": len(self.iterations), "sync_overhead": self.sync_overhead,
                "exposed_wait_fraction": sum(it.exposed_wait_s for it in self.iterations) / float(iters.sum()),
                "prefetch_stretch": self.prefetch_stretch}


def _new_run(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, queued: Sequence[Request], later: int,
             lengths: np.ndarray, on_prefill_done: Callable[[int], None], track_contention: bool
             ) -> tuple[Run, PullStats]:
    """A run whose scheduler starts with the `queued` requests (ids 0..) and is submitted `later` more; `lengths` of
    them all, by request id."""
    engine = Engine(rates_fn(hw, ctx), ctx.group_size, fixed_compute=max(ctx.slowdowns) == 0)
    stats = PullStats(engine, track_contention)
    records = [RequestRecord(r.id, r.input_len, r.arrival_s) for r in queued]
    records += [RequestRecord(i, int(lengths[i]), 0.0) for i in range(len(queued), len(queued) + later)]
    run = Run(cfg, hw, ctx, engine, RequestQueue(engine, ctx, queued, later), lengths, records, [], on_prefill_done)
    start_context_servers(run, stats)
    return run, stats


def _ideal_prefetch_s(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig) -> float:
    return roofline.prefetch_s(cfg, hw, ctx.placement(cfg), ctx.precision) if ctx.strategy == "dwdp" else math.nan


def simulate_context(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, workload: Workload) -> ContextResult:
    """Context-only serving of `workload` (arrivals from the workload; OSL ignored)."""
    queued = requests(workload)
    lengths = np.array([r.input_len for r in queued])
    run, stats = _new_run(cfg, hw, ctx, queued, 0, lengths, lambda rid: None, track_contention=True)
    run.engine.run()
    run.queue.scheduler.finish()
    return ContextResult(ctx, run.requests, run.iterations, dict(stats.level_s), stats.layer_s,
                         _ideal_prefetch_s(cfg, hw, ctx))


@dataclasses.dataclass
class E2EResult:
    e2e: E2EConfig
    requests: list[RequestRecord]
    osl: int
    window: tuple[float, float]

    def steady(self) -> list[RequestRecord]:
        """Requests released inside the steady-state window."""
        lo, hi = self.window
        return [r for r in self.requests if lo <= r.arrival_s <= hi]

    def summary(self) -> dict:
        lo, hi = self.window
        done_in_window = sum(1 for r in self.requests if lo < r.end_s <= hi)
        output_tps = done_in_window * self.osl / (hi - lo)
        steady = self.steady()
        ttft = np.array([r.ttft_s for r in steady])
        per_user = np.array([self.osl / (r.end_s - r.gen_start_s) for r in steady])
        ctx = self.e2e.context
        return {"strategy": ctx.strategy, "ctx_gpus": ctx.num_gpus, "group_size": ctx.group_size,
                "gen_gpus": self.e2e.num_gen_servers * self.e2e.gen.num_gpus, "concurrency": self.e2e.in_flight,
                "output_tps": output_tps, "output_tps_per_gpu": output_tps / self.e2e.num_gpus,
                "tps_per_user_p50": float(np.median(per_user)), "ttft_p50_s": float(np.median(ttft)),
                "ttft_p90_s": float(np.percentile(ttft, 90)), "steady_requests": len(steady)}


def simulate_e2e(cfg: ModelConfig, hw: HardwareSpec, e2e: E2EConfig, workload: Workload) -> E2EResult:
    """Closed-loop disaggregated serving of `workload` (its lengths and OSL; arrival rate ignored). Steady-state
    statistics use the window from the completion of the first `in_flight` requests to the release of the last
    `in_flight` (the start-up burst and the drain are excluded): throughput counts completions inside it, TTFT and
    TPS/user the requests released inside it."""
    if workload.num_requests < 4 * e2e.in_flight:
        raise ValueError(f"Workload.num_requests={workload.num_requests} must be >= 4 x concurrency "
                         f"({e2e.in_flight}) for a steady-state window")
    lengths = input_lengths(workload)
    all_requests = [Request(i, int(n)) for i, n in enumerate(lengths)]
    ctx = e2e.context
    validate_requests(all_requests, max_num_tokens=ctx.max_num_tokens, max_batch_size=ctx.max_batch_size,
                      num_ranks=ctx.group_size)
    context_len = float(lengths.mean()) + workload.osl / 2
    gen = e2e.gen

    @functools.lru_cache(maxsize=None)
    def token_rate(active: int) -> float:
        return gen.tokens_per_step / roofline.decode_step_s(cfg, hw, gen, active, context_len, ctx.precision)

    released = [e2e.in_flight]  # the first ones at t = 0
    completions: list[float] = []

    def release() -> None:
        rid = released[0]
        if rid == workload.num_requests:
            return
        released[0] += 1
        run.requests[rid].arrival_s = run.engine.now_s
        run.queue.submit(all_requests[rid])

    def decode_done(rid: int) -> None:
        run.requests[rid].gen_start_s = pool.started_s[rid]
        run.requests[rid].end_s = run.engine.now_s
        completions.append(run.engine.now_s)
        release()

    run, _ = _new_run(cfg, hw, ctx, all_requests[:e2e.in_flight], workload.num_requests - e2e.in_flight, lengths,
                      lambda rid: pool.admit(rid), track_contention=False)
    pool = GenPool(run.engine, token_rate, e2e, workload.osl, decode_done)
    run.engine.run()
    run.queue.scheduler.finish()
    window = (completions[e2e.in_flight - 1], sorted(r.arrival_s for r in run.requests)[-e2e.in_flight])
    return E2EResult(e2e, run.requests, workload.osl, window)
