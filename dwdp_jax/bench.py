"""The context-only serving benchmark: DWDP and DEP on the same model, weights and workload.

`validate(config)` checks every field of the config, alone and together (workload vs MNT, placement, DEP's
sharding), before a JAX backend starts. `run(config)` validates, checks what needs the devices (their count, memory),
builds the weights, verifies both strategies against the reference runtime, runs each strategy over the whole
workload (DWDP: one worker thread per device pulling from a shared queue; DEP: lock-step iterations), announcing
each phase on stderr, and writes one results file with the raw records, the metrics with their noise bands, the
verification block, the HLO collective counts, the per-layer breakdown and what the timings can claim (`timing`:
on CPU a functional check).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import gc
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from configs.context_bench import get_config as preset_config
from dwdp_jax import checkpoint, evaluate, memory, stage_trace
from dwdp_jax import results as results_lib
from dwdp_jax.expert_source import SyntheticExperts
from dwdp_jax.kernels import attention, grouped_gemm
from dwdp_jax.kernels.attention import MAX_SEGMENTS
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import dep as dep_lib
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
    try:
        reqs = requests_from(vc)
        scheduler.validate_requests(reqs, max_num_tokens=vc.max_num_tokens, max_batch_size=c.max_batch_size,
                                    num_ranks=c.num_ranks)
    except ValueError as e:
        raise ValueError(f"config.variants {name!r}: {e}") from e
    return reqs, vc


def dep_ranks(c) -> int:
    return c.dep.num_ranks or c.num_ranks


def strategies_from(c) -> tuple[str, ...]:
    names = tuple(s.strip() for s in c.strategies.split(",") if s.strip())
    if not names or set(names) - set(STRATEGIES) or len(set(names)) != len(names):
        raise ValueError(f"config.strategies={c.strategies!r}: a comma list of distinct names from {STRATEGIES}")
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


# -- validation: every field of the resolved config, before any backend starts --------------------------------------
# A field check returns None or what the field allows; `validate` raises it as "config.<field>=<value>: <allowed>".

WEIGHTS = ("random", "synthetic")  # random: the checkpoint's weights when config.model.checkpoint is set
DEP_DISPATCHES = ("auto", *dep_lib.DISPATCH_BACKENDS)  # auto: dep_lib.default_dispatch of the platform


def _integer(low: int, meaning: str = "") -> Callable[[Any], str | None]:
    def check(v):
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= low else f"an integer >= {low}{meaning}"
    return check


def _number(low: float, high: float = math.inf, *, above: bool = False, meaning: str = ""
            ) -> Callable[[Any], str | None]:
    """A real number in [low, high] ((low, high] with `above`)."""
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if above else low <= v) and v <= high
        return None if ok else f"a number in {'(' if above else '['}{low}, {high}]{meaning}"
    return check


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _one_of(allowed: tuple[str, ...], meaning: str = "") -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"one of {allowed}{meaning}"


def _registered(lookup: Callable[[str], Any]) -> Callable[[Any], str | None]:
    """A name its registry knows; the registry's own error says which names it has."""
    def check(v):
        if not isinstance(v, str):
            return "a name"
        try:
            lookup(v)
        except ValueError as e:
            return str(e)
        return None
    return check


def _kernel(lookup: Callable[[str], Any]) -> Callable[[Any], str | None]:
    """A kernel backend name. The GPU backends register when their module is imported, which CPU runs skip, so
    an unknown name imports it first: the registry's message then lists every backend."""
    registered = _registered(lookup)

    def check(v):
        if registered(v) is None:
            return None
        import dwdp_jax.kernels.gpu  # noqa: F401
        return registered(v)
    return check


def _file_name(optional: bool) -> Callable[[Any], str | None]:
    def check(v):
        ok = isinstance(v, str) and (v or optional) and "/" not in v and v not in (".", "..")
        return None if ok else f"{'empty or ' if optional else ''}a name without '/' (results/<experiment>/<run>.json)"
    return check


def _nearest_existing(path: Path) -> Path:
    return next(a for a in (path, *path.parents) if a.exists())


def _creatable_dir(v) -> str | None:
    allowed = "a directory that exists or can be created"
    if not isinstance(v, str) or not v:
        return allowed
    have = _nearest_existing(Path(v).absolute())
    if not have.is_dir():
        return f"{allowed}; {have} is a file"
    return None if os.access(have, os.W_OK | os.X_OK) else f"{allowed}; {have} is not writable"


