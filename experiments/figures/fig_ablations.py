"""Ablation sweeps (paper Tables 3 and 4) as figures and as one markdown table, beside the paper's numbers.

Reads results/ablations/*.json, one file per sweep point, each with config.sweep (the sweep name), config.point (the
swept values, e.g. {"isl": 8192}) and metrics.{dwdp,dep}.{tps_per_gpu, ttft_p50_s}. Writes ablation_<sweep>.png/pdf
(TPS/GPU speedup DWDP/DEP and TTFT p50 speedup DEP/DWDP, ours beside the paper's) and ablations.md.

Every sweep of the paper's Tables 3-4 gets its figure even with nothing measured: a reader of a fresh clone expects the
paper's ablations, so they are drawn alone with a "no measured points" note naming the command that measures them
(the sweeps run the real model on GPUs, far too slow for the figures command). Points are skipped, with the reason,
when they ran on CPU (a tiny model's timings check the machinery, they are not speed data), failed verification, or
lack a metric. The paper's numbers are on GB200 x4 with NVFP4 experts: a shape to compare against, not a target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dwdp_jax.results import RESULTS_ROOT, read_results
from experiments.figures.common import FIGURES_ROOT, cli, device_kind, is_cpu, note, plt, save, skip

TITLE = "paper Tables 3-4, ablations (results/ablations; measured by python -m experiments.ablations on GPUs)"
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
# What each paper sweep holds fixed (dwdp_reference.md 3.3).
SWEEP_TITLES = {"isl": "Table 3a, ISL (MNT 32768)", "mnt": "Table 3b, MNT (ISL 8192)",
                "isl_std": "Table 3c, ISL std (ISL 16384)", "group_size": "Table 3d, group size (ISL 16384, MNT 32768)",
                "contention": "Table 4, contention mitigation (ISL 8K, 1 MB slices; TPS/GPU only)"}
CAPTION = ("Paper (hatched): GB200 x4, NVFP4 experts, TRT-LLM, Artificial Analysis dataset; Table 3 without contention "
           "mitigation. Ours: GPU runs of python -m experiments.ablations at the paper's points (R1 width); CPU runs "
           "are functional checks and are not drawn. Compare the shape across points, not the values.")
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


def _unusable(doc: dict) -> str | None:
    """Why an ablation point cannot be drawn, or None."""
    config, metrics = doc.get("config") or {}, doc.get("metrics") or {}
    if not isinstance(config.get("sweep"), str) or not isinstance(config.get("point"), dict):
        return "lacks config.sweep or config.point"
    if is_cpu(doc):
        return "a CPU run: a functional check, not speed data"
    if doc.get("failures") or any(v.get("passed") is False for v in (doc.get("verification") or {}).values()):
        return "a strategy failed or failed verification"
    for strategy in STRATEGIES:
        for name in METRICS:
            value = (metrics.get(strategy) or {}).get(name)
            if not isinstance(value, (int, float)) or not value > 0:
                return f"lacks a positive metrics.{strategy}.{name}"
    return None


def _row(doc: dict) -> dict[str, Any]:
    """One measured sweep point's numbers, beside the paper's for the point."""
    config, metrics = doc["config"], doc["metrics"]
    values = {f"{s}_{name}": float(metrics[s][name]) for s in STRATEGIES for name in METRICS}
    ttft_paper, tps_paper = paper_speedups(config["sweep"], config["point"])
    return {"run": doc.get("run", "?"), "sweep": config["sweep"], "point": config["point"], **values,
            "tps_speedup": values["dwdp_tps_per_gpu"] / values["dep_tps_per_gpu"],
            "ttft_speedup": values["dep_ttft_p50_s"] / values["dwdp_ttft_p50_s"],
            "paper_tps_speedup": tps_paper, "paper_ttft_speedup": ttft_paper, "device": device_kind(doc)}


def _paper_row(sweep: str, point: dict[str, Any], ttft_x: float | None, tps_x: float | None) -> dict[str, Any]:
    """A paper point nobody measured: the paper's speedups, no numbers of ours."""
    return {"run": None, "sweep": sweep, "point": point, "tps_speedup": None, "ttft_speedup": None,
            "paper_tps_speedup": tps_x, "paper_ttft_speedup": ttft_x, "device": None}


def _point_key(point: dict[str, Any]) -> tuple:
    """Sort order of points: by each swept value in the point's own key order (the sweep's: Table 4 pairs mitigation
    off and on under each setting), numerically (bools as 0/1), then by text."""
    return tuple((k, float(v) if isinstance(v, (int, float)) else math.inf, str(v)) for k, v in point.items())


def _point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _tick_label(point: dict[str, Any]) -> str:
    """Short names, one swept value per line, so multi-knob points (Table 4) stay readable on the axis."""
    return "\n".join(f"{SHORT_NAMES.get(k, k)}={v}" for k, v in point.items())


