"""Context-only latency breakdown, DEP vs DWDP, as stacked bars (paper Table 1), beside the paper's own numbers.

Reads results/context_bench/*.json; each file with a `breakdown` section
{strategy: {category: {"ms": float, "source": "measured" | "estimated"}}} gives one figure breakdown_<run>.png/pdf.
A run recorded without one (config.breakdown=False writes it empty) is skipped with that reason; a malformed section
is a writer bug and raises naming the run. CPU runs are drawn too: their breakdown is the main job's functional
check, labelled with the device, not a speed comparison with the paper.
The paper's values are plotted normalized to its DEP4 iteration, because their unit is unclear (labelled us, but only
consistent as ms summed over an iteration; dwdp_reference.md 3.2); ours are in ms per iteration. Estimated segments
are hatched so a reader never mistakes a roofline estimate for a measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dwdp_jax.serving.metrics import CATEGORIES, ESTIMATED, MEASURED
from experiments.figures.common import cli, device_kind, load, plt, save, skip

TITLE = "paper Table 1, context-only latency breakdown (results/context_bench)"
SOURCES = (MEASURED, ESTIMATED)
# Paper Table 1 (GB200 x4, ISL 8K, r 0.8, MNT 32768). The DWDP4 baseline still merged weights with a D2D copy, a
# category our split-weight implementation does not have; its P2P copy (429) is fully overlapped and not in the total.
PAPER_TABLE1 = {
    "dep": {"attention": 269.67, "grouped_gemm": 342.40, "dense_gemm": 177.50, "others": 241.69,
            "communication": 126.74, "synchronization": 161.85},
    "dwdp": {"attention": 320.56, "grouped_gemm": 337.42, "dense_gemm": 189.28, "others": 284.32,
             "d2d_merge_copy": 34.00},
}
CAPTION = ("Left: paper Table 1 normalized to its DEP4 iteration (its unit is unclear: labelled us, consistent only as "
           "ms summed over an iteration); its DWDP4 baseline still merged weights with a D2D copy, and its overlapped "
           "P2P copy (429) is not part of the iteration. Right: this run, ms per iteration; hatched segments are "
           "roofline estimates, not measurements.")
LABELS = {"attention": "Attention", "grouped_gemm": "Grouped GEMM", "dense_gemm": "Dense GEMM", "others": "Others",
          "communication": "Communication", "p2p_exposed_wait": "P2P exposed wait",
          "synchronization": "Synchronization", "d2d_merge_copy": "D2D copy (merge)"}
COLORS = dict(zip(LABELS, plt.get_cmap("tab10").colors))


def _strategy_order(strategies) -> list[str]:
    """DEP first, then DWDP, then anything else alphabetically: the paper's reading order."""
    rank = {"dep": 0, "dwdp": 1}
    return sorted(strategies, key=lambda s: (rank.get(s.lower(), 2), s))


def _validated(doc: dict) -> dict[str, dict[str, tuple[float, str]]]:
    """{strategy: {category: (ms, source)}}; a malformed section raises naming the run, since it is a writer bug."""
    run, section = doc.get("run", "?"), doc["breakdown"]
    if not isinstance(section, dict) or not section:
        raise ValueError(f"run {run}: breakdown must be a non-empty {{strategy: {{category: ...}}}} object")
    out = {}
    for strategy, categories in section.items():
        if not isinstance(categories, dict):
            raise ValueError(f"run {run}: breakdown.{strategy} must be an object")
        out[strategy] = {}
        for category, entry in categories.items():
            where = f"run {run}: breakdown.{strategy}.{category}"
            if category not in CATEGORIES:
                raise ValueError(f"{where}: unknown category; allowed: {', '.join(CATEGORIES)}")
            if not isinstance(entry, dict) or not isinstance(entry.get("ms"), (int, float)) or entry["ms"] < 0:
                raise ValueError(f"{where}: needs a number ms >= 0")
            if entry.get("source") not in SOURCES:
                raise ValueError(f"{where}: source must be one of {SOURCES}, got {entry.get('source')!r}")
            out[strategy][category] = (float(entry["ms"]), entry["source"])
    return out


def _stacked(ax, bars: dict[str, dict[str, tuple[float, str]]], unit: str) -> None:
    """One stacked bar per strategy; hatched segments are estimates; the total is written above each bar."""
    strategies = _strategy_order(bars)
    for x, strategy in enumerate(strategies):
        bottom = 0.0
        for category in LABELS:
            if category not in bars[strategy]:
                continue
            value, source = bars[strategy][category]
            ax.bar(x, value, bottom=bottom, color=COLORS[category], edgecolor="black", linewidth=0.4,
                   hatch="//" if source == ESTIMATED else None)
            bottom += value
        ax.text(x, bottom, f"{bottom:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(strategies)), [s.upper() for s in strategies])
    ax.margins(y=0.08)
    ax.set_ylabel(unit)


def _legend(ax, used: set[str]) -> None:
    """Outside the right axes, so common.save's tight_layout makes room for it."""
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[c]) for c in LABELS if c in used]
    labels = [LABELS[c] for c in LABELS if c in used]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    labels.append("estimated (hatched)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)


def _figure(doc: dict, ours: dict[str, dict[str, tuple[float, str]]]) -> "plt.Figure":
    dep_total = sum(PAPER_TABLE1["dep"].values())
    paper = {s: {c: (v / dep_total, MEASURED) for c, v in cats.items()} for s, cats in PAPER_TABLE1.items()}
    fig, (ax_paper, ax_ours) = plt.subplots(1, 2, figsize=(10, 4.5))
    _stacked(ax_paper, paper, "iteration time / DEP4 iteration")
    ax_paper.set_title("paper Table 1 (GB200 x4, ISL 8K, r 0.8, MNT 32K)", fontsize=9)
    _stacked(ax_ours, ours, "ms per iteration")
    ax_ours.set_title(f"this run: {doc.get('run', '?')} ({device_kind(doc)})", fontsize=9)
    _legend(ax_ours, {c for bars in (paper, ours) for cats in bars.values() for c in cats})
    return fig


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """One breakdown figure per context_bench results file that has a breakdown; [] when none."""
    written = []
    for doc in load("context_bench", results_root):
        if not doc.get("breakdown"):
            enabled = (doc.get("config") or {}).get("breakdown")
            skip("context_bench", doc, "recorded without a breakdown" + (" (config.breakdown=False)"
                                                                          if enabled is False else ""))
            continue
        written += save(_figure(doc, _validated(doc)), f"breakdown_{doc.get('run', 'run')}", figures_root,
                        caption=CAPTION)
    return written


if __name__ == "__main__":
    cli(main)