def _new_dir(v) -> str | None:
    """config.trace: XLA numbers its HLO dumps per process, so another run's would name other programs."""
    if v == "":
        return None
    problem = _creatable_dir(v)
    if problem is None and Path(v).is_dir() and any(Path(v).iterdir()):
        problem = "a new or empty directory (its HLO dumps would mix with this run's)"
    return None if problem is None else f"'' (no trace) or {problem}"


def _checkpoint_dir(v) -> str | None:
    ok = v == "" or (isinstance(v, str) and (Path(v) / "config.json").is_file())
    return None if ok else "'' (random weights) or a checkpoint directory with a config.json (Orbax or HuggingFace)"


def _dataset_file(v) -> str | None:
    ok = v == "" or (isinstance(v, str) and Path(v).is_file() and os.access(v, os.R_OK))
    return None if ok else "'' (synthetic lengths) or a readable JSON-lines file (cannot read it)"


def _text(v) -> str | None:
    return None if isinstance(v, str) else "a string"


FIELD_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _file_name(optional=False),
    "experiment": _file_name(optional=False),
    "run": _file_name(optional=True),
    "results_root": _creatable_dir,
    "seed": _integer(0),
    "strategies": _text,  # its names: strategies_from
    "num_ranks": _integer(1),
    "cpu_devices": _integer(1, " (virtual CPU devices, one per rank)"),
    "xla_excess_precision": _boolean,
    "model.preset": _one_of(tuple(model_config.PRESETS)),
    **{f"model.{k}": _integer(0, " (0: the preset's)") for k in MODEL_OVERRIDES},
    "model.dtype": _registered(lambda v: model_config.ModelConfig(dtype=v)),
    "model.checkpoint": _checkpoint_dir,
    "model.weights": _one_of(WEIGHTS),
    "workload.num_requests": _integer(1),
    "workload.isl": _integer(1),
    "workload.input_ratio": _number(0.0, 1.0),
    "workload.isl_std": _number(-math.inf, meaning=" (< 0: uniform lengths from input_ratio)"),
    "workload.rate_per_s": _number(0.0, meaning=" (0: every request arrives at once)"),
    "workload.dataset": _dataset_file,
    "workload.seed": _integer(0),
    "repeats": _integer(1),
    "variants": _text,  # its parts: workload.parse_variants
    "max_num_tokens": _integer(1),
    "token_buckets": _integer(1),
    "max_batch_size": _integer(1),
    "dwdp.transport": _registered(transport_class),
    "dwdp.slices": _integer(1, " (1: contention mitigation off)"),
    "dwdp.prefetch": _boolean,
    "dwdp.merge_experts": _boolean,
    "dwdp.timeline": _boolean,
    "dwdp.slice_bytes": _integer(0, " (0: whole copies)"),
    "dwdp.local_experts": _integer(0, " (0: chosen from the experts and ranks)"),
    "dwdp.packing": _one_of(scheduler.DwdpScheduler.PACKINGS),
    "dwdp.pull_issue": _one_of(PULL_ISSUES),
    "dep.dispatch": _one_of(DEP_DISPATCHES, f" ('auto': {dep_lib.default_dispatch('gpu')} on GPU, "
                                            f"{dep_lib.default_dispatch('cpu')} on CPU)"),
    "dep.num_ranks": _integer(0, " (0: config.num_ranks)"),
    "dep.balance": _one_of(scheduler.DepScheduler.BALANCES),
    "gemm_backend": _kernel(grouped_gemm.get_backend),
    "attention_impl": _kernel(attention.get_backend),
    "verify.enabled": _boolean,
    "verify.num_requests": _integer(1),
    "verify.rel_tol": _number(0.0),
    "verify.min_id_match": _number(0.0, 1.0),
    "verify.noise_floor": _boolean,
    "memory_fraction": _number(0.0, 1.0, above=True),
    "breakdown": _boolean,
    "trace": _new_dir,
    "sync_samples": _integer(1),
}


def field_value(c, field: str) -> Any:
    try:
        for part in field.split("."):
            c = c[part]
    except KeyError as e:
        raise ValueError(f"config.{field} is missing (configs/context_bench.py defines every field)") from e
    return c


def field_default(c, field: str) -> Any:
    """The field's value in the config preset the run started from (config.name), else in the default preset."""
    try:
        return field_value(preset_config(c.name), field)
    except ValueError:
        return field_value(preset_config(), field)


def validate(c) -> Plan:
    """Checks every field of the resolved config (FIELD_CHECKS), then the fields together, without starting a JAX
    backend: ValueError "config.<field>=<value>: <what is allowed>". Returns the plan without its devices (`plan`
    adds what needs them)."""
    for field, check in FIELD_CHECKS.items():
        value = field_value(c, field)
        allowed = check(value)
        if allowed:
            raise ValueError(f"config.{field}={value!r}: {allowed}; default {field_default(c, field)!r}")
    strategies = strategies_from(c)
    cfg = _checked_model(c)
    placement = _checked_groups(c, cfg, strategies)
    requests, variants = _checked_workload(c)
    _check_verification(requests, c)
    if c.attention_impl.startswith("cudnn") and c.max_batch_size > MAX_SEGMENTS:
        raise ValueError(f"config.max_batch_size={c.max_batch_size}: at most {MAX_SEGMENTS} with cuDNN attention "
                         f"(config.attention_impl={c.attention_impl!r}: its segment table)")
    return Plan(cfg, requests, strategies, placement, [], variants)


def _checked_model(c) -> model_config.ModelConfig:
    if c.model.weights == "synthetic" and c.model.checkpoint:
        raise ValueError(f"config.model.weights='synthetic' generates the weights, so config.model.checkpoint must "
                         f"be '', got {c.model.checkpoint!r}")
    try:
        cfg = model_config_from(c)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from e
    if cfg.num_moe_layers < 1:
        raise ValueError(f"config.model.num_hidden_layers={c.model.num_hidden_layers}: the model needs a MoE layer, "
                         f"more than its {cfg.first_k_dense_replace} dense ones")
    return cfg


def _checked_groups(c, cfg: model_config.ModelConfig, strategies: tuple[str, ...]) -> Placement:
    """DWDP's expert placement and engine options, and DEP's expert sharding, for this model."""
    try:
        placement = Placement.for_group(cfg.n_routed_experts, c.num_ranks, c.dwdp.local_experts or None)
    except ValueError as e:
        raise ValueError(f"config.num_ranks={c.num_ranks}, config.dwdp.local_experts={c.dwdp.local_experts}: "
                         f"{e}") from e
    try:
        dwdp_options(c)
    except ValueError as e:
        raise ValueError(f"config.dwdp: {e}") from e
    if "dep" in strategies and cfg.n_routed_experts % dep_ranks(c):
        raise ValueError(f"config.dep.num_ranks={c.dep.num_ranks} (DEP ranks: {dep_ranks(c)}): must divide the "
                         f"model's {cfg.n_routed_experts} experts (DEP shards every MoE layer evenly)")
    return placement


def _checked_workload(c) -> tuple[list[workload.Request], dict[str, tuple[list[workload.Request], Any]]]:
    where = f"config.workload.dataset={c.workload.dataset!r}" if c.workload.dataset else "config.workload"
    try:
        requests = requests_from(c)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    try:
        scheduler.validate_requests(requests, max_num_tokens=c.max_num_tokens, max_batch_size=c.max_batch_size,
                                    num_ranks=c.num_ranks)
    except ValueError as e:
        raise ValueError(f"config.max_num_tokens={c.max_num_tokens}: {e}") from e
    token_buckets(c)
    variants = {name: variant_plan(c, name, fields) for name, fields in workload.parse_variants(c.variants).items()}
    return requests, variants


def _check_verification(requests: list[workload.Request], c) -> None:
    """Each rank's verification batch within the step's token budget and batch size."""
    def fits(n: int) -> bool:
        return all(sum(r.input_len for r in rs) <= c.max_num_tokens and len(rs) <= c.max_batch_size
                   for rs in verification_split(requests[:n], c.num_ranks))

    n = c.verify.num_requests
    if not fits(n):
        most = max(k for k in range(1, n) if fits(k))
        raise ValueError(f"config.verify.num_requests={n}: the first {n} requests, spread over the ranks, do not fit "
                         f"one step of config.max_num_tokens={c.max_num_tokens} tokens and config.max_batch_size="
                         f"{c.max_batch_size} sequences; at most {most} fit")


def plan(c) -> Plan:
    """`validate`, then what needs the devices (the backend starts here, nothing compiles): enough of them, DEP's
    dispatch on this platform, and the depth that fits their memory (config.model.num_hidden_layers = 0)."""
    p = validate(c)
    if c.trace and trace_dump_flags(c) not in os.environ.get("XLA_FLAGS", ""):
        raise ValueError(f"config.trace needs XLA's HLO dump from the backend's start ({trace_dump_flags(c)} in "
                         f"XLA_FLAGS; experiments.context_bench sets it)")
    devices = jax.devices()
    platform = devices[0].platform
    if max(c.num_ranks, dep_ranks(c)) > len(devices):
        have = (f"this CPU run has {len(devices)} virtual ones: raise config.cpu_devices"
                if platform == "cpu" else f"this machine has {len(devices)}")
        raise ValueError(f"config.num_ranks={c.num_ranks} (DEP: {dep_ranks(c)}) needs as many devices, and {have}")
    if "dep" in p.strategies and c.dep.dispatch == "ragged" and platform not in dep_lib.RAGGED_PLATFORMS:
        raise ValueError(f"config.dep.dispatch='ragged': XLA:{platform.upper()} has no ragged_all_to_all (platforms "
                         f"with it: {dep_lib.RAGGED_PLATFORMS}); use 'dense' or 'auto'")
    cfg = p.cfg
    if not c.model.num_hidden_layers:
        device_bytes = int(devices[0].memory_stats()["bytes_limit"] * c.memory_fraction)
        cfg = model_config_from(c, depth_that_fits(cfg, p.placement, c, device_bytes))
    return dataclasses.replace(p, cfg=cfg, devices=devices[:max(c.num_ranks, dep_ranks(c))])


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


def verification_split(requests: list[workload.Request], num_ranks: int) -> list[list[workload.Request]]:
    """The requests round-robin over the ranks but the last, left empty (it must not matter)."""
    per_rank: list[list] = [[] for _ in range(num_ranks)]
    for i, r in enumerate(requests):
        per_rank[i % max(num_ranks - 1, 1)].append(r)
    return per_rank


def verification_batches(p: Plan, c) -> list[PackedBatch | None]:
    """The first config.verify.num_requests requests spread over the ranks, padded to max_num_tokens."""
    return [pack([tokens_of(r, p.cfg.vocab_size, c.workload.seed) for r in rs], budget=c.max_num_tokens)
            if rs else None for rs in verification_split(p.requests[:c.verify.num_requests], c.num_ranks)]


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
    band = metrics.sync_overhead_band(step_s, rank_s)
    return {"sampled_steps": len(step_s), "step_s": step_s, "rank_compute_s": rank_s.tolist(),
            "rank_tokens": tokens, "sync_overhead": metrics.overall_sync_overhead(step_s, rank_s),
            "sync_overhead_band": list(band), "sync_overhead_within_noise": metrics.within_noise(band),
            "rank_cv_mean": float(np.nanmean(metrics.rank_token_cv(np.asarray(tokens, float))))}


def warm_up(runtime, c) -> None:
    """Compiles every bucket's programs (DWDP: on every rank, programs compile per device) before timing."""
    dwdp = isinstance(runtime, DwdpEngine)
    programs = [(budget, r) for budget in token_buckets(c) for r in (range(runtime.num_ranks) if dwdp else [None])]
    for budget, r in progress_bar(programs, "warm-up", "program"):
        batch = pack([[1] * budget], budget=budget)
        if dwdp:
            runtime.step(r, batch)
        else:
            runtime.step([batch] * runtime.num_ranks)


def progress_bar(items: list, desc: str, unit: str):
    """`items` under a progress bar on stderr, for the steps that compile (seconds each, a minute in all)."""
    return tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)


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


def dwdp_options(c) -> DwdpOptions:
    return DwdpOptions(transport=c.dwdp.transport, slices=c.dwdp.slices, prefetch=c.dwdp.prefetch,
                       merge_experts=c.dwdp.merge_experts, gemm_backend=c.gemm_backend,
                       last_token_logits=c.max_batch_size, timeline=c.dwdp.timeline, slice_bytes=c.dwdp.slice_bytes,
                       pull_issue=c.dwdp.pull_issue)


