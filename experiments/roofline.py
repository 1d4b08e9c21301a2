"""`python -m experiments.roofline [--hardware=gb200] [--isls=...] [--batches=...]`: the roofline study (blog Table 1).

The same as `python -m experiments.simulate --study=roofline`, with the same flags: T_compute/T_prefetch and
T_DEP/T_DWDP per MoE layer over ISL and batch, the crossover ISL, and the distance to the four published ratios.
Writes results/roofline/<run>.json.
"""

from __future__ import annotations

import sys

from absl import app

from experiments import simulate


def _cli(argv):
    del argv
    sys.exit(simulate.main("roofline"))


if __name__ == "__main__":
    app.run(_cli)
