"""One R1-width decoder layer (MLA + MoE, every routed expert on the device) on one device, FP8 as the checkpoint
ships against bf16, side by side in one run: tokens/s of the packed prefill step and the time of each stage.
With several attention backends (`--attention_impls`), every preset runs on each: the attention stage before and
after a backend change, in the same run.

The layer is the model's own first MoE layer (the config with num_hidden_layers=1, first_k_dense_replace=0) run by
the single-device `reference` runtime with synthetic weights: embedding, one layer (attention, then router, routed
and shared experts), head. The variants (preset x attention backend) take turns, each round starting one variant
later (`gpu_bench.round_order`), so none always runs after the same one; a step's time is the median of its rounds,
after warm-up, and a variant's speedup over the first is also given as the median of its rounds' own ratios
(`gpu_bench.paired_ratios`). The rounds run back to back, so on an H100 or H200 they reach the 700 W power
cap within a second; nvidia-smi's SM clock and power samples over them are recorded (`rounds_sm_clock_mhz_*`,
`rounds_power_w_max`). Each stage's time comes from a separate profiled step (every stage waits for its outputs).

Logits are computed at each sequence's last token, as serving does. Before any time is taken, each preset's step is
checked: logits finite, and at fp32 (`--tiny`, CPU) equal to the model's one-program prefill (`reference.prefill`)
within 1e-5. Across presets, the FP8 logits' relative distance to bf16's and the share of tokens whose expert sets
agree are recorded (quantization, not a defect).

  python -m experiments.bench_layer                 # on a GPU: R1 width, 32768 tokens in 4 sequences
  python -m experiments.bench_layer --attention_impls=tokamax,cudnn --presets=deepseek_r1
  python -m experiments.bench_layer --presets=deepseek_r1_released,deepseek_r1_released:fp8_attention_qkv=True
  python -m experiments.bench_layer --tiny          # CPU functional check, 256 tokens (timings are no speed claim)
"""

from __future__ import annotations

import ast
import dataclasses
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from dwdp_jax import profiling, stage_trace
from dwdp_jax.expert_source import SyntheticExperts
from dwdp_jax.kernels import attention
from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.packing import pack
from dwdp_jax.progress import progress_bar
from dwdp_jax.results import write_measurements
from dwdp_jax.runtime import reference, stages
from models import config as C
from models.deepseek_v3 import DeepseekV3

TINY_TOKENS = 256
_PRESETS = flags.DEFINE_list("presets", ["deepseek_r1", "deepseek_r1_released"], "model presets (an ablation: "
                             "preset:field=value), the first the base of the ratios")
_TOKENS = flags.DEFINE_integer("tokens", 32768, f"tokens of the packed batch ({TINY_TOKENS} with --tiny unless given: "
                               "the CPU's XLA attention holds a [heads, T, T] score array)", lower_bound=2)
