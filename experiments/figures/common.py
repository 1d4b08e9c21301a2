"""Shared helpers for figure scripts: read results/, report what a figure cannot use, save PNG+PDF with the Agg backend.

Never imports the model. A results file a figure cannot use (a CPU run where speed is plotted, a run recorded without
the section the figure draws) is skipped with one printed line saying why; the figure is drawn from the others.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from dwdp_jax.results import RESULTS_ROOT, read_results  # noqa: E402

FIGURES_ROOT = Path("figures")
CAPTION_FONTSIZE = 8
CAPTION_LINE_IN = 0.16  # height of one caption line at CAPTION_FONTSIZE, inches


class Unusable(ValueError):
    """A results file one figure cannot use; the message is the one-line reason."""


def note(line: str) -> None:
    """One indented line of the figures command's report (under the figure script's name)."""
    print(f"  {line}")


def skip(experiment: str, doc: dict, reason: str) -> None:
    note(f"skipped {experiment} run {doc.get('run', '?')}: {reason}")


def device_kind(doc: dict) -> str:
    return str((doc.get("environment") or {}).get("device_kind", "unknown device"))


def is_cpu(doc: dict) -> bool:
    """A run on CPU devices: it checks the machinery (tiny model, host copies), it does not measure GPU speed."""
    return device_kind(doc).lower() == "cpu"


def load(experiment: str, results_root: str | Path | None = None) -> list[dict]:
    """Results of one experiment; an empty list (with a one-line note) when there are none yet."""
    docs = read_results(experiment, results_root)
    if not docs:
        note(f"no figure from {Path(results_root or RESULTS_ROOT) / experiment}: no results there")
    return docs


def add_caption(fig: "plt.Figure", caption: str) -> float:
    """Writes `caption` under the axes, wrapped to the figure's width; returns the fraction of the height it takes."""
    width_in, height_in = fig.get_size_inches()
    lines = textwrap.wrap(caption, width=int(15 * width_in))
    fig.text(0.01, 0.01, "\n".join(lines), ha="left", va="bottom", fontsize=CAPTION_FONTSIZE)
    return (len(lines) * CAPTION_LINE_IN + 0.1) / height_in


def save(fig: "plt.Figure", name: str, figures_root: str | Path | None = None, markdown: str | None = None,
         caption: str | None = None, header_in: float = 0.0) -> list[Path]:
    """Writes figures/<name>.png and .pdf (and <name>.md with `markdown`) and closes the figure. A caption goes
    under the axes, where a reader looks for what the marks mean; `header_in` inches stay free above the axes for a
    figure-level legend (tight_layout does not see one)."""
    root = Path(figures_root or FIGURES_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{name}.png", root / f"{name}.pdf"]
    bottom = add_caption(fig, caption) if caption else 0.0
    fig.tight_layout(rect=(0, bottom, 1, 1 - header_in / fig.get_size_inches()[1]))
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    if markdown is not None:
        paths.append(root / f"{name}.md")
        paths[-1].write_text(markdown)
    return paths


def cli(main) -> None:
    """The absl entry point every figure script shares: --results and --figures, then prints what it wrote.
    Flags are defined here, at run time, so importing a figure module defines none (the driver imports them all)."""
    flags.DEFINE_string("results", None, "results root (default: results/ or $DWDP_RESULTS)")
    flags.DEFINE_string("figures", None, "figures root (default: figures/)")

    def run(argv):
        del argv
        for path in main(flags.FLAGS.results, flags.FLAGS.figures):
            print(path)

    app.run(run)
