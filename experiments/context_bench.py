"""Context-only serving benchmark, DWDP vs DEP (the main job).

  python -m experiments.context_bench                                   # tiny model, 4 virtual CPU devices
  python -m experiments.context_bench --config=configs/context_bench.py:r1_width_4gpu --config.workload.input_ratio=0.5
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from dwdp_jax import bench

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "context_bench.py"), "benchmark config", lock_config=True)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    c = _CONFIG.value
    if not c.xla_excess_precision:  # read when the backend starts, which is below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_allow_excess_precision=false".strip()
    jax.config.update("jax_num_cpu_devices", c.cpu_devices)  # only affects the CPU backend
    try:
        if c.trace:  # the trace names HLO instructions; the dump maps them to their named scopes (stage_trace)
            bench.start_trace_dump(c)
        doc = bench.run(c)
    except ValueError as e:
        print(f"context_bench: invalid input: {e}", file=sys.stderr)
        sys.exit(2)
    print(bench.format_table(doc))
    failed = [name for name, v in doc["verification"].items() if not v["passed"]]
    if failed:
        print(f"context_bench: verification against the reference FAILED for {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
