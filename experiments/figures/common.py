"""Shared helpers for figure scripts: read results/, save PNG+PDF with the Agg backend. Never imports the model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from dwdp_jax.results import read_results  # noqa: E402

FIGURES_ROOT = Path("figures")


def load(experiment: str, results_root: str | Path | None = None) -> list[dict]:
    """Results of one experiment; an empty list (with a warning) when there are none yet."""
    docs = read_results(experiment, results_root)
    if not docs:
        logging.warning("no results in %s/%s: skipping", results_root or "results", experiment)
    return docs


def save(fig: "plt.Figure", name: str, figures_root: str | Path | None = None,
         markdown: str | None = None) -> list[Path]:
    """Writes figures/<name>.png and .pdf (and <name>.md with `markdown`) and closes the figure."""
    root = Path(figures_root or FIGURES_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{name}.png", root / f"{name}.pdf"]
    fig.tight_layout()
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
