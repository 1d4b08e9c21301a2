"""Named ablation sweeps mirroring the paper's Tables 3 and 4, plus the engine ablations (merge, prefetch, transport).

A sweep is a list of points; a point is a dict of swept values (the keys the ablation figure matches against the
paper) that maps onto config overrides. Each point runs the context benchmark once and writes
results/ablations/<sweep>__<point>.json. A sweep is resumable: a stored point is reused only when its key (a hash of
the point's full resolved config and the device kind) matches and its verification did not fail; otherwise it runs
again and its file is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import jax

from dwdp_jax import bench, results
from dwdp_jax.prefetch import SLICE_BYTES

# Point values per scale: "tiny" for the CPU default model, "r1" for the R1-width GPU configs (the paper's values).
SWEEP_VALUES = {
    "isl": {"tiny": [32, 64, 96, 128], "r1": [1024, 8192, 16384, 32768]},
    "mnt": {"tiny": [192, 384], "r1": [16384, 32768]},
    "isl_std": {"tiny": [0, 16, 32, 64], "r1": [0, 1024, 2048, 4096]},
    "group_size": {"tiny": [3, 4], "r1": [3, 4]},
    "contention": {"tiny": [0.5, 0.8], "r1": [0.5, 0.8]},
    "merge": {"tiny": [False, True], "r1": [False, True]},
    "prefetch": {"tiny": [True, False], "r1": [True, False]},
    "transport": {"tiny": ["device_put", "copy_engine"], "r1": ["device_put", "copy_engine"]},
    # DEP's per-step balancing: by tokens (LPT, the default) or by request count (ranks keep their token imbalance).
    "dep_balance": {"tiny": ["tokens", "requests"], "r1": ["tokens", "requests"]},
    # DWDP's batch filling: DEP's window one rank at a time (the default) or strict FCFS (sessions 4-6 on GPUs).
    "dwdp_packing": {"tiny": ["lookahead", "fcfs"], "r1": ["lookahead", "fcfs"]},
    # Where a DWDP pull starts: at the end of a MoE layer (overlapping attention first) or between attention and MoE.
    "pull_issue": {"tiny": ["after_moe", "after_attention"], "r1": ["after_moe", "after_attention"]},
}
# The ISL of the std sweep (paper: 16384) and the slice count standing for "contention mitigation on".
STD_ISL = {"tiny": 128, "r1": 16384}
MITIGATION_SLICES = {"tiny": 4, "r1": 8}
MITIGATION_SLICE_BYTES = SLICE_BYTES  # the paper's, as the simulator's


def points(sweep: str, scale: str) -> list[dict[str, Any]]:
    if sweep not in SWEEP_VALUES:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {sorted(SWEEP_VALUES)}")
    if scale not in ("tiny", "r1"):
        raise ValueError(f"scale must be 'tiny' or 'r1', got {scale!r}")
    values = SWEEP_VALUES[sweep][scale]
    if sweep == "contention":
        mnts = SWEEP_VALUES["mnt"][scale]
        return [{"input_ratio": r, "max_num_tokens": m, "contention_mitigation": on}
                for r, m, on in itertools.product(values, mnts, (False, True))]
    if sweep == "prefetch":  # pulling right before each MoE needs a transport that copies on request
        return [{"prefetch": v, "transport": "device_put"} for v in values]
    key = {"mnt": "max_num_tokens", "merge": "merge_experts"}.get(sweep, sweep)
    return [{key: v} for v in values]


def apply_point(c, sweep: str, point: dict[str, Any], scale: str) -> None:
    """Writes the point's values into the benchmark config `c` (in place)."""
    for key, value in point.items():
        if key == "isl":
            c.workload.isl = value
        elif key == "max_num_tokens":
            c.max_num_tokens = value
        elif key == "isl_std":
            c.workload.isl, c.workload.isl_std, c.workload.input_ratio = STD_ISL[scale], float(value), 1.0
        elif key == "group_size":
            c.num_ranks = value
            c.dep.num_ranks = max(SWEEP_VALUES["group_size"][scale])  # DWDP-N against the same DEP group
        elif key == "input_ratio":
            c.workload.input_ratio = value
        elif key == "contention_mitigation":  # the copy engine cuts bytes (the paper's 2 MiB), device_put counts
            if c.dwdp.transport == "copy_engine":
                c.dwdp.slice_bytes = MITIGATION_SLICE_BYTES if value else 0
            else:
                c.dwdp.slices = MITIGATION_SLICES[scale] if value else 1
        elif key == "transport":  # the copy engine's own knobs do not apply to device_put
            c.dwdp.transport = value
            if value != "copy_engine":
                c.dwdp.timeline, c.dwdp.slice_bytes = False, 0
        elif key in ("merge_experts", "prefetch"):
            setattr(c.dwdp, key, value)
        elif key == "dep_balance":
            c.dep.balance = value
        elif key == "dwdp_packing":
            c.dwdp.packing = value
        elif key == "pull_issue":
            c.dwdp.pull_issue = value
        else:
            raise ValueError(f"sweep {sweep!r} has an unknown point key {key!r}")


