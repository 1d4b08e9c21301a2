"""Copy-engine pulls on one destination GPU, side by side: one side stream (the transport's issue order) against
the peer-copy ceiling (one stream per peer at once), and GEMM / MLA attention alone and with a pull in flight
(issue 6: pull >= 90% of the ceiling, compute slowed <= 10%).

  python -m experiments.bench_copy_engine        # on 2+ GPUs; writes results/bench_copy_engine/<run>.json
"""

import sys

import jax
from absl import app, flags

from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.results import write_measurements

_GIB = flags.DEFINE_integer("gib", 16, "GiB pulled (an R1 layer's remote experts for DWDP4 is 15.75 GiB)")
_RESULTS = flags.DEFINE_string("results", "results", "results root")


def main(argv):
    del argv
    devices = jax.devices()
    if devices[0].platform != "gpu" or len(devices) < 2:
        print("bench_copy_engine: needs 2 or more GPUs", file=sys.stderr)
        sys.exit(2)
    m = gb.copy_engine_overlap(devices[0], devices[1:4], _GIB.value << 30)
    m["pull_over_ceiling"] = m["pull_gbps"] / m["pull_ceiling_gbps"]
    write_measurements("bench_copy_engine", config={"gib": _GIB.value, "peers": len(devices[1:4])}, raw={}, metrics=m,
                       root=_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