def make_runtime(name: str, params: reference.Params, p: Plan, c, make_dep: Callable | None = None):
    if name == "dwdp":
        return DwdpEngine(params, p.placement, p.devices[:c.num_ranks], dwdp_options(c))
    return (make_dep or dep_lib.DepRuntime)(
        params, dep_ranks(c), c.max_num_tokens, dispatch=None if c.dep.dispatch == "auto" else c.dep.dispatch,
        gemm_backend=c.gemm_backend, attention_impl=c.attention_impl, devices=p.devices[:dep_ranks(c)],
        last_token_logits=c.max_batch_size)


def verification_outputs(runtime, batches: list[PackedBatch | None]) -> list[reference.PrefillOutput | None]:
    if isinstance(runtime, DwdpEngine):
        return [runtime.step(r, b).output if b is not None else None
                for r, b in enumerate(progress_bar(batches, "verify", "rank"))]
    return [None if b is None else last_token_only(o, b) for o, b in zip(runtime.step(batches), batches)]


def collectives_of(runtime, batch: PackedBatch) -> dict[str, int]:
    if isinstance(runtime, DwdpEngine):
        return {k: count_collectives(t) for k, t in runtime.compiled_hlo(batch).items()}
    return {"step": count_collectives(runtime.compiled_hlo())}


def tps_band(summary: dict) -> list[float]:
    """[min, max] TPS/GPU over the passes (a summary made elsewhere, without passes: zero width)."""
    return summary.get("tps_per_gpu_band", [summary["tps_per_gpu"]] * 2)


def ratios(dwdp: dict, dep: dict) -> dict[str, Any]:
    """DWDP over DEP; the TPS/GPU ratio's band pairs the passes' extremes."""
    (dwdp_lo, dwdp_hi), (dep_lo, dep_hi) = tps_band(dwdp), tps_band(dep)
    return {"tps_per_gpu_dwdp_over_dep": dwdp["tps_per_gpu"] / dep["tps_per_gpu"],
            "tps_per_gpu_dwdp_over_dep_band": [dwdp_lo / dep_hi, dwdp_hi / dep_lo],
            "ttft_p50_dep_over_dwdp": dep["ttft_p50_s"] / dwdp["ttft_p50_s"]}


def timing_context(devices: list, repeats: int) -> dict[str, Any]:
    """What the run's timings can claim. Virtual CPU devices share the host's cores, so there they show that each
    strategy serves the workload, not how fast: a functional check, which makes no speed claim."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    platform = devices[0].platform
    return {"functional_check": platform == "cpu", "platform": platform, "devices": len(devices),
            "host_cores": cores, "passes": repeats}


class Phases:
    """Wall seconds of the run's phases, in order (raw.phase_s): where a GPU run's minutes go besides serving. Each
    phase is announced on stderr as it starts, since compiling comes first and takes a minute on CPU, more on GPU."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = self._mark = time.perf_counter()

    def begin(self, text: str) -> None:
        tqdm.write(f"[{time.perf_counter() - self._start:6.1f} s] {text}", file=sys.stderr)

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
    phases.begin("plan: checking the config and the workload, starting the JAX backend")
    p = phases.lap("plan", plan(c))
    phases.begin(f"params: {p.cfg.num_hidden_layers} layers, {p.cfg.n_routed_experts} experts per MoE layer, "
                 f"{p.cfg.dtype} ({c.model.checkpoint or c.model.weights})")
    params = phases.lap("params", build_params(p, c))
    run_name = c.run or f"{c.name}_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    vb = verification_batches(p, c)
    refs = None
    if c.verify.enabled:
        phases.begin("reference: the verification batches on one device")
        refs = [reference_output(params, b, p, c) if b is not None else None
                for b in progress_bar(vb, "reference", "batch")]
    phases.lap("reference")
    skew = routing_skew(refs, p.cfg.n_routed_experts)
    noise = {}
    if refs and c.verify.noise_floor:
        phases.begin("reference noise: the reference with its embeddings one last bit off")
        noise = reference_noise(params, refs, vb, p, c)
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
    timing = timing_context(p.devices, c.repeats)
    path = results_lib.write_results(c.experiment, run_name, config=c, raw=s["raw"], metrics=summary,
                                     verification=s["verification"], root=c.results_root,
                                     hlo_collectives=s["hlo_collectives"], breakdown=s["breakdown"], routing_skew=skew,
                                     model=dataclasses.asdict(p.cfg), placement=dataclasses.asdict(p.placement),
                                     failures=s["failures"], reference_noise=noise, timing=timing)
    if s["failures"]:
        raise RuntimeError(f"strategies failed (the others' results are in {path}): {s['failures']}")
    return {"path": str(path), "metrics": summary, "verification": s["verification"], "phase_s": phases.seconds,
            "hlo_collectives": s["hlo_collectives"], "breakdown": s["breakdown"], "routing_skew": skew,
            "reference_noise": noise, "timing": timing}


