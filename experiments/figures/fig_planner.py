"""The planner: for a median-TTFT target, the context GPU count and DWDP group size that maximize output TPS/GPU.

Reads results/sim_planner/*.json (python -m experiments.simulate --study=planner). Per run, planner_<run>.png/pdf:
left, every simulated configuration (TTFT against TPS/GPU, by strategy and group size) with the targets as vertical
lines; right, per target the best DWDP and DEP TPS/GPU, labelled with their context GPUs and group size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.figures.common import cli, load, plt, save



def _label(p: dict | None) -> str:
    return "none" if p is None else f"{p['ctx_gpus']} GPUs\nN={p['group_size']}"


def _figure(doc: dict) -> "plt.Figure":
    points, choices = doc["raw"]["points"], doc["metrics"]["choices"]
    fig, (ax_all, ax_best) = plt.subplots(1, 2, figsize=(12, 4.6))
    keys = sorted({(p["strategy"], p["group_size"]) for p in points})
    for strategy, group in keys:
        mine = [p for p in points if (p["strategy"], p["group_size"]) == (strategy, group)]
        ax_all.scatter([p["ttft_p50_s"] for p in mine], [p["output_tps_per_gpu"] for p in mine],
                       marker="o" if strategy == "dwdp" else "s", label=f"{strategy.upper()}{group}")
    for c in choices:
        ax_all.axvline(c["ttft_target_s"], color="grey", linewidth=0.7, linestyle="--")
    ax_all.set_xscale("log")
    ax_all.set_xlabel("median TTFT (s, queueing included)")
    ax_all.set_ylabel("output TPS/GPU")
    ax_all.legend(fontsize=7)
    x = np.arange(len(choices))
    for offset, strategy in ((-0.2, "dwdp"), (0.2, "dep")):
        picks = [c[strategy] for c in choices]
        values = [0.0 if p is None else p["output_tps_per_gpu"] for p in picks]
        ax_best.bar(x + offset, values, 0.4, label=strategy.upper())
        for xi, value, p in zip(x + offset, values, picks):
            ax_best.text(xi, value, _label(p), ha="center", va="bottom", fontsize=6)
    ax_best.set_xticks(x, [f"TTFT <= {c['ttft_target_s']:g} s" for c in choices], fontsize=8)
    ax_best.set_ylabel("best output TPS/GPU")
    ax_best.margins(y=0.15)
    ax_best.legend(fontsize=8)
    cfg = doc["config"]
    gen = cfg["band"]["gen"]
    fig.suptitle(f"{cfg['hardware']['name']}, generation TP{gen['num_gpus']} batch {gen['max_batch']} "
                 f"(band {cfg['band']['name']})", fontsize=9)
    return fig


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure per sim_planner run; [] (with a warning) when there is none."""
    written = []
    for doc in load("sim_planner", results_root):
        written += save(_figure(doc), f"planner_{doc['run']}", figures_root)
    return written


if __name__ == "__main__":
    cli(main)
