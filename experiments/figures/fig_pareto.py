"""End-to-end disaggregated serving (paper Tables 5-6): output TPS/GPU against TPS/user, and TTFT, DEP vs DWDP.

Reads results/sim_pareto/*.json (python -m experiments.simulate --study=pareto). Per run, pareto_<run>.png/pdf: every
simulated point (labelled with its context GPU count) and each strategy's Pareto frontier; pareto_<run>.md: per band
the DWDP point with the best TPS/GPU paired with the DEP point of the closest TPS/user, beside the paper's Tables 5-6.
Our TPS/user is a roofline (no launch or host overhead), so it is higher than the paper's; compare the ratios.
"""

from __future__ import annotations

from pathlib import Path


from experiments.figures.common import cli, load, plt, save

COLORS = {"dep": "tab:blue", "dwdp": "tab:orange"}
# Paper Tables 5-6 (dwdp_reference.md 3.4), by band: TPS/user speedup, TPS/GPU speedup (Table 5), TTFT base / DWDP ms.
PAPER = {"20-40": (1.15, 1.10, 2538, 8314), "40-60": (1.16, 1.08, 1919, 7012), "60-80": (1.00, 1.10, 965, 1640),
         "80-100": (1.00, 1.06, 1669, 2280), "160-180": (1.00, 0.97, 494, 660)}


def _figure(doc: dict) -> "plt.Figure":
    points, frontier = doc["raw"]["points"], doc["metrics"]["frontier"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
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
    cfg = doc["config"]
    ax.set_title(f"{cfg['hardware']['name']}, ISL {cfg['isl']} / OSL {cfg['osl']}, r {cfg['input_ratio']}; "
                 "labels: context GPUs", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _markdown(doc: dict) -> str:
    lines = [f"# End-to-end, {doc['run']}", "",
             "| band | ctx GPUs DEP/DWDP | TPS/user x | paper | TPS/GPU x | paper | TTFT DEP ms | paper | "
             "TTFT DWDP ms | paper |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["metrics"]["table"]:
        paper = PAPER.get(r["band"], ("",) * 4)
        lines.append(f"| {r['band']} | {r['dep_ctx_gpus']}/{r['dwdp_ctx_gpus']} | {r['tps_per_user_speedup']:.2f} | "
                     f"{paper[0]} | {r['tps_per_gpu_speedup']:.2f} | {paper[1]} | {r['ttft_dep_ms']:.0f} | "
                     f"{paper[2]} | {r['ttft_dwdp_ms']:.0f} | {paper[3]} |")
    return "\n".join(lines + [""])


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure and one markdown table per sim_pareto run; [] (with a warning) when there is none."""
    written = []
    for doc in load("sim_pareto", results_root):
        written += save(_figure(doc), f"pareto_{doc['run']}", figures_root, markdown=_markdown(doc))
    return written


if __name__ == "__main__":
    cli(main)
