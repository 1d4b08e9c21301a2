"""Trains the small DeepSeek-V3-architecture MoE as a byte-level LM on the Python standard library (resumable).

  python -m experiments.train                                             # CPU preset, results/train/cpu
  python -m experiments.train --config.export_dir=checkpoints/tiny_stdlib # ... and export the final model
  python -m experiments.train --config=configs/train.py:gpu               # one GPU

Re-running with the same workdir resumes from its latest checkpoint. Writes results/train/<name>.json (loss
history, final train/held-out loss, time) and, with export_dir, the model as an Orbax model checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from dwdp_jax import checkpoint
from dwdp_jax import results as results_lib
from dwdp_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "train.py"), "training config", lock_config=True)


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
    c = _CONFIG.value
    if c.export_dir and os.path.exists(c.export_dir):
        print(f"train: --config.export_dir={c.export_dir} exists; a checkpoint is never overwritten", file=sys.stderr)
        sys.exit(2)
    result = train.run(c, c.workdir or os.path.join(c.results_root, "train", c.name))
    final = result.history[-1] if result.history else {}
    if c.export_dir:
        checkpoint.save_model(c.export_dir, result.config, result.params)
    path = results_lib.write_results("train", c.name, config=c, raw={"history": result.history},
                                     metrics={**final, "seconds": result.seconds, "steps_run": result.steps_run,
                                              "resumed_from": result.resumed_from},
                                     root=c.results_root, export_dir=c.export_dir)
    print(f"step {final.get('step')}: train loss {final.get('train_probe_loss', float('nan')):.4f} nats/byte, "
          f"held-out {final.get('heldout_loss', float('nan')):.4f} ({result.seconds:.0f} s); results: {path}")


if __name__ == "__main__":
    app.run(main)
