"""Named ablation sweeps (paper Tables 3-4 and the engine ablations), one results file per point, resumable.

  python -m experiments.ablations --sweep=isl                          # tiny CPU scale
  python -m experiments.ablations --sweep=contention --config=configs/context_bench.py:r1_width_4gpu

A stored point is reused when its config key matches (config.point_key: the point's full resolved config and the
device kind) and it did not fail verification; any other point runs. Prints a line per point (reused or running, and
why), then a table of every point's headline numbers. Exit status: 0 when no point failed, 1 when a point failed
verification or a strategy of it failed (after every point ran), 2 for invalid input.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from dwdp_jax import ablations, bench

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "context_bench.py"), "base benchmark config",
    lock_config=False)
_SWEEP = flags.DEFINE_string("sweep", None, f"one of {sorted(ablations.SWEEP_VALUES)}")
_RESULTS = flags.DEFINE_string("results", "results", "results root")
_RERUN_ON_SOURCE_CHANGE = flags.DEFINE_bool(
    "rerun_on_source_change", False, "also rerun stored points whose source hash differs from this checkout's")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    c = _CONFIG.value
    scale = "tiny" if c.name == "tiny" else "r1"
    bench.configure_backend(c)  # before the backend starts, which is below
    try:
        ablations.points(_SWEEP.value or "", scale)  # validates the name before any device work
        outcomes = ablations.run_points(c, _SWEEP.value, scale, _RESULTS.value,
                                        rerun_on_source_change=_RERUN_ON_SOURCE_CHANGE.value)
    except ValueError as e:
        print(f"ablations: invalid input: {e}", file=sys.stderr)
        sys.exit(2)
    print(ablations.summary_table(outcomes))
    failed = [r.name for r in outcomes if r.passed is False]
    if failed:
        print(f"ablations: {len(failed)} of {len(outcomes)} points FAILED (verification or a strategy): {failed}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
