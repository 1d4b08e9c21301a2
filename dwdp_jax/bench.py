"""The context-only serving benchmark: DWDP and DEP (and the single-device reference) on the same model, weights
and workload.

`run(config)` validates the config into a typed plan (`validation`, `run_plan.Plan`), checks what needs the devices
(their count, memory), builds the weights, then takes each strategy (`strategies`) through the same sequence,
reading only the plan: build its runtime, verify its step against the reference (`verification`), warm it up,
serve the whole workload (`serving.loop`), profile it (`profiling`). It announces each phase on stderr
(`progress`) and writes one results file with the raw records, the metrics with their noise bands, the
verification block, the HLO collective counts, the per-layer breakdown and what the timings can claim (`report`:
on CPU a functional check).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from typing import Any, Callable

import jax
from flax import nnx

from dwdp_jax import checkpoint, compile_cache, memory, strategies
from dwdp_jax import results as results_lib
from dwdp_jax.expert_source import SyntheticExperts
from dwdp_jax.profiling import first_step_batches, traced_pass
from dwdp_jax.progress import Phases, progress_bar
from dwdp_jax.report import ratios, timing_context
from dwdp_jax.run_plan import Plan
from dwdp_jax.runtime import reference, stages
from dwdp_jax.serving.loop import served
from dwdp_jax.validation import plan
from dwdp_jax.verification import (judged_by_floor, reference_noise, reference_output, routing_skew,
                                   verification_batches, verify)
from models import deepseek_v3


def configure_backend(c) -> None:
    """What the config sets before the JAX backend starts (which reads XLA_FLAGS and the CPU device count then):
    XLA's excess precision, the virtual CPU devices and the persistent compilation cache."""
    if not c.xla_excess_precision:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_allow_excess_precision=false".strip()
    jax.config.update("jax_num_cpu_devices", c.cpu_devices)  # only affects the CPU backend
    if c.compilation_cache:
        compile_cache.enable(c.compilation_cache)


def build_params(p: Plan) -> reference.Params:
    """The weights, with the plan's attention backend set on every MLA module."""
    params = _weights(p)
    return params._replace(model=stages.with_attention_impl(params.model, p.weights.attention_impl))


def _weights(p: Plan) -> reference.Params:
    w = p.weights
    if w.source == "synthetic":  # R1-width experts generated on each rank's device, never whole
        return reference.Params(deepseek_v3.DeepseekV3(p.cfg, nnx.Rngs(w.seed)), SyntheticExperts(p.cfg, w.seed))
    if w.source == "checkpoint" and checkpoint.is_orbax_checkpoint(w.checkpoint):
        return checkpoint.restore_model(w.checkpoint)[1]
    if w.source == "checkpoint":
        cfg, params = checkpoint.load_hf_checkpoint(w.checkpoint)
        if cfg.n_routed_experts != p.cfg.n_routed_experts:
            raise ValueError(f"checkpoint has {cfg.n_routed_experts} experts, the config {p.cfg.n_routed_experts}")
        return params
    return reference.Params(*deepseek_v3.init_model(p.cfg, seed=w.seed))


def make_runtime(name: str, params: reference.Params, p: Plan):
    """Strategy `name`'s runtime on its devices."""
    return strategies.get(name).build(params, p)


