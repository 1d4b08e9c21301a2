"""Named ablation sweeps mirroring the paper's Tables 3 and 4, plus the engine ablations (merge, prefetch, transport).

A sweep is a list of points; a point is a dict of swept values (the keys the ablation figure matches against the
paper) that maps onto config overrides. Each point runs the context benchmark once and writes
results/ablations/<sweep>__<point>.json; a point whose file exists is skipped, so a sweep is resumable.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

from dwdp_jax import bench

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
MITIGATION_SLICE_BYTES = 2 << 20


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


def run_sweep(base, sweep: str, scale: str, results_root: str | Path = "results",
              run_point: Callable = bench.run) -> list[Path]:
    """Runs every point not yet in results/ablations; returns the points' results paths."""
    paths = []
    for point in points(sweep, scale):
        name = point_name(sweep, point)
        path = Path(results_root) / "ablations" / f"{name}.json"
        paths.append(path)
        if path.exists():
            continue
        c = base.copy_and_resolve_references()
        c.variants = ""  # a sweep's points are its workloads; a preset's variants would serve again at each point
        apply_point(c, sweep, point, scale)
        c.experiment, c.run, c.results_root = "ablations", name, str(results_root)
        c.sweep, c.point = sweep, point
        run_point(c)
    return paths
