"""The planner: for a median-TTFT target, the context GPU count and DWDP group size that maximize output TPS/GPU.

Reads results/sim_planner/*.json (python -m experiments.simulate --study=planner). Per run, planner_<run>.png/pdf/md:
left, every simulated configuration (TTFT against TPS/GPU, by strategy and group size) with the targets and the
paper's median TTFTs for the band as vertical lines; middle, per target the best DWDP and DEP TPS/GPU, labelled with
their context GPUs and group size; right, best DWDP over best DEP per target beside the paper's one point for the band
(Tables 5-6: the paper chose its context GPU counts by hand and reports DWDP's TPS/GPU gain at a longer TTFT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.figures.common import cli, load, plt, save
from experiments.figures.fig_pareto import PAPER

COLORS = {"dep": "tab:blue", "dwdp": "tab:orange"}
TITLE = "planner: best TPS/GPU under a TTFT target (results/sim_planner), beside paper Tables 5-6"
CAPTION = ("The paper has no planner: its e2e points use hand-picked context GPU counts. Its point for this band "
           "(Tables 5-6) is drawn where it lies: DWDP's output TPS/GPU over DEP's at DWDP's median TTFT (DEP's own "
           "TTFT was shorter, dotted line). Ours: the simulator's best configuration per TTFT target, groups of N "
           "for DWDP, DEP in servers of 4.")


def _label(p: dict | None) -> str:
    return "none" if p is None else f"{p['ctx_gpus']} GPUs\nN={p['group_size']}"


def _ratio(choice: dict) -> float | None:
    dwdp, dep = choice["dwdp"], choice["dep"]
    return None if dwdp is None or dep is None else dwdp["output_tps_per_gpu"] / dep["output_tps_per_gpu"]


def _all_points(ax, doc: dict, paper) -> None:
    points, choices = doc["raw"]["points"], doc["metrics"]["choices"]
    for strategy, group in sorted({(p["strategy"], p["group_size"]) for p in points}):
        mine = [p for p in points if (p["strategy"], p["group_size"]) == (strategy, group)]
        ax.scatter([p["ttft_p50_s"] for p in mine], [p["output_tps_per_gpu"] for p in mine],
                   marker="o" if strategy == "dwdp" else "s", label=f"{strategy.upper()}{group}")
    for i, c in enumerate(choices):
        ax.axvline(c["ttft_target_s"], color="grey", linewidth=0.7, linestyle="--",
                   label="TTFT targets" if i == 0 else None)
    if paper is not None:
        for ms, strategy, color in ((paper.ttft_dep_ms, "DEP", "tab:blue"), (paper.ttft_dwdp_ms, "DWDP", "tab:orange")):
            ax.axvline(ms / 1e3, color=color, linewidth=1.2, linestyle=":",
                       label=f"paper median TTFT, {strategy} ({ms / 1e3:.2f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("median TTFT (s, queueing included)")
    ax.set_ylabel("output TPS/GPU")
    ax.set_title("every simulated configuration", fontsize=9)
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))  # below: the points fill the axes


def _best(ax, choices: list[dict]) -> None:
    x = np.arange(len(choices))
    for offset, strategy in ((-0.2, "dwdp"), (0.2, "dep")):
        picks = [c[strategy] for c in choices]
        values = [0.0 if p is None else p["output_tps_per_gpu"] for p in picks]
        ax.bar(x + offset, values, 0.4, label=strategy.upper(), color=COLORS[strategy])
        for xi, value, p in zip(x + offset, values, picks):
            ax.text(xi, value, _label(p), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [f"<= {c['ttft_target_s']:g} s" for c in choices], fontsize=8)
    ax.set_xlabel("median TTFT target")
    ax.set_ylabel("best output TPS/GPU")
    ax.set_title("best configuration per target", fontsize=9)
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])
    ax.legend(fontsize=8, loc="upper left", ncols=2)


def _gain(ax, choices: list[dict], paper) -> None:
    targets = [c["ttft_target_s"] for c in choices]
    ratios = [_ratio(c) for c in choices]
    ax.plot([t for t, r in zip(targets, ratios) if r is not None], [r for r in ratios if r is not None], "o-",
            color=COLORS["dwdp"], label="ours: best DWDP / best DEP per target")
    for t, r in zip(targets, ratios):
        if r is None:
            ax.annotate("no DEP\nconfig\nmeets it", (t, 1.0), fontsize=6, ha="center", va="bottom")
    if paper is not None:
        ax.scatter([paper.ttft_dwdp_ms / 1e3], [paper.tps_per_gpu_speedup], marker="*", s=200, color="black",
                   zorder=5, label=f"paper Table 5, {paper.tps_per_user} TPS/user: {paper.tps_per_gpu_speedup:.2f} "
                                   f"(T6 {paper.tps_per_gpu_speedup_t6:.2f})")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    xs = targets + ([paper.ttft_dwdp_ms / 1e3] if paper is not None else [])
    ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
    ax.set_xticks(xs, [f"{x:.3g}" for x in xs], fontsize=8)
    ax.minorticks_off()  # the log axis's own minor labels collide over a one-decade range
    ys = [r for r in ratios if r is not None] + [1.0] + ([paper.tps_per_gpu_speedup] if paper is not None else [])
    ax.set_ylim(min(ys) - 0.05, max(ys) + 0.1)
    ax.set_xlabel("median TTFT (s; ours: the target, paper: DWDP's measured)")
    ax.set_ylabel("output TPS/GPU, DWDP / DEP")
    ax.set_title("DWDP's gain", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))


def _figure(doc: dict) -> "plt.Figure":
    cfg, choices = doc["config"], doc["metrics"]["choices"]
    paper = PAPER.get(cfg["band"]["name"])
    fig, (ax_all, ax_best, ax_gain) = plt.subplots(1, 3, figsize=(16, 5.8))
    _all_points(ax_all, doc, paper)
    _best(ax_best, choices)
    _gain(ax_gain, choices, paper)
    gen = cfg["band"]["gen"]
    fig.suptitle(f"{cfg['hardware']['name']}, band {cfg['band']['name']} TPS/user: generation TP{gen['num_gpus']} "
                 f"batch {gen['max_batch']}", fontsize=10)
    return fig


def _markdown(doc: dict) -> str:
    cfg, paper = doc["config"], PAPER.get(doc["config"]["band"]["name"])

    def pick(p):
        return "none" if p is None else (f"{p['ctx_gpus']} GPUs (N={p['group_size']}), {p['output_tps_per_gpu']:.0f} "
                                         f"TPS/GPU, TTFT {p['ttft_p50_s']:.2f} s")

    lines = [f"# Planner, {doc['run']} (band {cfg['band']['name']})", "",
             "| TTFT target (s) | DWDP | DEP | DWDP / DEP TPS/GPU |", "|---:|---|---|---:|"]
    for c in doc["metrics"]["choices"]:
        r = _ratio(c)
        lines.append(f"| {c['ttft_target_s']:g} | {pick(c['dwdp'])} | {pick(c['dep'])} | "
                     f"{'-' if r is None else f'{r:.3f}'} |")
    if paper is not None:
        lines += ["", f"Paper Tables 5-6, {paper.tps_per_user} TPS/user: DWDP / DEP output TPS/GPU "
                      f"{paper.tps_per_gpu_speedup:.2f} (Table 6: {paper.tps_per_gpu_speedup_t6:.2f}), median TTFT "
                      f"DEP {paper.ttft_dep_ms:.0f} ms, DWDP {paper.ttft_dwdp_ms:.0f} ms."]
    return "\n".join(lines + ["", CAPTION, ""])


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure and one markdown table per sim_planner run; [] when there is none."""
    written = []
    for doc in load("sim_planner", results_root):
        written += save(_figure(doc), f"planner_{doc['run']}", figures_root, markdown=_markdown(doc), caption=CAPTION)
    return written


if __name__ == "__main__":
    cli(main)