def run(c, runtime_classes: dict[str, Callable] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the results document (also written to results/<experiment>/<run>.json).

    The strategies run one after the other, each alone on the devices (built, verified, warmed up, run, profiled,
    freed), so each gets the memory the depth planner sized it for. `runtime_classes` stands other runtimes in for
    strategies by name (a failing one in tests).
    """
    phases = Phases()
    phases.begin("plan: checking the config and the workload, starting the JAX backend")
    p = phases.lap("plan", plan(c))
    phases.begin(f"params: {p.cfg.num_hidden_layers} layers, {p.cfg.n_routed_experts} experts per MoE layer, "
                 f"{p.cfg.dtype} ({p.weights.checkpoint or p.weights.source})")
    params = phases.lap("params", build_params(p))
    run_name = c.run or f"{c.name}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    vb = verification_batches(p)
    refs = None
    if p.verify.enabled:
        phases.begin("reference: the verification batches on one device")
        refs = [reference_output(params, b, p) if b is not None else None
                for b in progress_bar(vb, "reference", "batch")]
    phases.lap("reference")
    skew = routing_skew(refs, p.cfg.n_routed_experts)
    noise = {}
    if refs and p.verify.noise_floor:
        phases.begin("reference noise: the reference with its embeddings one last bit off")
        noise = reference_noise(params, refs, vb, p)
    phases.lap("reference_noise")
    s = {k: {} for k in ("verification", "hlo_collectives", "raw", "summary", "breakdown", "failures")}
    s["raw"]["phase_s"] = phases.seconds
    for name in p.strategies:
        strategy = strategies.get(name, (runtime_classes or {}).get(name))
        try:
            for key, value in run_strategy(strategy, params, p, vb, refs, phases).items():
                s[key].update(value)
        except (RuntimeError, memory.DoesNotFit) as e:  # a device failure or memory refusal: kept with the others
            s["failures"][name] = f"{type(e).__name__}: {e}"[:4000]
        gc.collect()
    if noise:
        s["verification"] = {name: judged_by_floor(v, noise) for name, v in s["verification"].items()}
    summary = s["summary"]
    if {"dwdp", "dep"} <= summary.keys():
        summary["ratio"] = ratios(summary["dwdp"], summary["dep"])
        if p.variants:
            summary["ratio"]["variants"] = {v: ratios(summary["dwdp"]["variants"][v], summary["dep"]["variants"][v])
                                            for v in p.variants}
    timing = timing_context(p.devices, p.measure.repeats)
    path = results_lib.write_results(c.experiment, run_name, config=c, raw=s["raw"], metrics=summary,
                                     verification=s["verification"], root=c.results_root,
                                     hlo_collectives=s["hlo_collectives"], breakdown=s["breakdown"], routing_skew=skew,
                                     model=dataclasses.asdict(p.cfg),
                                     placement=p.placement and dataclasses.asdict(p.placement),
                                     failures=s["failures"], reference_noise=noise, timing=timing)
    if s["failures"]:
        raise RuntimeError(f"strategies failed (the others' results are in {path}): {s['failures']}")
    return {"path": str(path), "metrics": summary, "verification": s["verification"], "phase_s": phases.seconds,
            "hlo_collectives": s["hlo_collectives"], "breakdown": s["breakdown"], "routing_skew": skew,
            "reference_noise": noise, "timing": timing}


def run_strategy(strategy: strategies.Strategy, params, p: Plan, vb, refs, phases: Phases | None = None
                 ) -> dict[str, dict]:
    """One strategy alone on the devices: built, verified, warmed up, run, profiled. Returns its part of each
    results section ({section: {...}}); the runtime is freed on return."""
    phases = phases or Phases()
    name, ranks = strategy.name, strategy.ranks(p)
    phases.begin(f"{name}: building the runtime on {ranks} devices")
    runtime = phases.lap(f"{name}.build", strategy.build(params, p))
    batches = (vb + [None] * ranks)[:ranks]
    phases.begin(f"{name}: verifying against the reference (compiles its step)")
    outs = strategy.step(runtime, batches)
    out = {"verification": {}, "hlo_collectives": {name: strategy.collectives(runtime, vb[0])}, "breakdown": {}}
    if refs:
        out["verification"][name] = verify(outs, (refs + [None] * ranks)[:ranks], p.verify.rel_tol,
                                           p.verify.min_id_match)
    phases.lap(f"{name}.verify")
    phases.begin(f"{name}: warm-up, compiling the step for each of {len(p.batching.buckets)} token buckets")
    strategy.warm_up(runtime, p)
    phases.lap(f"{name}.warm_up")
    phases.begin(f"{name}: serving {len(p.requests)} requests, {p.measure.repeats} pass(es)")
    summary, raw = served(strategy, runtime, p, ranks)
    phases.lap(f"{name}.serve")
    if p.variants:
        phases.begin(f"{name}: serving the variants {', '.join(p.variants)}")
        variants = {v: served(strategy, runtime, dataclasses.replace(p, requests=reqs, batching=batching), ranks)
                    for v, (reqs, batching) in p.variants.items()}
        summary["variants"] = {v: vs for v, (vs, _) in variants.items()}
        raw["variants"] = {v: vr for v, (_, vr) in variants.items()}
        phases.lap(f"{name}.variants")
    summary.update(strategy.step_memory(runtime, p))
    if p.measure.trace:
        phases.begin(f"{name}: a served pass under the profiler into {p.measure.trace}")
        try:
            summary["trace"] = traced_pass(name, lambda: strategy.serve(runtime, p, sync=False)[1], p, ranks,
                                           strategy.lock_step)
        except Exception as e:  # a diagnostic: a profiler or trace-format failure must not cost the measurements
            summary["trace"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        phases.lap(f"{name}.trace")
    if p.measure.breakdown:
        phases.begin(f"{name}: profiling the first step stage by stage (compiles each stage)")
        out["breakdown"] = {name: strategy.profile(runtime, first_step_batches(p), p)}
    phases.lap(f"{name}.profile")
    timeline_summary, timeline_raw = strategy.timeline(runtime, p, phases)
    summary.update(timeline_summary)
    raw.update(timeline_raw)
    return {**out, "summary": {name: summary}, "raw": {name: raw}}
