"""Ablation sweeps (paper Tables 3 and 4) as figures and as one markdown table, beside the paper's numbers.

Reads results/ablations/*.json, one file per sweep point, each with config.sweep (the sweep name), config.point (the
swept values, e.g. {"isl": 8192}) and metrics.{dwdp,dep}.{tps_per_gpu, ttft_p50_s}. Writes ablation_<sweep>.png/pdf
(TPS/GPU speedup DWDP/DEP and TTFT p50 speedup DEP/DWDP, ours beside the paper's) and ablations.md.
The paper's numbers are on GB200 x4 with NVFP4 experts, so they are a shape to compare against, not a target value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from experiments.figures.common import FIGURES_ROOT, cli, load, plt, save


# (sweep, point, TTFT speedup, TPS/GPU speedup) from dwdp_reference.md 3.3. A paper point matches a run when its
# items are a subset of the run's config.point. Table 3 is without contention mitigation; Table 4's "contention"
# rows give TPS/GPU only (merge elimination alone = mitigation off, full DWDP = on).
PAPER = (
    ("isl", {"isl": 1024}, 1.27, 1.11),
    ("isl", {"isl": 8192}, 1.16, 1.10),
    ("isl", {"isl": 16384}, 1.12, 1.09),
    ("isl", {"isl": 32768}, 1.11, 1.09),
    ("mnt", {"max_num_tokens": 16384}, 1.07, 1.01),
    ("mnt", {"max_num_tokens": 32768}, 1.16, 1.10),
    ("isl_std", {"isl_std": 0}, 1.12, 1.09),
    ("isl_std", {"isl_std": 1024}, 1.11, 1.08),
    ("isl_std", {"isl_std": 2048}, 1.13, 1.11),
    ("isl_std", {"isl_std": 4096}, 1.18, 1.15),
    ("group_size", {"group_size": 3}, 0.86, 1.093),
    ("group_size", {"group_size": 4}, 1.15, 1.091),
    ("contention", {"input_ratio": 0.5, "max_num_tokens": 16384, "contention_mitigation": False}, None, 0.995),
    ("contention", {"input_ratio": 0.5, "max_num_tokens": 16384, "contention_mitigation": True}, None, 1.081),
    ("contention", {"input_ratio": 0.5, "max_num_tokens": 32768, "contention_mitigation": False}, None, 1.140),
    ("contention", {"input_ratio": 0.5, "max_num_tokens": 32768, "contention_mitigation": True}, None, 1.139),
    ("contention", {"input_ratio": 0.8, "max_num_tokens": 16384, "contention_mitigation": False}, None, 1.039),
    ("contention", {"input_ratio": 0.8, "max_num_tokens": 16384, "contention_mitigation": True}, None, 1.053),
    ("contention", {"input_ratio": 0.8, "max_num_tokens": 32768, "contention_mitigation": False}, None, 1.098),
    ("contention", {"input_ratio": 0.8, "max_num_tokens": 32768, "contention_mitigation": True}, None, 1.109),
)
SHORT_NAMES = {"isl": "ISL", "isl_std": "ISL std", "max_num_tokens": "MNT", "input_ratio": "r", "group_size": "N",
               "contention_mitigation": "mitigation"}
METRICS = ("tps_per_gpu", "ttft_p50_s")
STRATEGIES = ("dwdp", "dep")


def paper_speedups(sweep: str, point: dict[str, Any]) -> tuple[float | None, float | None]:
    """(TTFT speedup, TPS/GPU speedup) the paper reports for this point, None where it reports none."""
    for paper_sweep, paper_point, ttft_x, tps_x in PAPER:
        if paper_sweep == sweep and all(k in point and point[k] == v for k, v in paper_point.items()):
            return ttft_x, tps_x
    return None, None


def _row(doc: dict) -> dict[str, Any] | None:
    """One sweep point's numbers, or None (with a warning naming the run and the field) when a field is missing."""
    run = doc.get("run", "?")
    config, metrics = doc.get("config") or {}, doc.get("metrics") or {}
    if not isinstance(config.get("sweep"), str) or not isinstance(config.get("point"), dict):
        logging.warning("ablations run %s lacks config.sweep or config.point: skipping", run)
        return None
    values = {}
    for strategy in STRATEGIES:
        for name in METRICS:
            value = (metrics.get(strategy) or {}).get(name)
            if not isinstance(value, (int, float)) or not value > 0:
                logging.warning("ablations run %s lacks a positive metrics.%s.%s: skipping", run, strategy, name)
                return None
            values[f"{strategy}_{name}"] = float(value)
    ttft_paper, tps_paper = paper_speedups(config["sweep"], config["point"])
    return {"run": run, "sweep": config["sweep"], "point": config["point"], **values,
            "tps_speedup": values["dwdp_tps_per_gpu"] / values["dep_tps_per_gpu"],
            "ttft_speedup": values["dep_ttft_p50_s"] / values["dwdp_ttft_p50_s"],
            "paper_tps_speedup": tps_paper, "paper_ttft_speedup": ttft_paper,
            "device": (doc.get("environment") or {}).get("device_kind", "unknown device")}


