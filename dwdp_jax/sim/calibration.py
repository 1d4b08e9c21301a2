"""The studies of measured runs: predict a measured context_bench run's DWDP/DEP ratio with the calibrated spec
(calibration), and the paper's Table 4 grid at a group size not yet run from the newest one's setup (grid).

Why apart from the other studies: these read results files (GPU calibration, context_bench runs) and rebuild a run's
setup from its recorded config, where the others simulate specs and settings alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from dwdp_jax.prefetch import PULL_ISSUES, SLICE_BYTES
from dwdp_jax.results import read_results
from dwdp_jax.serving import workload as served_workload
from dwdp_jax.sim import hardware, simulate
from dwdp_jax.sim.config import ContextConfig
from dwdp_jax.sim.roofline import Precision
from dwdp_jax.sim.studies import require_positive
from dwdp_jax.sim.workload import Workload
from models.config import ModelConfig, YarnConfig


_PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "bf16"}


def _model_from_doc(doc: dict, where: str) -> ModelConfig:
    fields = doc.get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: needs the resolved model section `model` (dataclasses.asdict(ModelConfig))")
    fields = dict(fields)
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = YarnConfig(**fields["rope_scaling"])
    return ModelConfig(**fields)


def bench_setup(doc: dict) -> tuple[ModelConfig, Workload, ContextConfig, ContextConfig]:
    """(model, workload, DEP config, DWDP config) of a context_bench results document (its resolved `model`
    section and its `config`: num_ranks, max_num_tokens, max_batch_size, workload.{num_requests, isl, input_ratio,
    isl_std (< 0: none), rate_per_s (0: all at once), seed, dataset}, dwdp.{local_experts (0: auto), slices,
    packing (absent: fcfs), pull_issue (absent: after_moe)})."""
    where = f"context_bench run {doc.get('run', '?')}"
    c = doc.get("config") or {}
    try:
        wl, dw = c["workload"], c.get("dwdp", {})
        if wl.get("dataset"):
            raise ValueError(f"{where}: calibration simulates synthetic workloads only, not dataset {wl['dataset']!r}")
        cfg = _model_from_doc(doc, where)
        precision = _PRECISION_OF_DTYPE.get(cfg.dtype)
        if precision is None:
            raise ValueError(f"{where}: model dtype {cfg.dtype!r} has no tensor-core precision to calibrate; "
                             f"calibrate from a bfloat16 GPU run")
        workload = Workload(int(wl["num_requests"]), int(wl["isl"]), float(wl.get("input_ratio", 1.0)),
                            isl_std=wl["isl_std"] if wl.get("isl_std", -1) >= 0 else None,
                            rate_per_s=wl["rate_per_s"] if wl.get("rate_per_s", 0) > 0 else None,
                            seed=int(wl.get("seed", 0)))
        base = ContextConfig("dep", group_size=int(c["num_ranks"]), max_num_tokens=int(c["max_num_tokens"]),
                             max_batch_size=int(c["max_batch_size"]), token_buckets=int(c["token_buckets"]),
                             precision=Precision(moe=precision, dense=precision, attention=precision,
                                                 combine=precision))
    except KeyError as e:
        raise ValueError(f"{where}: config is missing field {e}") from e
    # runs written before config.dwdp.packing existed packed strict FCFS
    dwdp = dataclasses.replace(base, strategy="dwdp", local_experts=dw.get("local_experts") or None,
                               discipline="round_robin" if dw.get("slices", 1) > 1 else "fifo",
                               packing=dw.get("packing", "fcfs"), pull_issue=dw.get("pull_issue", "after_moe"))
    return cfg, workload, base, dwdp


def _gpu_runs(results_root: str | Path | None) -> list[dict]:
    """The context_bench runs with both strategies at a tensor-core precision: the fp32 CPU runs (the tiny default)
    measure the machinery, not the hardware."""
    return [d for d in read_results("context_bench", results_root)
            if {"dwdp", "dep"} <= set((d.get("metrics") or {}).keys())
            and (d.get("model") or {}).get("dtype") in _PRECISION_OF_DTYPE]


def _kernels_of(doc: dict, kernels: dict[str, str]) -> dict[str, str]:
    return {k: (doc.get("config") or {}).get(k) for k in kernels}


def _measured_ratio(doc: dict, variant: str = "") -> float:
    m = doc.get("metrics") or {}
    where = "" if not variant else f"variants.{variant}."
    try:
        dwdp, dep = (m[s]["variants"][variant] if variant else m[s] for s in ("dwdp", "dep"))
        return float(dwdp["tps_per_gpu"]) / float(dep["tps_per_gpu"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"context_bench run {doc.get('run', '?')}: needs metrics.dwdp.{where}tps_per_gpu and "
                         f"metrics.dep.{where}tps_per_gpu") from e


def _with_fields(setup: tuple, fields: dict) -> tuple:
    """A bench setup (`bench_setup`) with a context_bench variant's fields: the workload's (config.workload's
    conventions: isl_std < 0 and rate_per_s 0 mean none), and a smaller batch budget on the run's bucket size."""
    cfg, workload, dep, dwdp = setup
    fields = dict(fields)
    if "isl_std" in fields:
        fields["isl_std"] = fields["isl_std"] if fields["isl_std"] >= 0 else None
    if "rate_per_s" in fields:
        fields["rate_per_s"] = fields["rate_per_s"] if fields["rate_per_s"] > 0 else None
    if "max_num_tokens" in fields:
        mnt = fields.pop("max_num_tokens")
        step = dep.max_num_tokens // dep.token_buckets
        dep, dwdp = (dataclasses.replace(x, max_num_tokens=mnt, token_buckets=mnt // step) for x in (dep, dwdp))
    return cfg, dataclasses.replace(workload, **fields), dep, dwdp


def calibration_study(results_root: str | Path | None, tolerance: float = 0.10,
                      depths: Sequence[int] = (7, 8, 11, 61), requests: Sequence[int] = (256,)) -> dict:
    """Predicted (calibrated spec, simulator) vs measured DWDP/DEP TPS/GPU for every context_bench run with both
    strategies, and what the calibrated simulator projects for the same run at other depths (more MoE layers per
    dense front), with ISL std 4096, and with more requests (a longer run: the last requests' tail weighs less).
    Raises ValueError when there is no calibration file or no such run."""
    require_positive("projection_requests", requests)
    hw = hardware.calibrated(results_root)
    # Only runs at a tensor-core precision calibrate a GPU spec: the fp32 CPU runs (the tiny default) measure the
    # machinery, not the hardware, and are skipped rather than refused.
    docs = _gpu_runs(results_root)
    if not docs:
        raise ValueError(f"no bf16 context_bench results with both dwdp and dep metrics under "
                         f"{results_root or 'results'}")
    kernels = calibrated_kernels(results_root)
    rows, skipped = [], []
    for doc in docs:
        used = _kernels_of(doc, kernels)
        if used != kernels:  # another kernel set: its ratio says nothing about these rates
            skipped.append({"run": doc.get("run"), "kernels": used})
            continue
        setup = bench_setup(doc)
        cfg = setup[0]
        # the run's setup, then each of its variants (further workloads served by the same runtimes)
        variants = served_workload.parse_variants((doc.get("config") or {}).get("variants", ""))
        for variant, (_, workload, dep, dwdp) in [("", setup)] + [(v, _with_fields(setup, f))
                                                                  for v, f in variants.items()]:
            measured = _measured_ratio(doc, variant)
            sim = {s.strategy: simulate.simulate_context(cfg, hw, s, workload).summary() for s in (dep, dwdp)}
            predicted = sim["dwdp"]["tps_per_gpu"] / sim["dep"]["tps_per_gpu"]
            rows.append({"run": doc.get("run") + (f"/{variant}" if variant else ""), "num_ranks": dep.group_size,
                         "measured_ratio": measured, "predicted_ratio": predicted,
                         "rel_error": predicted / measured - 1,
                         "within_tolerance": abs(predicted / measured - 1) <= tolerance, "simulated": sim,
                         "projections": _projections(cfg, hw, workload, dep, dwdp, depths, requests)})
    if not rows:
        raise ValueError(f"no context_bench run used the calibrated kernels {kernels}; runs seen: {skipped}")
    return {"config": {"hardware": hw, "tolerance": tolerance, "kernels": kernels},
            "raw": {"runs": rows, "skipped_other_kernels": skipped},
            "metrics": {"runs": [{k: v for k, v in r.items() if k != "simulated"} for r in rows],
                        "all_within_tolerance": all(r["within_tolerance"] for r in rows)}}


def _projections(cfg, hw, workload: Workload, dep, dwdp, depths: Sequence[int], requests: Sequence[int] = ()
                 ) -> dict[str, float]:
    """Simulated DWDP/DEP ratios of a measured setup at other depths, with ISL std 4096 (input ratio 1) and with
    other request counts ("layers=L[,isl_std=4096][,requests=R]"), and at the measured depth with DWDP's pulls
    issued at the other point (",pull_issue=P")."""
    def ratio(model, w, dwdp_config):
        tps = {s.strategy: simulate.simulate_context(model, hw, s, w).tps_per_gpu for s in (dep, dwdp_config)}
        return tps["dwdp"] / tps["dep"]

    def variants(w):
        return (("", w), (",isl_std=4096", dataclasses.replace(w, input_ratio=1.0, isl_std=4096.0)))

    other = next(p for p in PULL_ISSUES if p != dwdp.pull_issue)
    moved = dataclasses.replace(dwdp, pull_issue=other)
    out = {f"layers={cfg.num_hidden_layers}{name},pull_issue={other}": ratio(cfg, w, moved)
           for name, w in variants(workload)}
    for layers in (cfg.num_hidden_layers, *depths):
        model = cfg.replace(num_hidden_layers=layers)
        for count in (workload.num_requests, *(r for r in requests if r != workload.num_requests)):
            suffix = "" if count == workload.num_requests else f",requests={count}"
            for name, w in variants(dataclasses.replace(workload, num_requests=count)):
                out[f"layers={layers}{name}{suffix}"] = ratio(model, w, dwdp)
    return out


def grid_study(results_root: str | Path | None, group_size: int = 8, input_ratios: Sequence[float] = (0.5, 0.8),
               max_num_tokens: Sequence[int] = (16384, 32768), slice_bytes: int = SLICE_BYTES) -> dict:
    """The paper's Table 4 grid (input ratio x MNT x contention mitigation) for DWDP-N against DEP-N, predicted by the
    calibrated simulator on the newest measured R1-width run's setup (model depth, workload, token buckets, DWDP
    packing) at group size N: the prediction an N-GPU run (issue 9) is compared with. Mitigation off: whole-shard
    pulls, first come first served at a source (fifo); on: `slice_bytes` slices round-robin over the peers."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    require_positive("input_ratios", input_ratios)
    require_positive("max_num_tokens", max_num_tokens)
    hw = hardware.calibrated(results_root)
    kernels = calibrated_kernels(results_root)
    docs = [d for d in _gpu_runs(results_root) if _kernels_of(d, kernels) == kernels]
    if not docs:
        raise ValueError(f"no bf16 context_bench run with both strategies and the calibrated kernels {kernels} under "
                         f"{results_root or 'results'}")
    base_doc = max(docs, key=lambda d: (d.get("environment") or {}).get("date", ""))
    cfg, workload, dep, dwdp = bench_setup(base_doc)
    rows = []
    for ratio in input_ratios:
        w = dataclasses.replace(workload, input_ratio=ratio, isl_std=None)
        for mnt in max_num_tokens:
            size = dict(group_size=group_size, max_num_tokens=mnt)
            dep_result = simulate.simulate_context(cfg, hw, dataclasses.replace(dep, **size), w)
            for on in (False, True):
                x = dataclasses.replace(dwdp, **size, discipline="round_robin" if on else "fifo",
                                        slice_bytes=slice_bytes)
                result = simulate.simulate_context(cfg, hw, x, w)
                rows.append({"input_ratio": ratio, "max_num_tokens": mnt, "contention_mitigation": on,
                             "dwdp_over_dep": result.tps_per_gpu / dep_result.tps_per_gpu,
                             "dwdp": result.summary(), "dep": dep_result.summary(),
                             "contention": result.contention_frequencies()})
    return {"config": {"hardware": hw, "group_size": group_size, "base_run": base_doc.get("run"),
                       "slice_bytes": slice_bytes, "model": cfg, "kernels": kernels},
            "raw": {"points": rows},
            "metrics": {"points": [{k: v for k, v in r.items() if k not in ("dwdp", "dep")} for r in rows]}}


def calibrated_kernels(results_root: str | Path | None) -> dict[str, str]:
    """The MoE and attention kernels the newest GPU calibration measured (context_bench config names).

    Calibration files written before the field existed measured the split-weight kernel and cuDNN attention."""
    config = hardware.newest_calibration(results_root)[1].get("config") or {}
    return {"gemm_backend": config.get("gemm_backend", "pallas_split"),
            "attention_impl": config.get("attention_impl", "cudnn")}