def point_name(sweep: str, point: dict[str, Any]) -> str:
    return sweep + "__" + "_".join(f"{k}-{v}" for k, v in point.items())


# Fields that say where a point is written, not what it computes; the key itself is stored in the config.
_UNKEYED = ("results_root", "point_key")


@dataclasses.dataclass(frozen=True)
class PointResult:
    name: str
    path: Path
    reused: bool
    note: str  # why it ran; for a reused point, the other source hash that made it ("" when the same)
    doc: dict[str, Any] | None  # its results document; None when its run failed before writing one
    error: str = ""  # the failure its run raised

    @property
    def passed(self) -> bool | None:
        return verdict(self.doc) if self.doc is not None else False


def verdict(doc: dict[str, Any]) -> bool | None:
    """False when a strategy failed or failed verification, True when all verified, None when none was verified."""
    if doc.get("failures"):
        return False
    checks = [v["passed"] for v in doc.get("verification", {}).values()]
    return all(checks) if checks else None


def keyed_config(c) -> dict[str, Any]:
    config = results.to_jsonable(c)
    return {k: v for k, v in config.items() if k not in _UNKEYED}


def devices() -> dict[str, str]:
    """What a point's numbers depend on beyond its config: the same config on another device kind measures that."""
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind}


def point_key(config: dict[str, Any], on: dict[str, str]) -> str:
    canonical = json.dumps({"config": config, "devices": on}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_diff(stored: dict[str, Any], fresh: dict[str, Any], most: int = 3) -> str:
    """The first `most` fields that differ, as "workload.isl 96 -> 50"."""
    old, new = _flat(stored), _flat(fresh)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "unset") != new.get(k, "unset"))
    parts = [f"{k} {old.get(k, 'unset')} -> {new.get(k, 'unset')}" for k in changed[:most]]
    return ", ".join(parts) + (f" and {len(changed) - most} more" if len(changed) > most else "")


