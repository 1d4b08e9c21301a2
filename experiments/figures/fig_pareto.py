"""End-to-end disaggregated serving (paper Tables 5-6): output TPS/GPU against TPS/user, and TTFT, DEP vs DWDP.

Reads results/sim_pareto/*.json (python -m experiments.simulate --study=pareto). Per run, pareto_<run>.png/pdf: every
simulated point (labelled with its context GPU count) and each strategy's Pareto frontier; per band, the DWDP point
with the best TPS/GPU paired with the DEP point of the closest TPS/user (the paper's pairing), its TPS/GPU and TPS/user
speedups and median TTFTs beside the paper's Tables 5-6; pareto_<run>.md, the same as a table.
Our TPS/user is a roofline (no launch or host overhead), so it is higher than the paper's; compare the ratios.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from experiments.figures.common import cli, load, plt, save

TITLE = "paper Tables 5-6, end-to-end Pareto and TTFT (results/sim_pareto)"
COLORS = {"dep": "tab:blue", "dwdp": "tab:orange"}


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of paper Tables 5-6 (dwdp_reference.md 3.4): DWDP over the DEP point of the closest TPS/user."""

    tps_per_user: str  # the row's TPS/user as the paper prints it (its bands are the configs' bands, narrowed)
    tps_per_user_speedup: float
    tps_per_gpu_speedup: float  # Table 5
    tps_per_gpu_speedup_t6: float  # Table 6 (equal but for 60-70)
    ttft_dep_ms: float
    ttft_dwdp_ms: float


# By the simulated band name (the e2e configs' TPS/user bands, dwdp_reference.md 3.1).
PAPER = {"20-40": PaperRow("20-30", 1.15, 1.10, 1.10, 2538, 8314),
         "40-60": PaperRow("40-50", 1.16, 1.08, 1.08, 1919, 7012),
         "60-80": PaperRow("60-70", 1.00, 1.10, 1.12, 965, 1640),
         "80-100": PaperRow("80-90", 1.00, 1.06, 1.06, 1669, 2280),
         "160-180": PaperRow("170-180", 1.00, 0.97, 0.97, 494, 660)}
CAPTION = ("Paper: GB200 NVL72, TRT-LLM, SemiAnalysis 8K/1K, r 0.8 (Tables 5-6; TTFT is the median including "
           "queueing). Ours: the roofline simulator on the same configs (context GPUs per band as the paper's e2e "
           "configs); its decode has no launch or host overhead, so absolute TPS/user is higher than the paper's: "
           "compare speedups. Hatched bars: the paper.")


