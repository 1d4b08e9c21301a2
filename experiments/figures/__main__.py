"""`python -m experiments.figures [--results DIR] [--figures DIR]`: regenerates every figure from results/.

Discovers every experiments/figures/fig_*.py module and calls its `main(results_root, figures_root) -> list[Path]`.
A script with no data is warned about and skipped; a script that fails is reported and the others still run, and the
command then exits 1, so one broken results file does not hide every other figure. Figure modules must define their
absl flags only under `if __name__ == "__main__":`, so importing several of them here does not redefine flags.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from absl import app, flags, logging

import experiments.figures

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "results root (default: results/ or $DWDP_RESULTS)")
flags.DEFINE_string("figures", None, "figures root (default: figures/)")


def discover() -> list[str]:
    """Module names of every fig_*.py in this package, sorted."""
    return sorted(f"{experiments.figures.__name__}.{m.name}" for m in pkgutil.iter_modules(experiments.figures.__path__)
                  if m.name.startswith("fig_"))


def run_all(results_root: str | Path | None = None,
            figures_root: str | Path | None = None) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Runs every figure script; returns ({module: written paths}, {module: error}) for the ones that failed."""
    written, failed = {}, {}
    for name in discover():
        try:
            written[name] = list(importlib.import_module(name).main(results_root, figures_root))
        except Exception as e:  # noqa: BLE001 - one failing figure must not hide the others; reported below
            logging.exception("%s failed", name)
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        if not written[name]:
            logging.warning("%s: no data, nothing written", name)
    return written, failed


def _cli(argv):
    del argv
    written, failed = run_all(FLAGS.results, FLAGS.figures)
    for name, paths in written.items():
        print(f"{name}: " + (", ".join(map(str, paths)) if paths else "no data (skipped)"))
    for name, error in failed.items():
        print(f"{name}: FAILED ({error})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(_cli)