def _measured(docs: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """{sweep: {point label: row}} of the usable points; of several runs of one point the last by run name wins."""
    sweeps: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        reason = _unusable(doc)
        if reason:
            skip("ablations", doc, reason)
            continue
        row = _row(doc)
        points = sweeps.setdefault(row["sweep"], {})
        label = _point_label(row["point"])
        if label in points:
            note(f"skipped ablations run {points[label]['run']}: point {label} of sweep {row['sweep']} ran again as "
                 f"{row['run']}, which is drawn")
        points[label] = row
    return sweeps


def _by_sweep(docs: list[dict]) -> dict[str, list[dict[str, Any]]]:
    """Every paper sweep and every measured one, each point once (a measured point stands for the paper point it
    matches), sorted by point."""
    sweeps = _measured(docs)
    for sweep, point, ttft_x, tps_x in PAPER:
        rows = sweeps.setdefault(sweep, {})
        if not any(all(r["point"].get(k) == v for k, v in point.items()) for r in rows.values()):
            rows[_point_label(point)] = _paper_row(sweep, point, ttft_x, tps_x)
    return {sweep: sorted(points.values(), key=lambda r: _point_key(r["point"])) for sweep, points in sweeps.items()}


def _printed(value: float) -> str:
    """A paper value as the paper prints it: two places, three where it gives three (1.093 against 1.091)."""
    return f"{value:.2f}" if round(value, 2) == value else f"{value:.3f}"


PANELS = (("tps_speedup", "paper_tps_speedup", "TPS/GPU speedup (DWDP / DEP)"),
          ("ttft_speedup", "paper_ttft_speedup", "TTFT p50 speedup (DEP / DWDP)"))


def _speedup_panel(ax, rows: list[dict[str, Any]], ours: str, paper: str, title: str) -> None:
    x = np.arange(len(rows))
    for offset, key, label, fmt, style in ((-0.2, ours, "ours", "{:.3f}".format, {"color": "tab:blue"}),
                                           (0.2, paper, "paper (GB200 x4)", _printed,
                                            {"color": "tab:gray", "hatch": "//", "edgecolor": "white"})):
        at = [i for i, r in enumerate(rows) if r[key] is not None]
        if at:
            values = [rows[i][key] for i in at]
            bars = ax.bar(x[at] + offset, values, 0.4, label=label, **style)
            ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, [_tick_label(r["point"]) for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1.3 * max([r[k] for r in rows for k in (ours, paper) if r[k] is not None] + [1.0]))
    if all(r[ours] is None for r in rows):
        ax.text(0.5, 0.93, "no measured points", transform=ax.transAxes, ha="center", va="top", fontsize=9,
                color="tab:red")
    ax.legend(fontsize=8, loc="upper right")  # above the bars: the y limit leaves it room


def _figure(sweep: str, rows: list[dict[str, Any]]) -> "plt.Figure":
    """One panel per speedup that the paper reports or we measured (Table 4 has no TTFT)."""
    panels = [p for p in PANELS if any(r[k] is not None for r in rows for k in p[:2])]
    wide = len(rows) > 4  # many points: panels one above the other, each as wide as the figure
    shape = (len(panels), 1) if wide else (1, len(panels))
    fig, axes = plt.subplots(*shape, figsize=(max(9.0, 1.3 * len(rows)) if wide else 4.5 * len(panels) + 1,
                                              4.2 * len(panels) if wide else 4.8), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _speedup_panel(ax, rows, *panel)
    devices = sorted({r["device"] for r in rows if r["device"]})
    measured = (f"measured on {', '.join(devices)}" if devices else
                f"no measured points: python -m experiments.ablations --sweep={sweep} on GPUs measures them")
    fig.suptitle(f"ablation {sweep}: {SWEEP_TITLES.get(sweep, 'not in the paper')}\n{measured}", fontsize=10)
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    """Tables 3/4 layout: one section per sweep, ours beside the paper's speedups ('-': none)."""
    lines = ["# Ablations: DWDP vs DEP (paper Tables 3 and 4)", "",
             "Speedups: TPS/GPU = DWDP/DEP, TTFT p50 = DEP/DWDP (> 1 favours DWDP). Paper numbers: GB200 x4. "
             "Rows without a device: not measured here.", ""]
    for sweep, rows in sorted(sweeps.items()):
        lines += [f"## {sweep}: {SWEEP_TITLES.get(sweep, 'not in the paper')}", "",
                  "| point | device | DWDP TPS/GPU | DEP TPS/GPU | TPS/GPU speedup | paper | DWDP TTFT p50 (s) "
                  "| DEP TTFT p50 (s) | TTFT speedup | paper | run |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            ours = [_fmt(r.get(k), ".4g") for k in ("dwdp_tps_per_gpu", "dep_tps_per_gpu")]
            ttft = [_fmt(r.get(k), ".4g") for k in ("dwdp_ttft_p50_s", "dep_ttft_p50_s")]
            lines.append(f"| {_point_label(r['point'])} | {r['device'] or '-'} | {ours[0]} | {ours[1]} "
                         f"| {_fmt(r['tps_speedup'], '.3f')} | {_fmt(r['paper_tps_speedup'], '.3f')} "
                         f"| {ttft[0]} | {ttft[1]} | {_fmt(r['ttft_speedup'], '.3f')} "
                         f"| {_fmt(r['paper_ttft_speedup'], '.2f')} | {r['run'] or '-'} |")
        lines.append("")
    return "\n".join(lines + [CAPTION, ""])


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """ablation_<sweep>.png/pdf per sweep (every paper sweep, measured or not) and ablations.md."""
    docs = read_results("ablations", results_root)
    if not docs:
        note(f"no measured points in {Path(results_root or RESULTS_ROOT) / 'ablations'}: the paper's values alone")
    sweeps = _by_sweep(docs)
    written = []
    for sweep, rows in sorted(sweeps.items()):
        written += save(_figure(sweep, rows), f"ablation_{sweep}", figures_root, caption=CAPTION)
    table = Path(figures_root or FIGURES_ROOT) / "ablations.md"
    table.write_text(markdown(sweeps))
    return [*written, table]


if __name__ == "__main__":
    cli(main)
