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
from experiments.figures.common import cli, is_cpu, load, plt, save, skip

TITLE = "paper Table 2, copy-engine contention Pr[C = c] (results/sim_contention, GPU runs in results/context_bench)"
SIMULATED = ("none", "fifo")  # disciplines whose level frequencies are meaningful (round_robin: N - 1 by design)
SHOWN_PERCENT = 0.1  # levels past the paper's where every series is below this are left off the axis
COLORS = {"model": "tab:blue", "simulated, none": "tab:orange", "simulated, fifo": "tab:green",
          "measured": "tab:red"}
LEGEND_IN = 0.45  # inches above the panels for the shared legend


def _caption(measured: dict[int, list]) -> str:
    gpu = (f"measured = copy-engine pull spans of GPU context_bench runs (N = "
           f"{', '.join(map(str, sorted(measured)))}), mean over runs with min-max whiskers. " if measured else "")
    return ("Bars: model = the paper's binomial model (section 4.3), exact; simulated, none = the simulator's "
            "asynchronous serial pulls without feedback (the model's premise; should match it); simulated, fifo = a "
            "source serves its pulls first come first served, so a contended pull lasts longer and contention feeds "
            f"back into the levels seen; {gpu}Crosses: the paper's printed Table 2.")


def measured_percent(results_root: str | Path | None = None) -> dict[int, list[tuple[str, list[float]]]]:
    """{group size: [(context_bench run, Pr[C = c] in percent for c = 1 .. N - 1)]} of the GPU runs that measured
    their pulls' contention; the other runs are skipped with a reason."""
    out: dict[int, list[tuple[str, list[float]]]] = {}
    for doc in read_results("context_bench", results_root):
        dwdp = (doc.get("metrics") or {}).get("dwdp") or {}
        measured = (dwdp.get("pull_contention") or {}).get("measured")
        if not measured:
            skip("context_bench", doc, "no measured pull contention (metrics.dwdp.pull_contention, recorded by "
                                       "config.dwdp.timeline on a GPU)")
        elif is_cpu(doc):
            skip("context_bench", doc, "a CPU run: host copies, not copy-engine contention")
        else:
            n = doc["placement"]["num_ranks"]
            out.setdefault(n, []).append((doc["run"], [100 * measured.get(str(c), 0.0) for c in range(1, n)]))
    return out


def _levels_shown(row: dict, series: list[tuple[str, np.ndarray]]) -> int:
    """The highest level with a paper value or any series at SHOWN_PERCENT or more: the rest is a flat zero tail."""
    visible = [c for _, values in series for c, v in enumerate(values, start=1) if v >= SHOWN_PERCENT]
    return max([len(row.get("paper", []))] + visible + [1])


def _panel(ax, n: str, row: dict, measured: list[tuple[str, list[float]]]) -> None:
    series = [("model", "model", np.asarray(row["model_percent"]))]
    series += [(f"simulated, {d}", f"simulated, {d}", np.asarray(row[d]["empirical_percent"])) for d in SIMULATED
               if "empirical_percent" in row.get(d, {})]
    runs = np.asarray([values for _, values in measured])
    if len(runs):
        series.append(("measured", f"measured on GPUs ({len(runs)} runs, min-max)", runs.mean(axis=0)))
    top = _levels_shown(row, [(key, values) for key, _, values in series])
    levels = np.arange(1, top + 1)
    width = 0.8 / len(series)
    for i, (key, label, values) in enumerate(series):
        whiskers = None
        if key == "measured":
            whiskers = [values[:top] - runs.min(axis=0)[:top], runs.max(axis=0)[:top] - values[:top]]
        ax.bar(levels + (i - (len(series) - 1) / 2) * width, values[:top], width, label=label, color=COLORS[key],
               yerr=whiskers, capsize=2, error_kw={"elinewidth": 0.8})
    if "paper" in row:
        ax.scatter([p["level"] for p in row["paper"]], [float(p["paper_percent"]) for p in row["paper"]],
                   marker="x", s=40, color="black", zorder=5, label="paper Table 2")
    ax.set_xticks(levels)
    ax.set_title(f"DWDP{n}" + (f" (levels {top + 1}-{len(row['model_percent'])} below {SHOWN_PERCENT}%)"
                               if top < len(row["model_percent"]) else ""), fontsize=9)
    ax.set_xlabel("contention level C")
    ax.set_ylabel("Pr[C = c] (%)")


def _figure(doc: dict, measured: dict[int, list]) -> "plt.Figure":
    groups = doc["metrics"]["per_group"]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False)
    for ax, (n, row) in zip(axes.flat, groups.items()):
        _panel(ax, n, row, measured.get(int(n), []))
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    # above the panels, outside every axes: it covers no bar
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncols=min(5, len(legend)), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
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
                        markdown=_markdown(doc, measured), caption=_caption(measured), header_in=LEGEND_IN)
    return written


if __name__ == "__main__":
    cli(main)
