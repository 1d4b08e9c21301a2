"""The context-only serving benchmark: DWDP and DEP on the same model, weights and workload.

`run(config)` validates everything that can be checked without a device (workload vs MNT, placement vs devices,
memory), builds the weights, verifies both strategies against the reference runtime, runs each strategy over the
whole workload (DWDP: one worker thread per device pulling from a shared queue; DEP: lock-step iterations), and
writes one results file with the raw records, the metrics, the verification block, the HLO collective counts and
the per-layer breakdown.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dwdp_jax import checkpoint, evaluate, memory, stage_trace
from dwdp_jax import results as results_lib
from dwdp_jax.expert_source import SyntheticExperts
from dwdp_jax.kernels import grouped_gemm
from dwdp_jax.kernels.attention import MAX_SEGMENTS
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import reference, stages
from dwdp_jax.runtime.dwdp import PULL_ISSUES, DwdpEngine, DwdpOptions, DwdpWorkers, count_collectives
from dwdp_jax.serving import metrics, scheduler, workload
from dwdp_jax.sim import contention
from dwdp_jax.transport import transport_class
from models import config as model_config
from models import deepseek_v3

STRATEGIES = ("dwdp", "dep")


MODEL_OVERRIDES = ("num_hidden_layers", "hidden_size", "n_routed_experts", "vocab_size")


def model_config_from(c, num_hidden_layers: int = 0) -> model_config.ModelConfig:
    """The preset with the config's non-zero overrides; no MTP (context-only serving never runs it). An Orbax
    checkpoint brings its own config (see orbax_model_config)."""
    if c.model.checkpoint and checkpoint.is_orbax_checkpoint(c.model.checkpoint):
        return orbax_model_config(c)
    overrides = {k: c.model[k] for k in MODEL_OVERRIDES if c.model[k]}
    if num_hidden_layers:
        overrides["num_hidden_layers"] = num_hidden_layers
    return model_config.get_preset(c.model.preset, dtype=c.model.dtype, num_nextn_predict_layers=0, **overrides)


def orbax_model_config(c) -> model_config.ModelConfig:
    """The ModelConfig stored with the Orbax checkpoint; config.model's non-zero fields and dtype must agree with it
    (they say which model the run expects)."""
    cfg = checkpoint.load_config(c.model.checkpoint)
    wanted = {**{k: c.model[k] for k in MODEL_OVERRIDES if c.model[k]}, "dtype": c.model.dtype}
    wrong = [f"config.model.{k}={v!r} but the checkpoint has {getattr(cfg, k)!r}" for k, v in wanted.items()
             if getattr(cfg, k) != v]
    if wrong:
        raise ValueError(f"checkpoint {c.model.checkpoint} does not match the config: " + "; ".join(wrong))
    return cfg


def depth_that_fits(cfg: model_config.ModelConfig, placement: Placement, c, device_bytes: int) -> int:
    """The deepest model (num_hidden_layers) whose DWDP and DEP ranks both fit `device_bytes`
    (config.model.num_hidden_layers = 0 asks for it: R1-width layers on the GPUs at hand)."""
    dwdp = memory.max_layers_that_fit(cfg, placement, c.max_num_tokens, device_bytes, attention_impl="flash",
                                      live_slots=transport_class(c.dwdp.transport).live_slots,
                                      row_align=grouped_gemm.row_alignment(c.gemm_backend))
    for layers in range(dwdp, cfg.first_k_dense_replace, -1):
        try:
            memory.plan_dep(cfg.replace(num_hidden_layers=layers), dep_ranks(c), c.max_num_tokens,
                            attention_impl="flash", device_bytes=device_bytes)
            return layers
        except ValueError:
            continue
    raise ValueError(f"no depth of {c.model.preset} fits {device_bytes / 2**30:.1f} GiB per device for DEP")


def requests_from(c) -> list[workload.Request]:
    w = c.workload
    rate = w.rate_per_s or None
    if w.dataset:
        return workload.read_dataset(w.dataset, rate_per_s=rate, seed=w.seed)
    return workload.synthetic_requests(w.num_requests, w.isl, input_ratio=w.input_ratio,
                                       isl_std=None if w.isl_std < 0 else w.isl_std, rate_per_s=rate, seed=w.seed)


def variant_plan(c, name: str, fields: dict[str, Any]) -> tuple[list[workload.Request], Any]:
    """A variant's requests and the run's config with its fields. A smaller batch budget keeps the run's bucket
    size, so every batch pads to a shape the runtimes compiled; it must be one of the run's token buckets."""
    if c.workload.dataset:
        raise ValueError("config.variants change synthetic workload fields; config.workload.dataset is set")
    vc = c.copy_and_resolve_references()
    vc.workload.update({k: v for k, v in fields.items() if k != "max_num_tokens"})
    if "max_num_tokens" in fields:
        buckets = token_buckets(c)
        if fields["max_num_tokens"] not in buckets:
            raise ValueError(f"config.variants {name!r}: max_num_tokens must be one of the run's token buckets "
                             f"{buckets}, got {fields['max_num_tokens']}")
        vc.max_num_tokens = fields["max_num_tokens"]
        vc.token_buckets = buckets.index(vc.max_num_tokens) + 1
    reqs = requests_from(vc)
    try:
        scheduler.validate_requests(reqs, max_num_tokens=vc.max_num_tokens, max_batch_size=c.max_batch_size,
                                    num_ranks=c.num_ranks)
    except ValueError as e:
        raise ValueError(f"config.variants {name!r}: {e}") from e
    return reqs, vc


