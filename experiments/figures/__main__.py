"""`python -m experiments.figures [--results DIR] [--figures DIR] [--nosimulate]`: every paper figure from results/.

First runs the simulator and roofline studies whose results are missing (CPU-only, about a minute or two on two
cores; experiments/figures/simulated.py), as `python -m experiments.simulate` would, into the results root. Then
discovers every experiments/figures/fig_*.py module and calls its `main(results_root, figures_root) -> list[Path]`.
Under each script's name it prints one line per results file the figure cannot use (and why), then what it wrote. A
script that raises is a bug: it is reported, the others still run, and the command exits 1. Figure modules must
define their absl flags only under `if __name__ == "__main__":`, so importing several of them defines none.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

from absl import app, flags

import experiments.figures
from experiments.figures import simulated
from experiments.figures.common import FIGURES_ROOT

FLAGS = flags.FLAGS
flags.DEFINE_string("results", None, "results root (default: results/ or $DWDP_RESULTS)")
flags.DEFINE_string("figures", None, "figures root (default: figures/)")
flags.DEFINE_bool("simulate", True, "first run the simulator and roofline studies whose results are missing")


def discover() -> list[str]:
    """Module names of every fig_*.py in this package, sorted."""
    return sorted(f"{experiments.figures.__name__}.{m.name}" for m in pkgutil.iter_modules(experiments.figures.__path__)
                  if m.name.startswith("fig_"))


def _grouped(paths: list[Path]) -> list[str]:
    """'figures/x.png (+ pdf, md)' per figure: one line per figure, not per format."""
    stems: dict[Path, list[str]] = {}
    for path in paths:
        stems.setdefault(path.with_suffix(""), []).append(path.suffix.lstrip("."))
    return [f"{stem}.{formats[0]}" + (f" (+ {', '.join(formats[1:])})" if formats[1:] else "")
            for stem, formats in stems.items()]


def run_all(results_root: str | Path | None = None, figures_root: str | Path | None = None, simulate: bool = True,
            study_overrides: dict | None = None) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Runs the missing studies (with `simulate`), then every figure script; returns ({module: written paths},
    {module: error}) for the ones that raised."""
    if simulate:
        simulated.run_missing(results_root, study_overrides)
    written, failed = {}, {}
    for name in discover():
        module = importlib.import_module(name)
        print(f"{name.rsplit('.', 1)[-1]}: {getattr(module, 'TITLE', '')}", flush=True)
        try:
            written[name] = list(module.main(results_root, figures_root))
        except Exception as e:  # noqa: BLE001 - one failing figure must not hide the others; reported below
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"  FAILED ({failed[name]})")
            continue
        for line in _grouped(written[name]):  # nothing written: the script's own lines said why
            print(f"  {line}")
    return written, failed


def _cli(argv):
    del argv
    written, failed = run_all(FLAGS.results, FLAGS.figures, FLAGS.simulate)
    count = sum(p.suffix == ".png" for paths in written.values() for p in paths)
    print(f"{count} figures (PNG and PDF) in {FLAGS.figures or FIGURES_ROOT}"
          + (f"; {len(failed)} scripts FAILED" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(_cli)
