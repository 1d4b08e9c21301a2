"""DEP synchronization overhead against the CV of per-rank tokens (paper Fig. 1): simulated, measured, and the paper.

Reads results/sim_sync_cv/*.json (python -m experiments.simulate --study=sync_cv): the simulated steps as a scatter,
their 5% bins and the local-linear trend. Measured points come from results/context_bench/*.json when present:
metrics.dep.{sync_overhead, rank_cv_mean} (or top-level metrics.{sync_overhead, rank_cv}), one colour per device
kind (a CPU run of the tiny model is not a GB200 measurement); runs without them are skipped. The paper's reading
(about 12% at CV 20%, ISL 8K, r 0.8) is marked. Writes sync_overhead_<run>.png/pdf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.figures.common import cli, load, plt, save

PAPER_POINT = (0.20, 0.12)
MAX_SCATTER = 4000


def measured_points(results_root: str | Path | None) -> list[tuple[float, float, str]]:
    """(CV, overhead, device kind) of every context_bench run that reports both."""
    points = []
    for doc in load("context_bench", results_root):
        m = doc.get("metrics") or {}
        dep = m.get("dep") if isinstance(m.get("dep"), dict) else {}
        overhead = dep.get("sync_overhead", m.get("sync_overhead"))
        cv = dep.get("rank_cv_mean", m.get("rank_cv"))
        if isinstance(overhead, (int, float)) and isinstance(cv, (int, float)):
            points.append((float(cv), float(overhead), str(doc.get("environment", {}).get("device_kind", "unknown"))))
    return points


def _figure(doc: dict, measured: list[tuple[float, float, str]]) -> "plt.Figure":
    raw, m = doc["raw"]["points"], doc["metrics"]
    cv, overhead = np.asarray(raw["cv"]), np.asarray(raw["overhead"])
    keep = np.random.default_rng(0).permutation(len(cv))[:MAX_SCATTER]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(100 * cv[keep], 100 * overhead[keep], s=4, alpha=0.25, color="tab:blue", label="simulated steps")
    ax.plot([100 * b["cv_center"] for b in m["bins"]], [100 * b["overhead"] for b in m["bins"]], "s",
            color="tab:blue", markeredgecolor="black", label="simulated, 5% bins")
    curve_cv, curve = np.asarray(m["curve"]["cv"], float), np.asarray(m["curve"]["overhead"], float)
    ok = np.isfinite(curve)
    ax.plot(100 * curve_cv[ok], 100 * curve[ok], color="tab:orange", label="simulated, local-linear trend")
    for device, color in zip(sorted({p[2] for p in measured}), ("tab:red", "tab:green", "tab:purple", "tab:brown")):
        mine = [p for p in measured if p[2] == device]
        ax.scatter([100 * p[0] for p in mine], [100 * p[1] for p in mine], marker="^", s=60, color=color,
                   edgecolor="black", zorder=5, label=f"measured, context_bench on {device}")
    ax.scatter([100 * PAPER_POINT[0]], [100 * PAPER_POINT[1]], marker="*", s=160, color="black", zorder=6,
               label="paper Fig. 1 (~12% at CV 20%)")
    cfg = doc["config"]
    ax.set_title(f"DEP{cfg['group_size']} on {cfg['hardware']['name']}, ISL {cfg['isl']}, r {cfg['input_ratio']}: "
                 f"{100 * m['overhead_at_target']:.1f}% at CV {100 * m['cv_target']:.0f}%", fontsize=9)
    ax.set_xlabel("CV of per-rank tokens in a step (%)")
    ax.set_ylabel("synchronization overhead (%)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return fig


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure per sim_sync_cv run; [] (with a warning) when there is none."""
    docs = load("sim_sync_cv", results_root)
    measured = measured_points(results_root) if docs else []
    written = []
    for doc in docs:
        written += save(_figure(doc, measured), f"sync_overhead_{doc['run']}", figures_root)
    return written


if __name__ == "__main__":
    cli(main)
