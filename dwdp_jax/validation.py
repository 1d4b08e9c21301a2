"""The config checked before any device work: `validate` checks every field of the resolved config (FIELD_CHECKS),
then the fields together (workload vs MNT, placement, DEP's sharding), without starting a JAX backend; `plan` then
checks what needs the devices (their count, DEP's dispatch, the depth that fits their memory)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax

from configs.context_bench import get_config as preset_config
from dwdp_jax.kernels import attention, attention_mgpu, attention_tokamax, fp8, grouped_gemm
from dwdp_jax.kernels.attention import MAX_SEGMENTS
from dwdp_jax.placement import Placement
from dwdp_jax.prefetch import PULL_ISSUES
from dwdp_jax.profiling import trace_dump_flags
from dwdp_jax import strategies as strategy_lib
from dwdp_jax.run_plan import (MODEL_OVERRIDES, Batching, Plan, batching_from, dep_plan_from, dwdp_plan_from,
                               measure_plan_from, model_config_from, requests_from, token_buckets, variant_plan,
                               verify_plan_from, weights_from)
from dwdp_jax.runtime import dep as dep_lib
from dwdp_jax.serving import scheduler, workload
from dwdp_jax.transport import transport_class
from dwdp_jax.verification import verification_split
from models import config as model_config

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


def _cache_dir(v) -> str | None:
    problem = None if v == "" else _creatable_dir(v)
    return None if problem is None else f"'' (off) or {problem}"


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
    "compilation_cache": _cache_dir,
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
    "gemm_backend": _registered(grouped_gemm.get_backend),
    "attention_impl": _registered(attention.get_backend),
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


def strategies_from(c) -> tuple[str, ...]:
    names = tuple(s.strip() for s in c.strategies.split(",") if s.strip())
    known = tuple(strategy_lib.REGISTRY)
    if not names or set(names) - set(known) or len(set(names)) != len(names):
        raise ValueError(f"config.strategies={c.strategies!r}: a comma list of distinct names from {known}")
    return names


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
    needs_placement = any(strategy_lib.get(name).needs_placement for name in strategies)
    placement = _checked_placement(c, cfg) if needs_placement else None
    requests, variants = _checked_workload(c, cfg.vocab_size)
    _check_verification(requests, c)
    if c.attention_impl.startswith(("tokamax", "mgpu", "hopper")):
        check = attention_mgpu.check_head_dims if c.attention_impl == "mgpu" else attention_tokamax.check_head_dims
        try:
            check(cfg.qk_head_dim, cfg.v_head_dim)
        except ValueError as e:
            raise ValueError(f"config.attention_impl={c.attention_impl!r}: {e}") from e
    if c.attention_impl.startswith("cudnn") and c.max_batch_size > MAX_SEGMENTS:
        raise ValueError(f"config.max_batch_size={c.max_batch_size}: at most {MAX_SEGMENTS} with cuDNN attention "
                         f"(config.attention_impl={c.attention_impl!r}: its segment table)")
    try:
        dwdp = dwdp_plan_from(c)
    except ValueError as e:
        raise ValueError(f"config.dwdp: {e}") from e
    p = Plan(cfg, requests, batching_from(c, cfg.vocab_size), strategies, placement, [], weights_from(c), dwdp,
             dep_plan_from(c), verify_plan_from(c), measure_plan_from(c), variants)
    for name in strategies:
        strategy_lib.get(name).check(p)
    return p


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
    if cfg.fp8_experts:
        try:
            grouped_gemm.check_fp8(c.gemm_backend)
        except ValueError as e:
            raise ValueError(f"config.gemm_backend={c.gemm_backend!r} with FP8 experts (config.model.preset="
                             f"{c.model.preset!r}): {e}") from e
    return cfg


def _checked_placement(c, cfg: model_config.ModelConfig) -> Placement:
    """DWDP's expert placement for this model."""
    try:
        return Placement.for_group(cfg.n_routed_experts, c.num_ranks, c.dwdp.local_experts or None)
    except ValueError as e:
        raise ValueError(f"config.num_ranks={c.num_ranks}, config.dwdp.local_experts={c.dwdp.local_experts}: "
                         f"{e}") from e


def _checked_workload(c, vocab_size: int
                      ) -> tuple[list[workload.Request], dict[str, tuple[list[workload.Request], Batching]]]:
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
    variants = {name: variant_plan(c, name, fields, vocab_size)
                for name, fields in workload.parse_variants(c.variants).items()}
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
    """`validate`, then what needs the devices (the backend starts here, nothing compiles): enough of them for each
    strategy, each strategy's checks on this platform, and the depth that fits their memory
    (config.model.num_hidden_layers = 0)."""
    p = validate(c)
    if c.trace and trace_dump_flags(c.trace) not in os.environ.get("XLA_FLAGS", ""):
        raise ValueError(f"config.trace needs XLA's HLO dump from the backend's start ({trace_dump_flags(c.trace)} "
                         f"in XLA_FLAGS; experiments.context_bench sets it)")
    devices = jax.devices()
    platform = devices[0].platform
    needs = {name: strategy_lib.get(name).ranks(p) for name in p.strategies}
    if max(needs.values()) > len(devices):
        have = (f"this CPU run has {len(devices)} virtual ones: raise config.cpu_devices"
                if platform == "cpu" else f"this machine has {len(devices)}")
        wanted = ", ".join(f"{name.upper()} {n}" for name, n in needs.items())
        raise ValueError(f"config.num_ranks={c.num_ranks} ({wanted}) needs as many devices, and {have}")
    for name in p.strategies:
        strategy_lib.get(name).check_platform(p, platform)
    if p.cfg.fp8_experts and platform == "gpu" and not fp8.has_fp8_tensor_cores(devices[0]):
        raise ValueError(f"config.model.preset={c.model.preset!r} (FP8 experts) needs FP8 tensor cores (compute "
                         f"capability >= 8.9: Ada, Hopper, Blackwell), found {devices[0].device_kind} (compute "
                         f"capability {getattr(devices[0], 'compute_capability', None)}); use a bf16 preset")
    if p.weights.attention_impl.startswith(("tokamax", "mgpu", "hopper")):
        try:
            attention_tokamax.check_device(devices[0], p.weights.attention_impl)
        except ValueError as e:
            raise ValueError(f"config.attention_impl={p.weights.attention_impl!r}: {e}") from e
    cfg = p.cfg
    if not c.model.num_hidden_layers:
        device_bytes = int(devices[0].memory_stats()["bytes_limit"] * p.measure.memory_fraction)
        cfg = model_config_from(c, depth_that_fits(p, device_bytes))
    return dataclasses.replace(p, cfg=cfg, devices=devices[:max(needs.values())])


def depth_that_fits(p: Plan, device_bytes: int) -> int:
    """The deepest model (num_hidden_layers, at most the preset's) whose ranks fit `device_bytes` for every
    strategy of the run (config.model.num_hidden_layers = 0 asks for it: R1-width layers on the GPUs at hand)."""
    cfg, last_refusal = p.cfg, ""
    for layers in range(cfg.num_hidden_layers, cfg.first_k_dense_replace, -1):
        try:
            for name in p.strategies:
                strategy_lib.get(name).plan_memory(p, cfg.replace(num_hidden_layers=layers), device_bytes)
            return layers
        except ValueError as e:
            last_refusal = f"{name}: {e}"
    raise ValueError(f"no depth of the model fits {device_bytes / 2**30:.1f} GiB per device; at one MoE layer, "
                     f"{last_refusal}")