def run_strategy(name: str, params, p: Plan, c, vb, refs, make_dep, phases: Phases | None = None
                 ) -> dict[str, dict]:
    """One strategy alone on the devices: built, verified, warmed up, run, profiled. Returns its part of each
    results section ({section: {...}}); the runtime is freed on return."""
    phases = phases or Phases()
    ranks = c.num_ranks if name == "dwdp" else dep_ranks(c)
    phases.begin(f"{name}: building the runtime on {ranks} devices")
    runtime = phases.lap(f"{name}.build", make_runtime(name, params, p, c, make_dep))
    batches = (vb + [None] * ranks)[:ranks]
    phases.begin(f"{name}: verifying against the reference (compiles its step)")
    outs = verification_outputs(runtime, batches)
    out = {"verification": {}, "hlo_collectives": {name: collectives_of(runtime, vb[0])}, "breakdown": {}}
    if refs:
        out["verification"][name] = verify(outs, (refs + [None] * ranks)[:ranks], c.verify.rel_tol,
                                           c.verify.min_id_match)
    phases.lap(f"{name}.verify")
    phases.begin(f"{name}: warm-up, compiling the step for each of {c.token_buckets} token buckets")
    warm_up(runtime, c)
    phases.lap(f"{name}.warm_up")
    phases.begin(f"{name}: serving {len(p.requests)} requests, {c.repeats} pass(es)")
    summary, raw = served(name, runtime, p, c, ranks)
    phases.lap(f"{name}.serve")
    if p.variants:
        phases.begin(f"{name}: serving the variants {', '.join(p.variants)}")
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
        phases.begin(f"{name}: a served pass under the profiler into {c.trace}")
        try:
            summary["trace"] = traced_pass(name, runtime, p, c, ranks)
        except Exception as e:  # a diagnostic: a profiler or trace-format failure must not cost the measurements
            summary["trace"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        phases.lap(f"{name}.trace")
    if c.breakdown:
        phases.begin(f"{name}: profiling the first step stage by stage (compiles each stage)")
        out["breakdown"] = profile_breakdown({name: runtime}, p, c)
    phases.lap(f"{name}.profile")
    if name == "dwdp" and runtime.options.timeline:
        phases.begin(f"{name}: copy-engine pull timeline of the first step")
        pulls = pull_timeline(runtime, first_step_batches(p, c))
        summary.update({k: pulls[k] for k in ("pull_gbps_median", "exposed_wait_fraction_mean")})
        raw["pull_timeline"] = pulls["ranks"]
        phases.lap(f"{name}.timeline")
    return {**out, "summary": {name: summary}, "raw": {name: raw}}


# DEP's synchronization estimate (`sync_estimate`) in the strategy's summary
SYNC_KEYS = ("sync_overhead", "sync_overhead_band", "sync_overhead_within_noise", "sampled_steps", "rank_cv_mean")


def served(name: str, runtime, p: Plan, c, ranks: int) -> tuple[dict, dict]:
    """`config.repeats` passes of p's requests on a warm runtime: (summary, raw records) of the pass of median
    TPS/GPU (the lower middle one of an even count), with every pass's TPS/GPU beside it."""
    repeats = [serve(name, runtime, p, c, sync=i == 0) for i in range(c.repeats)]
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
        for r, b in enumerate(progress_bar(batches, "profile", "rank")):
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


def timing_header(timing: dict[str, Any]) -> list[str]:
    """What the timings below can claim (`timing_context`), and where their noise band comes from."""
    if not timing:
        return []
    passes = (f"TPS/GPU: the median of {timing['passes']} passes, [min, max] beside it" if timing["passes"] > 1
              else "one pass per strategy: no noise band (config.repeats > 1 measures one)")
    if timing["functional_check"]:
        return [f"FUNCTIONAL CHECK, no speed claim: {timing['devices']} virtual CPU devices share "
                f"{timing['host_cores']} host cores, so the timings below show that each strategy serves the "
                f"workload, not how fast it would on GPUs; {passes}"]
    return [f"{timing['devices']} {timing['platform'].upper()} devices; {passes}"]


def _band(band: list[float], digits: int, passes: int) -> str:
    return f"[{band[0]:.{digits}f}, {band[1]:.{digits}f}]" if passes > 1 else "(1 pass)"


def _ratio_text(r: dict[str, Any], functional: bool, passes: int) -> str:
    band = r.get("tps_per_gpu_dwdp_over_dep_band", [r["tps_per_gpu_dwdp_over_dep"]] * 2)
    tps = f"DWDP/DEP TPS/GPU {r['tps_per_gpu_dwdp_over_dep']:.3f} {_band(band, 3, passes)}"
    if functional:
        return f"{tps}, TTFT p50 DEP/DWDP {r['ttft_p50_dep_over_dwdp']:.3f} (functional-check timings)"
    return f"{tps}, TTFT p50 speedup {r['ttft_p50_dep_over_dwdp']:.3f}"


def sync_text(dep: dict[str, Any]) -> str:
    """DEP's synchronization overhead with its band; one that cannot be told from zero reads "within noise" (a
    negative estimate is noise: waiting never saves time)."""
    value, (lo, hi), steps = dep["sync_overhead"], dep["sync_overhead_band"], f"{dep['sampled_steps']} sampled steps"
    if metrics.within_noise([lo, hi]):
        text = f"within noise (band [0.0%, {100 * max(hi, 0.0):.1f}%] over {steps})"
    elif lo == hi:
        text = f"{100 * value:.1f}% (one sampled step: no noise band)"
    else:
        text = f"{100 * value:.1f}% (band [{100 * lo:.1f}%, {100 * hi:.1f}%] over {steps})"
    return f"DEP synchronization overhead {text}; mean rank-token CV {100 * dep['rank_cv_mean']:.1f}%"


def format_table(doc: dict[str, Any]) -> str:
    """The short end-of-run table: what its timings can claim, per strategy TPS/GPU with its band over the passes,
    TTFT p50/p90, iteration p50, and the DWDP/DEP ratios."""
    m = doc["metrics"]
    timing = doc.get("timing", {})
    functional, passes = timing.get("functional_check", False), timing.get("passes", 1)
    rows = timing_header(timing)
    rows.append(f"{'strategy':<10}{'TPS/GPU':>10}{'[min, max]':>18}{'TTFT p50 s':>12}{'TTFT p90 s':>12}"
                f"{'iter p50 s':>12}{'verified':>10}")
    for name in STRATEGIES:
        if name in m:
            s = m[name]
            ok = doc["verification"].get(name, {}).get("passed", "-")
            rows.append(f"{name:<10}{s['tps_per_gpu']:>10.1f}{_band(tps_band(s), 1, passes):>18}"
                        f"{s['ttft_p50_s']:>12.4f}{s['ttft_p90_s']:>12.4f}{s['iteration_p50_s']:>12.4f}{str(ok):>10}")
    if "ratio" in m:
        rows.append(_ratio_text(m["ratio"], functional, passes))
    for v, r in m.get("ratio", {}).get("variants", {}).items():
        rows.append(f"variant {v}: DWDP {m['dwdp']['variants'][v]['tps_per_gpu']:.1f}, DEP "
                    f"{m['dep']['variants'][v]['tps_per_gpu']:.1f} TPS/GPU, {_ratio_text(r, functional, passes)}")
    if doc.get("phase_s"):
        rows.append("wall s per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["phase_s"].items()))
    repeats = {name: m[name]["repeats_tps_per_gpu"] for name in STRATEGIES
               if len(m.get(name, {}).get("repeats_tps_per_gpu", ())) > 1}
    if repeats:
        rows.append("repeats TPS/GPU " + "; ".join(f"{name} " + " ".join(f"{x:.1f}" for x in tps)
                                                   for name, tps in repeats.items()) + " (the median pass above)")
    if "dep" in m and "sync_overhead" in m["dep"]:
        rows.append(sync_text(m["dep"]))
    comm = doc.get("breakdown", {}).get("dep", {}).get("communication", {})
    if "gbps_per_rank" in comm:
        where = ": copies between virtual CPU devices in host memory, not a link's speed" if functional else ""
        rows.append(f"DEP all-to-all (dispatch + combine, first step profiled) {comm['gbps_per_rank']:.1f} GB/s "
                    f"per rank{where}")
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