def dep_ranks(c) -> int:
    return c.dep.num_ranks or c.num_ranks


def strategies_from(c) -> tuple[str, ...]:
    names = tuple(s.strip() for s in c.strategies.split(",") if s.strip())
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ValueError(f"config.strategies must be a comma list of {STRATEGIES}, got {c.strategies!r}")
    return names


@dataclasses.dataclass
class Plan:
    """Everything decided before touching a device."""

    cfg: model_config.ModelConfig
    requests: list[workload.Request]
    strategies: tuple[str, ...]
    placement: Placement
    devices: list
    # config.variants: name -> (requests, the run's config with the variant's fields)
    variants: dict[str, tuple[list[workload.Request], Any]] = dataclasses.field(default_factory=dict)


def plan(c) -> Plan:
    """Validation without device work: ValueError names the offending field."""
    if c.num_ranks < 1:
        raise ValueError(f"config.num_ranks must be >= 1, got {c.num_ranks}")
    if c.repeats < 1:
        raise ValueError(f"config.repeats must be >= 1, got {c.repeats}")
    cfg = model_config_from(c)
    requests = requests_from(c)
    scheduler.validate_requests(requests, max_num_tokens=c.max_num_tokens, max_batch_size=c.max_batch_size,
                                num_ranks=c.num_ranks)
    variants = {name: variant_plan(c, name, fields) for name, fields in workload.parse_variants(c.variants).items()}
    strategies = strategies_from(c)
    if c.dep.balance not in scheduler.DepScheduler.BALANCES:
        raise ValueError(f"config.dep.balance must be one of {scheduler.DepScheduler.BALANCES}, got {c.dep.balance!r}")
    if c.dwdp.packing not in scheduler.DwdpScheduler.PACKINGS:
        raise ValueError(f"config.dwdp.packing must be one of {scheduler.DwdpScheduler.PACKINGS}, "
                         f"got {c.dwdp.packing!r}")
    if c.dwdp.pull_issue not in PULL_ISSUES:
        raise ValueError(f"config.dwdp.pull_issue must be one of {PULL_ISSUES}, got {c.dwdp.pull_issue!r}")
    if c.dwdp.pull_issue != "after_moe" and not c.dwdp.prefetch:
        raise ValueError(f"config.dwdp.pull_issue={c.dwdp.pull_issue!r} needs config.dwdp.prefetch=True (it places "
                         f"prefetched pulls)")
    if c.trace and trace_dump_flags(c) not in os.environ.get("XLA_FLAGS", ""):
        raise ValueError(f"config.trace needs XLA's HLO dump from the backend's start ({trace_dump_flags(c)} in "
                         f"XLA_FLAGS; experiments.context_bench sets it)")
    devices = jax.devices()
    if max(c.num_ranks, dep_ranks(c)) > len(devices):
        have = (f"this CPU run has {len(devices)} virtual ones: raise config.cpu_devices"
                if devices[0].platform == "cpu" else f"this machine has {len(devices)}")
        raise ValueError(f"config.num_ranks={c.num_ranks} (DEP: {dep_ranks(c)}) needs as many devices, and {have}")
    placement = Placement.for_group(cfg.n_routed_experts, c.num_ranks, c.dwdp.local_experts or None)
    if c.attention_impl.startswith("cudnn") and c.max_batch_size > MAX_SEGMENTS:
        raise ValueError(f"config.max_batch_size must be <= {MAX_SEGMENTS} with cuDNN attention (its segment table)")
    if not c.model.num_hidden_layers:
        device_bytes = int(devices[0].memory_stats()["bytes_limit"] * c.memory_fraction)
        cfg = model_config_from(c, depth_that_fits(cfg, placement, c, device_bytes))
    return Plan(cfg, requests, strategies, placement, devices[:max(c.num_ranks, dep_ranks(c))], variants)


def tokens_of(request: workload.Request, vocab_size: int, seed: int) -> np.ndarray:
    return workload.request_token_ids(request, vocab_size, seed=seed)


def token_buckets(c) -> list[int]:
    """The static token budgets a batch is padded to: multiples of MNT / config.token_buckets up to MNT.

    Static shapes mean padded tokens cost compute. A DWDP rank pads only to its own bucket; DEP's SPMD step pads
    every rank to the bucket of its fullest rank, so its imbalance costs padding work as well as waiting.
    """
    if c.token_buckets < 1 or c.max_num_tokens % c.token_buckets:
        raise ValueError(f"config.token_buckets must be >= 1 and divide max_num_tokens={c.max_num_tokens}, "
                         f"got {c.token_buckets}")
    step = c.max_num_tokens // c.token_buckets
    return [step * (i + 1) for i in range(c.token_buckets)]


def bucket_for(num_tokens: int, c) -> int:
    return next(b for b in token_buckets(c) if b >= num_tokens)


def pack_batch(batch: scheduler.Batch, c, vocab_size: int, budget: int | None = None) -> PackedBatch:
    tokens = [tokens_of(r, vocab_size, c.workload.seed) for r in batch.requests]
    return pack(tokens, budget=budget or bucket_for(batch.num_tokens, c))


