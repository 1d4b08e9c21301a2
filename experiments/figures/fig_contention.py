"""Copy-engine contention probabilities (paper Table 2): the exact model, the paper's printed values and the simulator.

Reads results/sim_contention/*.json (python -m experiments.simulate --study=contention) and, where a GPU run recorded
it, the contention measured from copy-engine pull spans (results/context_bench, metrics.dwdp.pull_contention: the
benchmark with config.dwdp.timeline). Per run, contention_<run>.png/pdf with one panel per group size (Pr[C = c]
from the model, from simulated pulls under each discipline that has frequencies, measured on GPUs, and the paper's
printed values as markers) and contention_<run>.md, the table with all of them and the prefetch stretch per
discipline.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dwdp_jax.results import read_results
from experiments.figures.common import cli, load, plt, save

SIMULATED = ("none", "fifo")  # disciplines whose level frequencies are meaningful (round_robin: N - 1 by design)


def measured_percent(results_root: str | Path | None = None) -> dict[int, list[tuple[str, list[float]]]]:
    """{group size: [(context_bench run, Pr[C = c] in percent for c = 1 .. N - 1)]} of the GPU runs that measured
    their pulls' contention."""
    out: dict[int, list[tuple[str, list[float]]]] = {}
    for doc in read_results("context_bench", results_root):
        measured = doc.get("metrics", {}).get("dwdp", {}).get("pull_contention", {}).get("measured")
        if measured:
            n = doc["placement"]["num_ranks"]
            out.setdefault(n, []).append((doc["run"], [100 * measured.get(str(c), 0.0) for c in range(1, n)]))
    return out


def _figure(doc: dict, measured: dict[int, list]) -> "plt.Figure":
    groups = doc["metrics"]["per_group"]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (n, row) in zip(axes.flat, groups.items()):
        levels = np.arange(1, len(row["model_percent"]) + 1)
        series = [("model", row["model_percent"])] + [(f"simulated, {d}", row[d]["empirical_percent"])
                                                      for d in SIMULATED if "empirical_percent" in row.get(d, {})]
        series += [(f"measured, {run}", values) for run, values in measured.get(int(n), [])]
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            ax.bar(levels + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        if "paper" in row:
            ax.scatter([p["level"] for p in row["paper"]], [float(p["paper_percent"]) for p in row["paper"]],
                       marker="x", color="black", zorder=5, label="paper Table 2")
        ax.set_xticks(levels)
        ax.set_title(f"DWDP{n}", fontsize=9)
        ax.set_xlabel("contention level C")
        ax.set_ylabel("Pr[C = c] (%)")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return fig


def _markdown(doc: dict, measured: dict[int, list]) -> str:
    lines = [f"# Contention, {doc['run']}", "",
             "| N | C | paper % | model % | simulated none % | simulated fifo % | measured % (GPU run) |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    stretch = ["", "| N | E[C] model | stretch none | stretch fifo | stretch round_robin |",
               "|---:|---:|---:|---:|---:|"]
    for n, row in doc["metrics"]["per_group"].items():
        paper = {p["level"]: p["paper_percent"] for p in row.get("paper", [])}
        for c, model in enumerate(row["model_percent"], start=1):
            sim = [row.get(d, {}).get("empirical_percent") for d in SIMULATED]
            gpu = ", ".join(f"{values[c - 1]:.3g} ({run})" for run, values in measured.get(int(n), []))
            lines.append(f"| {n} | {c} | {paper.get(c, '')} | {model:.4g} | "
                         + " | ".join("" if s is None else f"{s[c - 1]:.3g}" for s in sim) + f" | {gpu} |")
        stretch.append(f"| {n} | {row['expected_slowdown_model']:.3f} | "
                       + " | ".join(f"{row[d]['prefetch_stretch']:.3f}" if d in row else ""
                                    for d in ("none", "fifo", "round_robin")) + " |")
    return "\n".join(lines + stretch + [""])


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure and one markdown table per sim_contention run; [] (with a warning) when there is none."""
    written, measured = [], measured_percent(results_root)
    for doc in load("sim_contention", results_root):
        written += save(_figure(doc, measured), f"contention_{doc['run']}", figures_root,
                        markdown=_markdown(doc, measured))
    return written


if __name__ == "__main__":
    cli(main)