def _point_key(point: dict[str, Any]) -> tuple:
    """Sort order of points: numerically by each swept value (bools as 0/1), then by text."""
    return tuple((k, float(v) if isinstance(v, (int, float)) else math.inf, str(v)) for k, v in sorted(point.items()))


def _point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(point.items()))


def _tick_label(point: dict[str, Any]) -> str:
    """Short names, one swept value per line, so multi-knob points (Table 4) stay readable on the axis."""
    return "\n".join(f"{SHORT_NAMES.get(k, k)}={v}" for k, v in sorted(point.items()))


def _by_sweep(docs: list[dict]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by sweep and sorted by point; of several runs of one point the last by run name wins (warned)."""
    sweeps: dict[str, dict[str, dict[str, Any]]] = {}
    for row in filter(None, map(_row, docs)):
        points = sweeps.setdefault(row["sweep"], {})
        label = _point_label(row["point"])
        if label in points:
            logging.warning("sweep %s point %s has runs %s and %s: using %s", row["sweep"], label,
                            points[label]["run"], row["run"], row["run"])
        points[label] = row
    return {sweep: sorted(points.values(), key=lambda r: _point_key(r["point"])) for sweep, points in sweeps.items()}


def _speedup_panel(ax, rows: list[dict[str, Any]], ours: str, paper: str, title: str) -> None:
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[ours] for r in rows], 0.4, label="this run", color="tab:blue")
    paper_x = [i for i, r in enumerate(rows) if r[paper] is not None]
    if paper_x:
        ax.bar(np.asarray(paper_x) + 0.2, [rows[i][paper] for i in paper_x], 0.4, label="paper (GB200 x4)",
               color="tab:gray")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [_tick_label(r["point"]) for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    tallest = max([r[ours] for r in rows] + [rows[i][paper] for i in paper_x] + [1.0])
    ax.set_ylim(0, 1.25 * tallest)  # headroom so the legend sits above the bars
    ax.legend(fontsize=8, loc="upper center", ncols=2)


def _figure(sweep: str, rows: list[dict[str, Any]]) -> "plt.Figure":
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    _speedup_panel(ax_tps, rows, "tps_speedup", "paper_tps_speedup", "TPS/GPU speedup (DWDP / DEP)")
    _speedup_panel(ax_ttft, rows, "ttft_speedup", "paper_ttft_speedup", "TTFT p50 speedup (DEP / DWDP)")
    devices = ", ".join(sorted({r["device"] for r in rows}))
    fig.suptitle(f"ablation: {sweep} ({devices})", fontsize=10)
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """Tables 3/4 layout: one section per sweep, ours beside the paper's speedups."""
    lines = ["# Ablations: DWDP vs DEP (paper Tables 3 and 4)", "",
             "Speedups: TPS/GPU = DWDP/DEP, TTFT p50 = DEP/DWDP (> 1 favours DWDP). Paper numbers: GB200 x4.", ""]
    for sweep, rows in sorted(sweeps.items()):
        lines += [f"## {sweep}", "",
                  "| point | device | DWDP TPS/GPU | DEP TPS/GPU | TPS/GPU speedup | paper | DWDP TTFT p50 (s) "
                  "| DEP TTFT p50 (s) | TTFT speedup | paper | run |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {_point_label(r['point'])} | {r['device']} | {r['dwdp_tps_per_gpu']:.4g} "
                         f"| {r['dep_tps_per_gpu']:.4g} | {r['tps_speedup']:.3f} "
                         f"| {_fmt(r['paper_tps_speedup'], '.3f')} | {r['dwdp_ttft_p50_s']:.4g} "
                         f"| {r['dep_ttft_p50_s']:.4g} | {r['ttft_speedup']:.3f} "
                         f"| {_fmt(r['paper_ttft_speedup'], '.2f')} | {r['run']} |")
        lines.append("")
    return "\n".join(lines)


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """ablation_<sweep>.png/pdf per sweep and ablations.md; [] (with a warning) when there are no usable results."""
    sweeps = _by_sweep(load("ablations", results_root))
    if not sweeps:
        return []
    written = []
    for sweep, rows in sorted(sweeps.items()):
        written += save(_figure(sweep, rows), f"ablation_{sweep}", figures_root)
    table = Path(figures_root or FIGURES_ROOT) / "ablations.md"
    table.write_text(markdown(sweeps))
    return [*written, table]


if __name__ == "__main__":
    cli(main)