_SEQUENCES = flags.DEFINE_integer("sequences", 4, "sequences of equal length in the batch", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "timed steps per preset, presets alternating", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per preset first", lower_bound=0)
_GEMM = flags.DEFINE_string("gemm_backend", "", "grouped GEMM backend (default: pallas_split on GPU, xla on CPU)")
_ATTENTION = flags.DEFINE_list("attention_impls", [], "attention backends, each run with every preset (default: "
                                "hopper on GPU, xla on CPU); variants are named preset@backend when several")
_TINY = flags.DEFINE_bool("tiny", False, "the tiny preset's widths at fp32 (a CPU functional check)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and tokens")
_TRACE = flags.DEFINE_string("trace", "", "a new directory: after the timed rounds, one more step of each variant "
                              "under the profiler, its device time by named scope and its costliest instructions "
                              "(XLA's HLO dump goes there too)")
_RESULTS = flags.DEFINE_string("results", "results", "results root")
TOP_KERNELS = 20  # instructions recorded per traced variant (12 printed)

EXACT = 1e-5  # fp32: the staged step against the one-program prefill


def tokens() -> int:
    return TINY_TOKENS if _TINY.value and not flags.FLAGS["tokens"].present else _TOKENS.value


def parse_preset(spec: str) -> tuple[str, dict]:
    """`preset[:field=value...]` -> (preset, ModelConfig changes): an ablation of a preset, e.g.
    `deepseek_r1_released:fp8_attention_qkv=True`. Values are Python literals, else strings."""
    name, *overrides = spec.split(":")
    fields = {f.name for f in dataclasses.fields(C.ModelConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise app.UsageError(f"--presets: {item!r} in {spec!r} is not field=value of a ModelConfig field")
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    return name, changes


def layer_config(spec: str, tiny: bool) -> C.ModelConfig:
    """The preset's layer widths with one MoE layer and no MTP, with the spec's changes (`parse_preset`); `tiny`:
    the tiny preset's widths, fp32, with the preset's FP8 choices."""
    name, changes = parse_preset(spec)
    cfg = C.get_preset(name)
    if tiny:
        cfg = C.tiny(fp8_experts=cfg.fp8_experts, fp8_dense=cfg.fp8_dense, hidden_size=256, intermediate_size=256,
                     moe_intermediate_size=128)
    return cfg.replace(**changes, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)


def experts_key(cfg: C.ModelConfig) -> tuple:
    """What a variant's synthetic experts depend on (with the seed): variants equal in it share one copy."""
    return (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_moe_layers, cfg.fp8_experts,
            cfg.dtype)


def build(cfg: C.ModelConfig, device: jax.Device, gemm_backend: str, attention_impl: str, seed: int,
          expert_views=None):
    """(params, runtime) of one variant; `expert_views`: an earlier variant's, when `experts_key` is the same."""
    with jax.default_device(device):
        params = reference.Params(DeepseekV3(cfg, nnx.Rngs(seed)), SyntheticExperts(cfg, seed))
    params = params._replace(model=stages.with_attention_impl(params.model, attention_impl))
    # logits of each sequence's last token only, as serving computes them (the whole [T, V] would dominate)
    return params, reference.ReferenceRuntime(params, device, gemm_backend, last_token_logits=_SEQUENCES.value,
                                              expert_views=expert_views)


def main(argv):
    del argv
    if _TRACE.value:
        profiling.start_trace_dump(_TRACE.value)  # before the backend starts
    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    if not gpu and not _TINY.value:
        print("bench_layer: R1 width needs a GPU; --tiny runs the functional check on CPU", file=sys.stderr)
        sys.exit(2)
    if tokens() % _SEQUENCES.value:
        raise app.UsageError(f"--tokens={tokens()} must be a multiple of --sequences={_SEQUENCES.value}")
    gemm = _GEMM.value or ("pallas_split" if gpu else "xla")
    impls = _ATTENTION.value or ["hopper" if gpu else "xla"]
    if len(set(impls)) < len(impls):
        raise app.UsageError(f"--attention_impls={','.join(impls)} names a backend twice")
    for impl in impls:
        attention.get_backend(impl)  # an unknown name fails here, before any weights are built
    cfgs = {p: layer_config(p, _TINY.value) for p in _PRESETS.value}
    variants = {(f"{p}@{impl}" if len(impls) > 1 else p): (p, impl) for p in _PRESETS.value for impl in impls}
    rng = np.random.default_rng(_SEED.value)
    length = tokens() // _SEQUENCES.value
    batch = pack([rng.integers(0, cfgs[_PRESETS.value[0]].vocab_size, length).tolist()
                  for _ in range(_SEQUENCES.value)], budget=tokens())
    runtimes, outputs, metrics, failed = {}, {}, {}, []
    views = {}  # experts_key -> the first such variant's expert views: the others hold no copy of their own
    for name, (preset, impl) in progress_bar(list(variants.items()), "build + check", "variant"):
        cfg = cfgs[preset]
        params, runtimes[name] = build(cfg, device, gemm, impl, _SEED.value, views.get(experts_key(cfg)))
        views.setdefault(experts_key(cfg), runtimes[name].expert_views)
        out = runtimes[name].step(0, batch).output
        outputs[name] = out
        if not np.isfinite(out.logits_TV).all():
            failed.append(f"{name}: non-finite logits")
        if not gpu:  # fp32 on CPU: the staged step is the one-program prefill
            slabs = tuple(params.experts.rows(m, 0, cfg.n_routed_experts, device) for m in range(cfg.num_moe_layers))
            want = reference.prefill(params._replace(experts=slabs), batch).logits_TV[batch.last_token_index()]
            err = float(np.linalg.norm(out.logits_TV - want) / np.linalg.norm(want))
            metrics[f"{name}_rel_err_vs_prefill"] = err
            if not err <= EXACT:
                failed.append(f"{name}: staged step vs prefill rel err {err:.2e} > {EXACT}")
    base = next(iter(variants))
    for name in list(variants)[1:]:
        a, b = outputs[name], outputs[base]
        metrics[f"{name}_logits_rel_to_{base}"] = float(np.linalg.norm(a.logits_TV - b.logits_TV)
                                                        / np.linalg.norm(b.logits_TV))
        metrics[f"{name}_expert_sets_equal_{base}"] = float(
            (np.sort(a.expert_ids[0], 1) == np.sort(b.expert_ids[0], 1)).all(1).mean())
    for name, out in outputs.items():  # the grouped GEMM's skew as this layer routes (the kernels' benches set theirs)
        rows_E = np.bincount(np.asarray(out.expert_ids[0]).ravel(), minlength=cfgs[variants[name][0]].n_routed_experts)
        metrics[f"{name}_routed_max_over_mean"] = float(rows_E.max() / rows_E.mean())
    if failed:
        write_measurements("bench_layer", config=_config(gemm, impls), raw={"failed": failed},
                           metrics=metrics, root=_RESULTS.value)
        print("bench_layer: failed its checks (no time reported): " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)
    seconds = {name: [] for name in variants}
    with gb.sampled_clocks() as clocks:  # the clocks the timed steps ran at (the power cap's, back to back)
        for i in progress_bar(list(range(_WARMUP.value + _ROUNDS.value)), "rounds", "round"):
            for name in gb.round_order(list(runtimes), i):
                result = runtimes[name].step(0, batch)
                if i >= _WARMUP.value:
                    seconds[name].append(result.end_s - result.start_s)
    if clocks:
        metrics["rounds_sm_clock_mhz_median"] = statistics.median(c for c, _ in clocks)
        metrics["rounds_sm_clock_mhz_min"] = min(c for c, _ in clocks)
        metrics["rounds_power_w_max"] = max(p for _, p in clocks)
    for name, runtime in runtimes.items():
        step = statistics.median(seconds[name])
        metrics[f"{name}_step_ms"] = step * 1e3
        metrics[f"{name}_step_ms_min"], metrics[f"{name}_step_ms_max"] = (min(seconds[name]) * 1e3,
                                                                          max(seconds[name]) * 1e3)
        metrics[f"{name}_tokens_per_s"] = tokens() / step
        runtime.step(0, batch, profile=True)  # compiles the per-stage programs
        for stage, s in runtime.step(0, batch, profile=True).stages_s.items():
            metrics[f"{name}_{stage}_ms"] = s * 1e3
    traced = {name: traced_step(name, runtime, batch, device, metrics) for name, runtime in runtimes.items()
              } if _TRACE.value else {}
    for name in list(variants)[1:]:
        metrics[f"{name}_over_{base}_tokens_per_s"] = (metrics[f"{name}_tokens_per_s"]
                                                       / metrics[f"{base}_tokens_per_s"])
        paired = gb.paired_ratios(seconds[base], seconds[name])
        metrics[f"{name}_over_{base}_paired_median"] = statistics.median(paired)
        metrics[f"{name}_over_{base}_paired_min"], metrics[f"{name}_over_{base}_paired_max"] = min(paired), max(paired)
        for key in ("busy", "wall"):  # the speedup in the traced step, at the clocks one step alone runs at
            if f"{name}_trace_{key}_ms" in metrics:
                metrics[f"{name}_over_{base}_trace_{key}"] = (metrics[f"{base}_trace_{key}_ms"]
                                                              / metrics[f"{name}_trace_{key}_ms"])
    raw = {"seconds": seconds, "top_kernels": {n: top for n, (top, _) in traced.items()},
           "idle_gaps": {n: gaps for n, (_, gaps) in traced.items()}}
    write_measurements("bench_layer", config=_config(gemm, impls), raw=raw, metrics=metrics, root=_RESULTS.value)
    _table(list(variants), metrics, gpu)
    for name, (top, gaps) in traced.items():
        print(f"{name}: costliest instructions of one traced step")
        for r in top[:12]:
            print(f"  {r['ms']:9.3f} ms {r['calls']:4d}x  {r['stage']:<14} {r['hlo_op']:<28} {r['kernels'][0][:60]}")
        print(f"{name}: idle before these instructions' kernels (the device computing nothing)")
        for r in gaps[:8]:
            after = ",".join(r["after"])
            print(f"  {r['ms']:9.3f} ms {r['gaps']:4d}x  {r['stage']:<14} {r['hlo_op']:<28} after {after}")


def traced_step(name: str, runtime, batch, device: jax.Device, metrics: dict) -> tuple[list[dict], list[dict]]:
    """One step of `runtime` under the profiler: its wall time, its device's time by stage and its idle time by the
    stage that waited ({name}_trace_idle_before_{stage}_ms) into `metrics`, and its costliest instructions and
    idle gaps (`stage_trace.top_kernels`, `stage_trace.idle_gaps`)."""
    trace_dir = Path(_TRACE.value) / name.replace(":", "_").replace("=", "_").replace("@", "_")
    with jax.profiler.trace(str(trace_dir)):
        result = runtime.step(0, batch)
    metrics[f"{name}_trace_wall_ms"] = (result.end_s - result.start_s) * 1e3  # host time of the same step
    kernels = stage_trace.device_kernels(stage_trace.newest_xplane(trace_dir))
    events = kernels.get(device.id) or next(iter(kernels.values()))  # CPU thunks carry the device ordinal
    scopes = stage_trace.hlo_scopes(Path(_TRACE.value) / "hlo", events)
    t = stage_trace.breakdown({0: events}, scopes)[0]
    for key in ("span_ms", "busy_ms", "idle_ms", "kernels"):
        metrics[f"{name}_trace_{key}"] = t[key]
    for stage, ms in t["stages_ms"].items():
        metrics[f"{name}_trace_{stage}_ms"] = ms
    gaps = stage_trace.idle_gaps(events, scopes, len(events))
    for row in gaps:
        key = f"{name}_trace_idle_before_{row['stage']}_ms"
        metrics[key] = metrics.get(key, 0.0) + row["ms"]
    return stage_trace.top_kernels(events, scopes, TOP_KERNELS), gaps[:TOP_KERNELS]


def _config(gemm: str, attention_impls: list[str]) -> dict:
    return {"presets": _PRESETS.value, "tokens": tokens(), "sequences": _SEQUENCES.value,
            "rounds": _ROUNDS.value, "warmup": _WARMUP.value, "gemm_backend": gemm, "attention_impls": attention_impls,
            "tiny": _TINY.value, "seed": _SEED.value, "trace": _TRACE.value}


def _table(variants: list[str], metrics: dict, gpu: bool) -> None:
    if not gpu:
        print("CPU: FUNCTIONAL CHECK, no speed claim")
    stages_ = ("attention", "moe", "embed", "head")
    print(f"{'variant':<32}{'tokens/s':>12}{'step ms':>10}" + "".join(f"{s + ' ms':>14}" for s in stages_))
    for name in variants:
        print(f"{name:<32}{metrics[f'{name}_tokens_per_s']:>12.0f}{metrics[f'{name}_step_ms']:>10.1f}"
              + "".join(f"{metrics.get(f'{name}_{s}_ms', 0.0):>14.1f}" for s in stages_))
    for key in (k for k in metrics if "_over_" in k or "_rel_to_" in k or "_equal_" in k):
        print(f"{key}: {metrics[key]:.4g}")


if __name__ == "__main__":
    app.run(main)