def read_doc(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rerun_reason(doc: dict[str, Any] | None, config: dict[str, Any], key: str, on: dict[str, str]) -> str:
    """Why a point must run, given its stored document; "" when the document can stand for it."""
    if doc is None:
        return "no readable stored result"
    stored = doc.get("config", {})
    if "point_key" not in stored:
        return "stored without a config key"
    if stored["point_key"] != key:
        env = doc.get("environment", {})
        ran_on = {k: env.get(k) for k in on}
        what = config_diff({k: v for k, v in stored.items() if k not in _UNKEYED}, config)
        if ran_on != on:
            what = ", ".join(filter(None, [what, f"device {ran_on['device_kind']} -> {on['device_kind']}"]))
        return f"stored with another config ({what or 'key ' + stored['point_key']})"
    if verdict(doc) is False:
        return "stored run failed verification"
    return ""


def run_points(base, sweep: str, scale: str, results_root: str | Path = "results", run_point: Callable | None = None,
               rerun_on_source_change: bool = False, log: Callable[[str], None] = print) -> list[PointResult]:
    """Every point of the sweep, reused from results/ablations where its key matches and it did not fail, else run
    by `run_point` (default: bench.run, looked up at the call so that a stand-in for it reaches the command line).

    The source hash is recorded in each document but is not part of the key: most edits do not change what a point
    measures, and a GPU sweep is hours; `rerun_on_source_change` makes a changed source hash a reason to run."""
    run_point = run_point or bench.run
    on, source = devices(), results.source_hash()
    out, todo = [], points(sweep, scale)
    for i, point in enumerate(todo, 1):
        c = point_config(base, sweep, point, scale, results_root)
        config = keyed_config(c)
        c.point_key = key = point_key(config, on)
        path = Path(results_root) / c.experiment / f"{c.run}.json"
        doc = read_doc(path)
        made_by = (doc or {}).get("environment", {}).get("source_hash", source)
        other_source = f"made by source {made_by}, now {source}" if made_by != source else ""
        reason = rerun_reason(doc, config, key, on) or (other_source if rerun_on_source_change else "")
        if reason:
            log(f"[{i}/{len(todo)}] {c.run}: running: {reason}")
            out.append(run_one(c, path, key, reason, run_point))
        else:
            log(f"[{i}/{len(todo)}] {c.run}: reused {path}" + (f" ({other_source})" if other_source else ""))
            out.append(PointResult(c.run, path, True, other_source, doc))
    return out


def point_config(base, sweep: str, point: dict[str, Any], scale: str, results_root: str | Path):
    c = base.copy_and_resolve_references()
    c.variants = ""  # a sweep's points are its workloads; a preset's variants would serve again at each point
    apply_point(c, sweep, point, scale)
    c.experiment, c.run, c.results_root = "ablations", point_name(sweep, point), str(results_root)
    c.sweep, c.point = sweep, point
    return c


def run_one(c, path: Path, key: str, reason: str, run_point: Callable) -> PointResult:
    """Runs a point; a strategy's failure (bench.run raises RuntimeError after writing the others' results) is kept
    as a failed point so that the sweep goes on."""
    error = ""
    try:
        run_point(c)
    except RuntimeError as e:
        error = f"{type(e).__name__}: {e}"[:2000]
    doc = read_doc(path)
    if doc is not None and doc.get("config", {}).get("point_key") != key:  # a run that failed before writing
        doc = None
    return PointResult(c.run, path, False, reason, doc, error)


def run_sweep(base, sweep: str, scale: str, results_root: str | Path = "results",
              run_point: Callable | None = None) -> list[Path]:
    """run_points without its log; returns the points' results paths."""
    return [r.path for r in run_points(base, sweep, scale, results_root, run_point, log=lambda line: None)]


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def summary_table(outcomes: list[PointResult]) -> str:
    """Each point's headline numbers: TPS/GPU per strategy, the DWDP/DEP ratios, verification, ran or reused."""
    width = max([len("point")] + [len(r.name) for r in outcomes]) + 2
    rows = [f"{'point':<{width}}{'':>7}{'DWDP TPS/GPU':>14}{'DEP TPS/GPU':>13}{'DWDP/DEP TPS':>14}"
            f"{'DEP/DWDP TTFT':>15}{'verified':>10}"]
    kinds = set()
    for r in outcomes:
        m = (r.doc or {}).get("metrics", {})
        ratio = m.get("ratio", {})
        passed = {True: "yes", False: "FAILED", None: "-"}[r.passed]
        rows.append(f"{r.name:<{width}}{'reused' if r.reused else 'ran':>7}"
                    f"{_number(m.get('dwdp', {}).get('tps_per_gpu'), '.1f'):>14}"
                    f"{_number(m.get('dep', {}).get('tps_per_gpu'), '.1f'):>13}"
                    f"{_number(ratio.get('tps_per_gpu_dwdp_over_dep'), '.3f'):>14}"
                    f"{_number(ratio.get('ttft_p50_dep_over_dwdp'), '.3f'):>15}{passed:>10}")
        if r.error:
            rows.append(f"  {r.error}")
        env = (r.doc or {}).get("environment", {})
        if env:
            kinds.add((env.get("platform"), env.get("device_kind")))
    rows.append("DEP/DWDP TTFT: the ratio of TTFT p50 (> 1: DWDP's first tokens come sooner).")
    if kinds:
        rows.append("Measured on " + ", ".join(sorted(str(kind) for _, kind in kinds)) + ".")
    if any(platform == "cpu" for platform, _ in kinds):
        rows.append("CPU timings are a functional check of the sweep, not a speed claim.")
    return "\n".join(rows)