def _frontier(ax, doc: dict) -> None:
    points, frontier = doc["raw"]["points"], doc["metrics"]["frontier"]
    for strategy, color in COLORS.items():
        mine = [p for p in points if p["strategy"] == strategy]
        ax.scatter([p["tps_per_user_p50"] for p in mine], [p["output_tps_per_gpu"] for p in mine], color=color,
                   label=strategy.upper(), zorder=3)
        for p in mine:
            ax.annotate(f"{p['ctx_gpus']}", (p["tps_per_user_p50"], p["output_tps_per_gpu"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        line = frontier.get(strategy, [])
        ax.plot([p["tps_per_user_p50"] for p in line], [p["output_tps_per_gpu"] for p in line], color=color,
                linewidth=1, label=f"{strategy.upper()} frontier")
    ax.set_xscale("log")
    ax.set_xlabel("TPS/user (median, roofline decode)")
    ax.set_ylabel("output TPS/GPU (context + generation GPUs)")
    ax.set_title("simulated points (labels: context GPUs); the paper prints no absolute values", fontsize=9)
    ax.legend(fontsize=8)


def _paired_bars(ax, labels: list[str], series: list[tuple[str, list[float | None], str, bool]], fmt: str) -> None:
    """Grouped bars per band: (label, values, colour, paper?) per series; paper bars hatched; values written on."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (label, values, color, paper) in enumerate(series):
        xs = x + (i - (len(series) - 1) / 2) * width
        keep = [j for j, v in enumerate(values) if v is not None]
        bars = ax.bar(xs[keep], [values[j] for j in keep], width, label=label, color=color,
                      hatch="//" if paper else None, edgecolor="white" if paper else None, alpha=0.6 if paper else 1)
        ax.bar_label(bars, fmt=fmt, fontsize=6, padding=1)
    ax.set_xticks(x, labels, fontsize=8)
    ax.margins(y=0.15)


def _figure(doc: dict) -> "plt.Figure":
    table = doc["metrics"]["table"]
    paper = [PAPER.get(r["band"]) for r in table]
    labels = [f"{r['band']}\n(paper {p.tps_per_user})" if p else r["band"] for r, p in zip(table, paper)]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _frontier(axes[0, 0], doc)

    def of(field: str) -> list[float | None]:
        return [None if p is None else getattr(p, field) for p in paper]

    for ax, ours, field, what in ((axes[0, 1], "tps_per_gpu_speedup", "tps_per_gpu_speedup", "output TPS/GPU"),
                                  (axes[1, 0], "tps_per_user_speedup", "tps_per_user_speedup", "TPS/user")):
        _paired_bars(ax, labels, [("ours (simulated)", [r[ours] for r in table], "tab:orange", False),
                                  ("paper" + (" Table 5" if "gpu" in field else ""), of(field), "tab:gray", True)],
                     "%.2f")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"{what} speedup, DWDP / DEP")
        ax.set_title(f"{what} speedup per TPS/user band (> 1 favours DWDP)", fontsize=9)
        ax.set_ylim(0, 1.3 * ax.get_ylim()[1])  # headroom: the legend sits above the bars
        ax.legend(fontsize=8, loc="upper center", ncols=2)
    _paired_bars(axes[1, 1], labels, [("DEP, ours", [r["ttft_dep_ms"] for r in table], COLORS["dep"], False),
                                      ("DEP, paper", of("ttft_dep_ms"), COLORS["dep"], True),
                                      ("DWDP, ours", [r["ttft_dwdp_ms"] for r in table], COLORS["dwdp"], False),
                                      ("DWDP, paper", of("ttft_dwdp_ms"), COLORS["dwdp"], True)], "%.0f")
    axes[1, 1].set_yscale("log")
    axes[1, 1].set_ylabel("median TTFT (ms, queueing included)")
    axes[1, 1].set_title("median TTFT of the paired points (paper Table 6)", fontsize=9)
    axes[1, 1].legend(fontsize=7, ncols=2, loc="upper right")
    cfg = doc["config"]
    fig.suptitle(f"{cfg['hardware']['name']}, ISL {cfg['isl']} / OSL {cfg['osl']}, r {cfg['input_ratio']}: DWDP "
                 f"vs DEP end to end", fontsize=10)
    return fig


def _markdown(doc: dict) -> str:
    lines = [f"# End-to-end, {doc['run']} (paper Tables 5-6)", "",
             "| band | paper row | ctx GPUs DEP/DWDP | TPS/user x | paper | TPS/GPU x | paper T5 (T6) | TTFT DEP ms "
             "| paper | TTFT DWDP ms | paper |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["metrics"]["table"]:
        p = PAPER.get(r["band"])
        cells = ["-"] * 5 if p is None else [p.tps_per_user, f"{p.tps_per_user_speedup:.2f}",
                                             f"{p.tps_per_gpu_speedup:.2f} ({p.tps_per_gpu_speedup_t6:.2f})",
                                             f"{p.ttft_dep_ms:.0f}", f"{p.ttft_dwdp_ms:.0f}"]
        lines.append(f"| {r['band']} | {cells[0]} | {r['dep_ctx_gpus']}/{r['dwdp_ctx_gpus']} | "
                     f"{r['tps_per_user_speedup']:.2f} | {cells[1]} | {r['tps_per_gpu_speedup']:.2f} | {cells[2]} | "
                     f"{r['ttft_dep_ms']:.0f} | {cells[3]} | {r['ttft_dwdp_ms']:.0f} | {cells[4]} |")
    return "\n".join(lines + ["", CAPTION, ""])


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure and one markdown table per sim_pareto run; [] when there is none."""
    written = []
    for doc in load("sim_pareto", results_root):
        written += save(_figure(doc), f"pareto_{doc['run']}", figures_root, markdown=_markdown(doc), caption=CAPTION)
    return written


if __name__ == "__main__":
    cli(main)
