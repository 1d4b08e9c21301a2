"""Copy-engine pulls against the compute, on each rank's device clock (issue 6: the proof that they overlap).

Reads results/context_bench/*.json whose raw.dwdp.pull_timeline holds the copy engine's marks (the benchmark with
config.dwdp.timeline on a GPU): per rank, the side stream's copy intervals (one bar per MoE layer's pull) under the
XLA stream's fence points (pull issued; MoE reached its read-after-write wait, and resumed). A wait that resumes when
it arrives is a pull that was fully hidden. Writes pull_timeline_<run>.png/pdf.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from experiments.figures.common import cli, load, plt, save, skip

TITLE = "copy-engine pulls against compute, per rank (issue 6; results/context_bench raw.dwdp.pull_timeline)"
LEGEND = [Patch(color="tab:orange", label="pull of a MoE layer's remote experts (side stream)"),
          Line2D([], [], marker="v", color="black", linestyle="none", label="pull issued (XLA stream)"),
          Patch(color="tab:red", label="MoE waits for its pull (arrive to resume; a sliver: hidden)"),
          Line2D([], [], color="gray", linestyle="--", label="host-measured step end")]


def _pairs(marks: list, start: str, end: str) -> list[tuple[int, float, float]]:
    """(layer, start ms, end ms) of consecutive start/end marks."""
    return [(a[1], a[2], b[2]) for a, b in zip(marks, marks[1:]) if a[0] == start and b[0] == end]


def _figure(doc: dict) -> "plt.Figure":
    ranks = doc["raw"]["dwdp"]["pull_timeline"]
    fig, axes = plt.subplots(len(ranks), 1, figsize=(8, 1.3 * len(ranks) + 0.8), sharex=True, squeeze=False)
    for ax, rank in zip(axes[:, 0], ranks):
        marks = rank["marks"]
        for layer, a, b in _pairs(marks, "copy_start", "copy_end"):
            ax.barh(1, b - a, left=a, height=0.5, color="tab:orange")
            ax.text(a + (b - a) / 2, 1, f"pull L{layer}", ha="center", va="center", fontsize=7)
        for _, a, b in _pairs(marks, "wait_arrive", "wait_resume"):
            ax.barh(0, max(b - a, 0.5), left=a, height=0.5, color="tab:red")
        issues = [m[2] for m in marks if m[0] == "issue"]
        ax.scatter(issues, [0] * len(issues), marker="v", color="black", zorder=5, s=18)
        ax.axvline(rank["step_ms"], color="gray", lw=0.8, ls="--")
        ax.set_yticks([0, 1], ["XLA stream\n(issue, wait)", "side stream\n(copies)"], fontsize=7)
        ax.set_ylim(-0.6, 1.6)
        ax.set_title(f"rank {rank['rank']}: exposed wait {rank['exposed_wait_ms']:.3f} ms of a "
                     f"{rank['step_ms']:.0f} ms step", fontsize=8)
    axes[-1, 0].set_xlabel("ms since the step's first mark")
    axes[0, 0].legend(handles=LEGEND, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.25), ncols=2)
    return fig


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One figure per context_bench run that recorded a pull timeline; [] when there is none."""
    written = []
    for doc in load("context_bench", results_root):
        if not ((doc.get("raw") or {}).get("dwdp") or {}).get("pull_timeline"):
            skip("context_bench", doc, "no pull timeline (recorded by config.dwdp.timeline on a GPU)")
        else:
            written += save(_figure(doc), f"pull_timeline_{doc['run']}", figures_root)
    return written


if __name__ == "__main__":
    cli(main)
