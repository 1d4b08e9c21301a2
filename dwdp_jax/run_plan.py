"""What a benchmark run is, derived once from its resolved config: the typed `Plan` (model, requests, strategies and
their options, placement, devices, verification, measurements, variants) that every later stage reads instead of
the config, and the config-derived pieces it is made of (the model config, the requests, the token buckets a
batch pads to)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dwdp_jax import checkpoint
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime.dwdp import DwdpOptions
from dwdp_jax.serving import scheduler, workload
from models import config as model_config


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


def requests_from(c) -> list[workload.Request]:
    w = c.workload
    rate = w.rate_per_s or None
    if w.dataset:
        return workload.read_dataset(w.dataset, rate_per_s=rate, seed=w.seed)
    return workload.synthetic_requests(w.num_requests, w.isl, input_ratio=w.input_ratio,
                                       isl_std=None if w.isl_std < 0 else w.isl_std, rate_per_s=rate, seed=w.seed)


def variant_plan(c, name: str, fields: dict[str, Any], vocab_size: int) -> tuple[list[workload.Request], Batching]:
    """A variant's requests and batching: the run's config with the variant's fields. A smaller batch budget keeps
    the run's bucket size, so every batch pads to a shape the runtimes compiled; it must be one of the run's token
    buckets."""
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
    try:
        reqs = requests_from(vc)
        scheduler.validate_requests(reqs, max_num_tokens=vc.max_num_tokens, max_batch_size=c.max_batch_size,
                                    num_ranks=c.num_ranks)
    except ValueError as e:
        raise ValueError(f"config.variants {name!r}: {e}") from e
    return reqs, batching_from(vc, vocab_size)


@dataclasses.dataclass(frozen=True)
class Batching:
    """How the scheduler's batches become the runtimes' inputs: the step's token and sequence limits, the static
    token budgets a batch pads to (`token_buckets`) and what generates each request's token ids."""

    max_num_tokens: int
    max_batch_size: int
    buckets: tuple[int, ...]
    vocab_size: int
    token_seed: int

    def bucket_for(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def pack(self, batch: scheduler.Batch, budget: int | None = None) -> PackedBatch:
        tokens = [tokens_of(r, self.vocab_size, self.token_seed) for r in batch.requests]
        return pack(tokens, budget=budget or self.bucket_for(batch.num_tokens))


def batching_from(c, vocab_size: int) -> Batching:
    return Batching(c.max_num_tokens, c.max_batch_size, tuple(token_buckets(c)), vocab_size, c.workload.seed)


@dataclasses.dataclass(frozen=True)
class Weights:
    """Where the weights come from and the kernels the model's modules run."""

    source: str  # "random" (initialized from `seed`), "synthetic" (generated per rank) or "checkpoint"
    checkpoint: str  # the Orbax or HuggingFace directory of source "checkpoint"
    seed: int
    attention_impl: str
    gemm_backend: str


@dataclasses.dataclass(frozen=True)
class DwdpPlan:
    num_ranks: int
    options: DwdpOptions
    packing: str  # how the scheduler fills a rank's batch (serving.scheduler.DwdpScheduler.PACKINGS)


@dataclasses.dataclass(frozen=True)
class DepPlan:
    num_ranks: int
    dispatch: str | None  # None: the platform's default (runtime.dep.default_dispatch)
    balance: str  # how the scheduler spreads a step over the ranks (DepScheduler.BALANCES)
    sync_samples: int  # steps re-run rank by rank for the synchronization estimate


@dataclasses.dataclass(frozen=True)
class VerifyPlan:
    enabled: bool
    num_requests: int  # the first requests, spread over the ranks, form the verification batches
    rel_tol: float
    min_id_match: float
    noise_floor: bool  # also judge by the reference's last-bit noise floor


@dataclasses.dataclass(frozen=True)
class MeasurePlan:
    repeats: int  # served passes per strategy; the median is reported with the band
    breakdown: bool  # the first step profiled stage by stage
    trace: str  # '' or the directory of a traced pass
    memory_fraction: float  # of each device's memory the plan may use


@dataclasses.dataclass
class Plan:
    """Everything decided before touching a device."""

    cfg: model_config.ModelConfig
    requests: list[workload.Request]
    batching: Batching
    strategies: tuple[str, ...]
    placement: Placement | None  # DWDP's expert placement; None when no planned strategy places experts that way
    devices: list
    weights: Weights
    dwdp: DwdpPlan
    dep: DepPlan
    verify: VerifyPlan
    measure: MeasurePlan
    # config.variants: name -> (its requests, its batching)
    variants: dict[str, tuple[list[workload.Request], Batching]] = dataclasses.field(default_factory=dict)


def weights_from(c) -> Weights:
    source = "checkpoint" if c.model.checkpoint else c.model.weights
    return Weights(source, c.model.checkpoint, c.seed, c.attention_impl, c.gemm_backend)


def dwdp_plan_from(c) -> DwdpPlan:
    options = DwdpOptions(transport=c.dwdp.transport, slices=c.dwdp.slices, prefetch=c.dwdp.prefetch,
                          merge_experts=c.dwdp.merge_experts, gemm_backend=c.gemm_backend,
                          last_token_logits=c.max_batch_size, timeline=c.dwdp.timeline,
                          slice_bytes=c.dwdp.slice_bytes, pull_issue=c.dwdp.pull_issue)
    return DwdpPlan(c.num_ranks, options, c.dwdp.packing)


def dep_plan_from(c) -> DepPlan:
    return DepPlan(c.dep.num_ranks or c.num_ranks, None if c.dep.dispatch == "auto" else c.dep.dispatch,
                   c.dep.balance, c.sync_samples)


def verify_plan_from(c) -> VerifyPlan:
    v = c.verify
    return VerifyPlan(v.enabled, v.num_requests, v.rel_tol, v.min_id_match, v.noise_floor)


def measure_plan_from(c) -> MeasurePlan:
    return MeasurePlan(c.repeats, c.breakdown, c.trace, c.memory_fraction)


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