def rel_err(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    a, b = np.concatenate([x.ravel() for x in ours]), np.concatenate([x.ravel() for x in ref])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def id_match(ours: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> tuple[float, list[float]]:
    """(over all tokens and MoE layers, per MoE layer) the fraction of tokens whose chosen expert sets are identical:
    a rounding difference grows with depth (the first MoE layer barely moves), a fault shows where it enters."""
    batches = [np.array([((np.sort(a, 1) == np.sort(b, 1)).all(1).sum(), a.shape[0])
                         for a, b in zip(layers_a, layers_b, strict=True)], float).reshape(-1, 2)
               for layers_a, layers_b in zip(ours, ref, strict=True)]
    same, total = (np.sum(batches, axis=0) if batches else np.zeros((0, 2))).T
    return float(same.sum() / max(total.sum(), 1)), (same / np.maximum(total, 1)).tolist()


def verification_batches(p: Plan, c) -> list[PackedBatch | None]:
    """A few requests spread over the ranks, the last rank left empty (it must not matter), padded to
    max_num_tokens."""
    reqs = p.requests[:c.verify.num_requests]
    per_rank: list[list] = [[] for _ in range(c.num_ranks)]
    for i, r in enumerate(reqs):
        per_rank[i % max(c.num_ranks - 1, 1)].append(r)
    return [pack([tokens_of(r, p.cfg.vocab_size, c.workload.seed) for r in rs], budget=c.max_num_tokens)
            if rs else None for rs in per_rank]


def last_bit_perturbed(model: deepseek_v3.DeepseekV3, seed: int) -> deepseek_v3.DeepseekV3:
    """A copy of the model whose embedding table is one unit in the last place off, up or down at random per
    entry (zeros move up): the smallest change of the model's input, the size of one rounding difference."""
    graphdef, state = nnx.split(model)
    perturbed = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new variables, the same (shared) arrays
    perturbed.embed_tokens[...] = _flip_last_bit(model.embed_tokens[...], jax.random.key(seed))
    return perturbed


@jax.jit
def _flip_last_bit(table: jax.Array, key: jax.Array) -> jax.Array:
    uint = {2: jnp.uint16, 4: jnp.uint32}[table.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(table, uint)
    magnitude = bits & jnp.array(jnp.iinfo(uint).max >> 1, uint)
    down = jax.random.bernoulli(key, 0.5, table.shape) & (magnitude > 0)
    return jax.lax.bitcast_convert_type(jnp.where(down, bits - 1, bits + 1).astype(uint), table.dtype)


def reference_noise(params: reference.Params, refs: list[reference.PrefillOutput | None], vb, p: Plan, c
                    ) -> dict[str, Any]:
    """The reference against itself with its embeddings one last bit off (`last_bit_perturbed`): how far the logits
    and the expert choices move when the model is perturbed by one rounding difference. bf16 with random weights
    routes on near-ties, so a strategy that differs from the reference only in rounding (another summation order,
    another kernel) lands near this floor rather than within a fixed tolerance; a real fault lands far above it."""
    model = last_bit_perturbed(params.model, c.seed + 1)
    others = [reference_output(params._replace(model=model), b, p, c) if b is not None else None for b in vb]
    floor = verify(others, refs, tol=float("inf"))
    return {k: floor[k] for k in ("rel_err", "expert_id_match", "expert_id_match_per_layer", "finite")}


def judged_by_floor(v: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """A verification that also passes when its strategy is no further from the reference than the last-bit
    floor (`reference_noise`), on both measures; `passed_tolerance` keeps the tolerance verdict."""
    within = bool(floor) and v["finite"] and v["rel_err"] <= floor["rel_err"] and \
        v["expert_id_match"] >= floor["expert_id_match"]
    return {**v, "passed_tolerance": v["passed"], "within_noise_floor": within, "passed": v["passed"] or within}


def reference_output(params: reference.Params, batch: PackedBatch, p: Plan, c) -> reference.PrefillOutput:
    """The reference on one device, reduced to what serving produces: the last token's logits of each sequence."""
    if isinstance(params.experts, tuple):
        out = reference.prefill(params, batch, backend=c.gemm_backend)
    else:
        out = reference.prefill_streaming(params.model, params.experts, batch, p.devices[0], backend=c.gemm_backend)
    return last_token_only(out, batch)


def last_token_only(out: reference.PrefillOutput, batch: PackedBatch) -> reference.PrefillOutput:
    """An output with every token's logits reduced to each sequence's last token (what serving returns)."""
    if out.logits_TV.shape[0] == len(batch.lengths):
        return out
    return out._replace(logits_TV=out.logits_TV[batch.last_token_index()])


def verify(outputs: list[reference.PrefillOutput | None], refs: list[reference.PrefillOutput | None],
           tol: float, min_id_match: float = 1.0) -> dict[str, Any]:
    """Last-token logits by relative norm error, expert choices of every token by exact set equality."""
    pairs = [(o, r) for o, r in zip(outputs, refs) if r is not None]
    err = rel_err([o.logits_TV for o, _ in pairs], [r.logits_TV for _, r in pairs])
    match, per_layer = id_match([o.expert_ids for o, _ in pairs], [r.expert_ids for _, r in pairs])
    finite = all(np.isfinite(o.logits_TV).all() for o, _ in pairs)
    return {"rel_err": err, "expert_id_match": match, "expert_id_match_per_layer": per_layer,
            "finite": finite, "rel_tol": tol, "min_id_match": min_id_match,
            "passed": bool(finite and err <= tol and match >= min_id_match)}


class _Progress:
    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="req", leave=False)
        self.lock = threading.Lock()

    def update(self, n: int):
        with self.lock:
            self.bar.update(n)

    def close(self):
        self.bar.close()


def run_dwdp(engine: DwdpEngine, p: Plan, c) -> tuple[list, list, list]:
    sched = scheduler.DwdpScheduler(p.requests, num_ranks=c.num_ranks, max_num_tokens=c.max_num_tokens,
                                    max_batch_size=c.max_batch_size, packing=c.dwdp.packing)
    req_records, iter_records, lock = [], [], threading.Lock()
    progress = _Progress(len(p.requests), "dwdp")
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

    workers = DwdpWorkers(engine, lambda rank: sched.wait_for_batch(rank, clock), sink,
                          batch_of=lambda b: pack_batch(b, c, p.cfg.vocab_size))
    workers.start().join()
    progress.close()
    return req_records, iter_records, [dataclasses.asdict(a) for a in sched.finish()]


def breakdown_ms(stages_s: dict[str, float]) -> dict[str, float]:
    """DWDP profiled stages in the paper's categories (see the results' breakdown labels): attention of every
    layer, the MoE layers' FFN (router, shared expert, grouped GEMMs), dense MLPs with embedding and head (the
    head program only: the outputs' host copies, in no category, ran inside it until session 7)."""
    return {"attention": 1e3 * stages_s.get("attention", 0.0), "grouped_gemm": 1e3 * stages_s.get("moe", 0.0),
            "dense_gemm": 1e3 * (stages_s.get("embed", 0.0) + stages_s.get("dense_mlp", 0.0)
                                 + stages_s.get("head", 0.0)),
            "p2p_exposed_wait": 1e3 * stages_s.get("pull_wait", 0.0), "communication": 0.0, "synchronization": 0.0}


def run_dep(dep, p: Plan, c, sync: bool = True) -> tuple[list, list, list, dict]:
    sched = scheduler.DepScheduler(p.requests, num_ranks=dep.num_ranks, max_num_tokens=c.max_num_tokens,
                                   balance=c.dep.balance,
                                   max_batch_size=c.max_batch_size)
    req_records, iter_records, steps = [], [], []
    progress = _Progress(len(p.requests), "dep")
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        step = sched.next_step(now)
        if step is None:
            if sched.drained:
                break
            time.sleep(max(0.0, sched.next_arrival_s() - now))
            continue
        budget = bucket_for(max(b.num_tokens for b in step), c)
        packed = [pack_batch(b, c, p.cfg.vocab_size, budget) if b.requests else None for b in step]
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
            sync_estimate(dep, steps, c) if sync else {})


def sync_estimate(dep, steps: list, c) -> dict[str, Any]:
    """Synchronization overhead of DEP (paper Fig. 1) on sampled steps: each rank's batch alone (the other ranks
    empty) is that rank's compute time; overhead = 1 - mean(rank compute) / step time (`DepRuntime.sync_times`)."""
    if not steps:
        return {}
    idx = np.linspace(0, len(steps) - 1, min(c.sync_samples, len(steps))).round().astype(int)
    step_s, rank_s, tokens = [], [], []
    for i in sorted(set(idx.tolist())):
        packed, _ = steps[i]
        step, alone = dep.sync_times(packed)
        step_s.append(step)
        rank_s.append(alone)
        tokens.append([0 if b is None else b.num_tokens for b in packed])
    rank_s = np.asarray(rank_s)
    return {"sampled_steps": len(step_s), "step_s": step_s, "rank_compute_s": rank_s.tolist(),
            "rank_tokens": tokens, "sync_overhead": metrics.overall_sync_overhead(step_s, rank_s),
            "rank_cv_mean": float(np.nanmean(metrics.rank_token_cv(np.asarray(tokens, float))))}


def warm_up(runtime, c) -> None:
    """Compiles every bucket's programs (DWDP: on every rank, programs compile per device) before timing."""
    for budget in token_buckets(c):
        batch = pack([[1] * budget], budget=budget)
        if isinstance(runtime, DwdpEngine):
            for r in range(runtime.num_ranks):
                runtime.step(r, batch)
        else:
            runtime.step([batch] * runtime.num_ranks)


def build_params(p: Plan, c) -> reference.Params:
    """The weights, with the config's attention backend set on every MLA module."""
    params = _weights(p, c)
    return params._replace(model=stages.with_attention_impl(params.model, c.attention_impl))


def _weights(p: Plan, c) -> reference.Params:
    if c.model.weights == "synthetic":  # R1-width experts generated on each rank's device, never whole
        return reference.Params(deepseek_v3.DeepseekV3(p.cfg, nnx.Rngs(c.seed)), SyntheticExperts(p.cfg, c.seed))
    if c.model.checkpoint and checkpoint.is_orbax_checkpoint(c.model.checkpoint):
        return checkpoint.restore_model(c.model.checkpoint)[1]
    if c.model.checkpoint:
        cfg, params = checkpoint.load_hf_checkpoint(c.model.checkpoint)
        if cfg.n_routed_experts != p.cfg.n_routed_experts:
            raise ValueError(f"checkpoint has {cfg.n_routed_experts} experts, the config {p.cfg.n_routed_experts}")
        return params
    return reference.Params(*deepseek_v3.init_model(p.cfg, seed=c.seed))


def routing_skew(refs: list[reference.PrefillOutput | None] | None, num_experts: int) -> dict[str, Any]:
    """Max/mean expert load (and normalized routing entropy) per MoE layer of the reference over the verification
    batches: the routing skew the run's weights produce (about 1 for random weights, more for trained ones; a few
    hundred tokens add sampling noise, hence the token count)."""
    outs = [r for r in refs or [] if r is not None]
    if not outs:
        return {}
    stats = evaluate.expert_load_stats(outs, num_experts)
    tokens = sum(int(o.expert_ids[0].shape[0]) for o in outs)
    return {"max_over_mean": [s["max_over_mean"] for s in stats],
            "normalized_entropy": [s["normalized_entropy"] for s in stats], "tokens": tokens,
            "uniform_max_over_mean": evaluate.uniform_max_over_mean(tokens, num_experts,
                                                                    outs[0].expert_ids[0].shape[1])}


def make_runtime(name: str, params: reference.Params, p: Plan, c, make_dep: Callable | None = None):
    if name == "dwdp":
        return DwdpEngine(params, p.placement, p.devices[:c.num_ranks], DwdpOptions(
            transport=c.dwdp.transport, slices=c.dwdp.slices, prefetch=c.dwdp.prefetch,
            merge_experts=c.dwdp.merge_experts, gemm_backend=c.gemm_backend, last_token_logits=c.max_batch_size,
            timeline=c.dwdp.get("timeline", False), slice_bytes=c.dwdp.get("slice_bytes", 0),
            pull_issue=c.dwdp.pull_issue))
    from dwdp_jax.runtime import dep as dep_lib

    return (make_dep or dep_lib.DepRuntime)(
        params, dep_ranks(c), c.max_num_tokens, dispatch=None if c.dep.dispatch == "auto" else c.dep.dispatch,
        gemm_backend=c.gemm_backend, attention_impl=c.attention_impl, devices=p.devices[:dep_ranks(c)],
        last_token_logits=c.max_batch_size)


def verification_outputs(runtime, batches: list[PackedBatch | None]) -> list[reference.PrefillOutput | None]:
    if isinstance(runtime, DwdpEngine):
        return [runtime.step(r, b).output if b is not None else None for r, b in enumerate(batches)]
    return [None if b is None else last_token_only(o, b) for o, b in zip(runtime.step(batches), batches)]


def collectives_of(runtime, batch: PackedBatch) -> dict[str, int]:
    if isinstance(runtime, DwdpEngine):
        return {k: count_collectives(t) for k, t in runtime.compiled_hlo(batch).items()}
    return {"step": count_collectives(runtime.compiled_hlo())}


def ratios(dwdp: dict, dep: dict) -> dict[str, float]:
    return {"tps_per_gpu_dwdp_over_dep": dwdp["tps_per_gpu"] / dep["tps_per_gpu"],
            "ttft_p50_dep_over_dwdp": dep["ttft_p50_s"] / dwdp["ttft_p50_s"]}


class Phases:
    """Wall seconds of the run's phases, in order (raw.phase_s): where a GPU run's minutes go besides serving."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, name: str, value=None):
        """Ends phase `name` once `value`'s device work is done; returns `value`."""
        jax.block_until_ready(value)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now
        return value


def run(c, make_dep: Callable | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the results document (also written to results/<experiment>/<run>.json).

    The strategies run one after the other, each alone on the devices (built, verified, warmed up, run, profiled,
    freed), so each gets the memory the depth planner sized it for.
    """
    phases = Phases()
    p = phases.lap("plan", plan(c))
    params = phases.lap("params", build_params(p, c))
    run_name = c.run or f"{c.name}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    vb = verification_batches(p, c)
    refs = [reference_output(params, b, p, c) if b is not None else None for b in vb] if c.verify.enabled else None
    phases.lap("reference")
    skew = routing_skew(refs, p.cfg.n_routed_experts)
    noise = reference_noise(params, refs, vb, p, c) if refs and c.verify.get("noise_floor", False) else {}
    phases.lap("reference_noise")
    s = {k: {} for k in ("verification", "hlo_collectives", "raw", "summary", "breakdown", "failures")}
    s["raw"]["phase_s"] = phases.seconds
    for name in p.strategies:
        try:
            for key, value in run_strategy(name, params, p, c, vb, refs, make_dep, phases).items():
                s[key].update(value)
        except (RuntimeError, memory.DoesNotFit) as e:  # a device failure or memory refusal: kept with the others
            s["failures"][name] = f"{type(e).__name__}: {e}"[:4000]
        gc.collect()
    if noise:
        s["verification"] = {name: judged_by_floor(v, noise) for name, v in s["verification"].items()}
    summary = s["summary"]
    if len(summary) == 2:
        summary["ratio"] = ratios(summary["dwdp"], summary["dep"])
        if p.variants:
            summary["ratio"]["variants"] = {v: ratios(summary["dwdp"]["variants"][v], summary["dep"]["variants"][v])
                                            for v in p.variants}
    path = results_lib.write_results(c.experiment, run_name, config=c, raw=s["raw"], metrics=summary,
                                     verification=s["verification"], root=c.results_root,
                                     hlo_collectives=s["hlo_collectives"], breakdown=s["breakdown"], routing_skew=skew,
                                     model=dataclasses.asdict(p.cfg), placement=dataclasses.asdict(p.placement),
                                     failures=s["failures"], reference_noise=noise)
    if s["failures"]:
        raise RuntimeError(f"strategies failed (the others' results are in {path}): {s['failures']}")
    return {"path": str(path), "metrics": summary, "verification": s["verification"], "phase_s": phases.seconds,
            "hlo_collectives": s["hlo_collectives"], "breakdown": s["breakdown"], "routing_skew": skew,
            "reference_noise": noise}


def run_strategy(name: str, params, p: Plan, c, vb, refs, make_dep, phases: Phases | None = None
                 ) -> dict[str, dict]:
    """One strategy alone on the devices: built, verified, warmed up, run, profiled. Returns its part of each
    results section ({section: {...}}); the runtime is freed on return."""
    phases = phases or Phases()
    runtime = phases.lap(f"{name}.build", make_runtime(name, params, p, c, make_dep))
    ranks = c.num_ranks if name == "dwdp" else dep_ranks(c)
    batches = (vb + [None] * ranks)[:ranks]
    outs = verification_outputs(runtime, batches)
    out = {"verification": {}, "hlo_collectives": {name: collectives_of(runtime, vb[0])}, "breakdown": {}}
    if refs:
        out["verification"][name] = verify(outs, (refs + [None] * ranks)[:ranks], c.verify.rel_tol,
                                           c.verify.min_id_match)
    phases.lap(f"{name}.verify")
    warm_up(runtime, c)
    phases.lap(f"{name}.warm_up")
    summary, raw = served(name, runtime, p, c, ranks)
    phases.lap(f"{name}.serve")
    if p.variants:
        variants = {v: served(name, runtime, dataclasses.replace(p, requests=reqs), vc, ranks)
                    for v, (reqs, vc) in p.variants.items()}
        summary["variants"] = {v: vs for v, (vs, _) in variants.items()}
        raw["variants"] = {v: vr for v, (_, vr) in variants.items()}
        phases.lap(f"{name}.variants")
    if name == "dep":
        # XLA's temporaries of the full-budget step beside the plan's estimate
        plan = memory.plan_dep(p.cfg, ranks, c.max_num_tokens, attention_impl="flash")
        summary["step_memory_gib"] = {"compiled": runtime.check_memory([None] * ranks) / 2**30,
                                      "planned": (plan.all_to_all_bytes + plan.activation_bytes) / 2**30}
    if c.trace:
        try:
            summary["trace"] = traced_pass(name, runtime, p, c, ranks)
        except Exception as e:  # a diagnostic: a profiler or trace-format failure must not cost the measurements
            summary["trace"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        phases.lap(f"{name}.trace")
    if c.breakdown:
        out["breakdown"] = profile_breakdown({name: runtime}, p, c)
    phases.lap(f"{name}.profile")
    if name == "dwdp" and runtime.options.timeline:
        pulls = pull_timeline(runtime, first_step_batches(p, c))
        summary.update({k: pulls[k] for k in ("pull_gbps_median", "exposed_wait_fraction_mean")})
        raw["pull_timeline"] = pulls["ranks"]
        phases.lap(f"{name}.timeline")
    return {**out, "summary": {name: summary}, "raw": {name: raw}}


def served(name: str, runtime, p: Plan, c, ranks: int) -> tuple[dict, dict]:
    """`config.repeats` passes of p's requests on a warm runtime: (summary, raw records) of the pass of median
    TPS/GPU (the lower middle one of an even count), with every pass's TPS/GPU beside it."""
    repeats = [serve(name, runtime, p, c, sync=i == 0) for i in range(c.repeats)]
    summaries = [metrics.summarize(reqs, iters, ranks) for reqs, iters, _, _ in repeats]
    tps = [s["tps_per_gpu"] for s in summaries]
    median = sorted(range(len(tps)), key=tps.__getitem__)[(len(tps) - 1) // 2]
    reqs, iters, assignments, extra = repeats[median]
    extra = {**repeats[0][3], **extra}  # DEP's synchronization estimate comes with the first pass
    summary = {**summaries[median], "repeats_tps_per_gpu": tps,
               **{k: v for k, v in extra.items() if k in ("sync_overhead", "rank_cv_mean")}}
    if "pull_contention" in extra:
        summary["pull_contention"] = {k: extra["pull_contention"][k] for k in ("measured", "model")}
    raw = {"requests": [dataclasses.asdict(r) for r in reqs],
           "iterations": [dataclasses.asdict(i) for i in iters], "assignments": assignments, **extra}
    return summary, raw


def serve(name: str, runtime, p: Plan, c, sync: bool) -> tuple[list, list, list, dict]:
    """One pass of the workload on a warm runtime: (request records, iteration records, assignments, extra raw
    data: DWDP's pull contention, DEP's synchronization estimate when `sync`)."""
    if name == "dwdp":
        if runtime.options.timeline:
            runtime.transport.clear_source_intervals()
        reqs, iters, assignments = run_dwdp(runtime, p, c)
        return reqs, iters, assignments, ({"pull_contention": pull_contention(runtime)} if runtime.options.timeline
                                          else {})
    return run_dep(runtime, p, c, sync)


def trace_dump_flags(c) -> str:
    return f"--xla_dump_to={Path(c.trace) / 'hlo'} --xla_dump_hlo_as_text"


def start_trace_dump(c) -> None:
    """Turns on XLA's HLO dump into config.trace for `traced_pass`; call before the backend starts. The directory
    must be new or empty: XLA numbers its modules per process, so another run's dumps would name other programs."""
    root = Path(c.trace)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"config.trace={c.trace!r} is not empty; give a new directory (its HLO dumps would mix "
                         f"with this run's)")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {trace_dump_flags(c)}".strip()


def traced_pass(name: str, runtime, p: Plan, c, ranks: int) -> dict[str, Any]:
    """One more served pass under the profiler: per rank its iterations and its device's time by stage in that pass
    (`stage_trace.breakdown`; ranks that ran nothing are left out), and their per-iteration means over the ranks."""
    trace_dir = Path(c.trace) / name
    with jax.profiler.trace(str(trace_dir)):
        _, iters, _, _ = serve(name, runtime, p, c, sync=False)
    per_rank = collections.Counter(i.rank for i in iters)
    iterations = {r: per_rank[r] if name == "dwdp" else len({i.iteration for i in iters}) for r in range(ranks)}
    kernels = stage_trace.device_kernels(stage_trace.newest_xplane(trace_dir))
    by_device = stage_trace.breakdown({d.id: kernels[d.id] for d in p.devices[:ranks] if kernels.get(d.id)},
                                      stage_trace.hlo_scopes(Path(c.trace) / "hlo"))
    traced = {rank: by_device[d.id] for rank, d in enumerate(p.devices[:ranks]) if d.id in by_device}
    per_iteration = collections.defaultdict(list)
    for rank, t in traced.items():
        for key, ms in [(k, t[k]) for k in ("span_ms", "busy_ms", "idle_ms")] + list(t["stages_ms"].items()):
            per_iteration[key.removesuffix("_ms")].append(ms / max(iterations[rank], 1))
    return {"iterations": iterations, "ranks": traced,
            "per_iteration_ms": {k: float(np.mean(v)) for k, v in per_iteration.items()}}


def first_step_batches(p: Plan, c) -> list[PackedBatch | None]:
    """Each rank's batch of the workload's first DEP step (the profiled and timed batches)."""
    first = scheduler.DepScheduler(p.requests, num_ranks=dep_ranks(c), max_num_tokens=c.max_num_tokens,
                                   balance=c.dep.balance,
                                   max_batch_size=c.max_batch_size).next_step(float("inf"))
    budget = bucket_for(max(b.num_tokens for b in first), c)
    return [pack_batch(b, c, p.cfg.vocab_size, budget) if b.requests else None for b in first]


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


def profile_breakdown(runtimes: dict, p: Plan, c) -> dict[str, dict[str, dict[str, Any]]]:
    """Per-iteration milliseconds in the paper's categories on the workload's first DEP step (each rank's batch):
    DWDP profiles every rank's batch alone and averages; DEP profiles the step. Stage times are measured one
    program at a time with a device sync; DEP's synchronization is estimated (sync overhead x step time).
    DWDP's grouped_gemm includes its router and shared expert (one program), DEP's does not (others)."""
    batches = first_step_batches(p, c)
    out = {}
    if "dwdp" in runtimes:
        engine = runtimes["dwdp"]
        runs = []
        for r, b in enumerate(batches):
            if b is not None:
                engine.step(r % engine.num_ranks, b, profile=True)  # compiles the per-stage programs
                runs.append(breakdown_ms(engine.step(r % engine.num_ranks, b, profile=True).stages_s))
        out["dwdp"] = {k: {"ms": float(np.mean([run[k] for run in runs])), "source": metrics.MEASURED}
                       for k in runs[0]}
    if "dep" in runtimes:
        prof = runtimes["dep"].profile(batches)
        t = {k: 1e3 * v for k, v in prof.stage_total_s.items()}
        measured = {"attention": t.get("attention", 0.0), "grouped_gemm": t.get("moe_gmm", 0.0),
                    "dense_gemm": t.get("dense_mlp", 0.0) + t.get("head", 0.0) + t.get("embed", 0.0),
                    "others": t.get("router", 0.0) + t.get("shared_expert", 0.0),
                    "communication": t.get("dispatch", 0.0) + t.get("combine", 0.0), "p2p_exposed_wait": 0.0}
        out["dep"] = {k: {"ms": v, "source": metrics.MEASURED} for k, v in measured.items()}
        moved = all2all_bytes_per_rank(prof.outputs, batches, runtimes["dep"].num_ranks, p.cfg)
        out["dep"]["communication"].update(bytes_per_rank=moved,
                                           gbps_per_rank=moved / max(measured["communication"], 1e-9) / 1e6)
        out["dep"]["synchronization"] = {"ms": max(prof.sync_overhead, 0.0) * 1e3 * prof.step_s,
                                         "source": metrics.ESTIMATED}
    return out


def all2all_bytes_per_rank(outputs, batches, num_ranks: int, cfg) -> float:
    """Mean bytes a DEP rank sends to other ranks in one step, dispatch and combine over every MoE layer: each of
    its (token, choice) rows whose expert lives on another rank crosses twice, hidden_size wide."""
    per_rank = cfg.n_routed_experts // num_ranks
    row_bytes = cfg.hidden_size * jax.numpy.dtype(cfg.dtype).itemsize
    sent = [sum(int((np.asarray(ids) // per_rank != r).sum()) for ids in out.expert_ids) if b is not None else 0
            for r, (out, b) in enumerate(zip(outputs, batches))]
    return 2.0 * row_bytes * float(np.mean(sent))


def format_table(doc: dict[str, Any]) -> str:
    """The short end-of-run table: per strategy TPS/GPU, TTFT p50/p90, iteration p50, and the DWDP/DEP ratios."""
    m = doc["metrics"]
    rows = [f"{'strategy':<10}{'TPS/GPU':>12}{'TTFT p50 s':>13}{'TTFT p90 s':>13}{'iter p50 s':>13}{'verified':>10}"]
    for name in STRATEGIES:
        if name in m:
            s = m[name]
            ok = doc["verification"].get(name, {}).get("passed", "-")
            rows.append(f"{name:<10}{s['tps_per_gpu']:>12.1f}{s['ttft_p50_s']:>13.4f}{s['ttft_p90_s']:>13.4f}"
                        f"{s['iteration_p50_s']:>13.4f}{str(ok):>10}")
    if "ratio" in m:
        rows.append(f"DWDP/DEP TPS/GPU {m['ratio']['tps_per_gpu_dwdp_over_dep']:.3f}   "
                    f"TTFT p50 speedup {m['ratio']['ttft_p50_dep_over_dwdp']:.3f}")
    for v, r in m.get("ratio", {}).get("variants", {}).items():
        rows.append(f"variant {v}: DWDP {m['dwdp']['variants'][v]['tps_per_gpu']:.1f}, DEP "
                    f"{m['dep']['variants'][v]['tps_per_gpu']:.1f} TPS/GPU, "
                    f"DWDP/DEP {r['tps_per_gpu_dwdp_over_dep']:.3f}, "
                    f"TTFT p50 speedup {r['ttft_p50_dep_over_dwdp']:.3f}")
    if doc.get("phase_s"):
        rows.append("wall s per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["phase_s"].items()))
    passes = {name: m[name]["repeats_tps_per_gpu"] for name in STRATEGIES
              if len(m.get(name, {}).get("repeats_tps_per_gpu", ())) > 1}
    if passes:
        rows.append("repeats TPS/GPU " + "; ".join(f"{name} " + " ".join(f"{x:.1f}" for x in tps)
                                                   for name, tps in passes.items()) + " (the median pass above)")
    if "dep" in m and "sync_overhead" in m["dep"]:
        rows.append(f"DEP synchronization overhead {100 * m['dep']['sync_overhead']:.1f}% "
                    f"(mean rank-token CV {100 * m['dep']['rank_cv_mean']:.1f}%)")
    comm = doc.get("breakdown", {}).get("dep", {}).get("communication", {})
    if "gbps_per_rank" in comm:
        rows.append(f"DEP all-to-all (dispatch + combine, first step profiled) {comm['gbps_per_rank']:.1f} GB/s "
                    f"per rank")
    if "pull_gbps_median" in m.get("dwdp", {}):
        rows.append(f"DWDP pulls {m['dwdp']['pull_gbps_median']:.1f} GB/s, exposed wait "
                    f"{100 * m['dwdp']['exposed_wait_fraction_mean']:.2f}% of the step")
    for name in STRATEGIES:
        trace = m.get(name, {}).get("trace", {})
        if "error" in trace:
            rows.append(f"{name} traced pass failed: {trace['error']}")
        elif trace:
            rows.append(f"{name} traced pass, ms per iteration: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(trace["per_iteration_ms"].items(), key=lambda kv: -kv[1])))
    if doc.get("routing_skew"):
        skew = doc["routing_skew"]
        rows.append(f"routing skew, max/mean expert load per MoE layer over {skew['tokens']} verification tokens: "
                    + " ".join(f"{x:.2f}" for x in skew["max_over_mean"])
                    + f" (uniform routing: {skew['uniform_max_over_mean']:.2f})")
    per_layer = {name: v["expert_id_match_per_layer"] for name, v in doc["verification"].items()
                 if "expert_id_match_per_layer" in v}
    if doc.get("reference_noise"):
        noise = doc["reference_noise"]
        rows.append(f"reference with its embeddings one last bit off: rel err {noise['rel_err']:.2e}, expert sets "
                    f"{100 * noise['expert_id_match']:.1f}% identical (the floor: a strategy within it passes)")
        per_layer["floor"] = noise["expert_id_match_per_layer"]
    if per_layer:
        rows.append("expert sets identical per MoE layer: " + "; ".join(
            f"{name} " + " ".join(f"{100 * x:.1f}%" for x in xs) for name, xs in per_layer.items()))
    rows.append(f"HLO collectives: {doc['hlo_collectives']}")
    rows.append(f"results: {doc['path']}")
    return "\n".join(rows)
