"""Shared helpers for figure scripts: read results/, save PNG+PDF with the Agg backend. Never imports the model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging  # noqa: E402

from dwdp_jax.results import read_results  # noqa: E402

FIGURES_ROOT = Path("figures")


def load(experiment: str, results_root: str | Path | None = None) -> list[dict]:
    """Results of one experiment; an empty list (with a warning) when there are none yet."""
    docs = read_results(experiment, results_root)
    if not docs:
        logging.warning("no results in %s/%s: skipping", results_root or "results", experiment)
    return docs


def save(fig: "plt.Figure", name: str, figures_root: str | Path | None = None) -> list[Path]:
    """Writes figures/<name>.png and .pdf and closes the figure."""
    root = Path(figures_root or FIGURES_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{name}.png", root / f"{name}.pdf"]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths
