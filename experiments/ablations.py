"""Named ablation sweeps (paper Tables 3-4 and the engine ablations), one results file per point, resumable.

  python -m experiments.ablations --sweep=isl                          # tiny CPU scale
  python -m experiments.ablations --sweep=contention --config=configs/context_bench.py:r1_width_4gpu
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from dwdp_jax import ablations

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "context_bench.py"), "base benchmark config",
    lock_config=False)
_SWEEP = flags.DEFINE_string("sweep", None, f"one of {sorted(ablations.SWEEP_VALUES)}")
_RESULTS = flags.DEFINE_string("results", "results", "results root")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    c = _CONFIG.value
    scale = "tiny" if c.name == "tiny" else "r1"
    jax.config.update("jax_num_cpu_devices", c.cpu_devices)
    try:
        ablations.points(_SWEEP.value or "", scale)  # validates the name before any device work
        paths = ablations.run_sweep(c, _SWEEP.value, scale, _RESULTS.value)
    except ValueError as e:
        print(f"ablations: invalid input: {e}", file=sys.stderr)
        sys.exit(2)
    for path in paths:
        print(path)


if __name__ == "__main__":
    app.run(main)
