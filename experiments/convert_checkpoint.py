"""Converts a HuggingFace-format DeepSeek-V3/R1 checkpoint into an Orbax model checkpoint (one command).

  python -m experiments.convert_checkpoint --hf_dir=DIR --out=ORBAX_DIR [--dtype=bfloat16]

The HF import checks every tensor against the config before reading data, and every tensor read for NaN and Inf;
the Orbax checkpoint is then restorable whole, per DWDP rank (only that rank's experts are read) or sharded for
DEP. Exits with status 2 and a one-line message on bad input (flags and paths are checked before anything is
read; a damaged checkpoint is named down to the file).
"""

import os
import sys
from typing import NoReturn

from absl import app, flags, logging

from dwdp_jax import checkpoint

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace checkpoint directory (config.json + *.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Orbax model checkpoint directory to create (must not exist; its parent "
                           "must).")
_DTYPE = flags.DEFINE_string("dtype", None, f"Parameter dtype, one of {', '.join(checkpoint.DTYPES)} (default: "
                             "the checkpoint's).")


def _check_flags(argv: list[str]) -> None:
    """Raises ValueError naming the first bad flag: before the import, which can take minutes."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    for flag in (_HF_DIR, _OUT):
        if not flag.value:
            raise ValueError(f"--{flag.name} is required")
    if _DTYPE.value is not None and _DTYPE.value not in checkpoint.DTYPES:
        raise ValueError(f"--dtype={_DTYPE.value!r} is not one of {', '.join(checkpoint.DTYPES)}")
    if os.path.exists(_OUT.value):
        raise ValueError(f"--out={_OUT.value} exists; a checkpoint is never overwritten")
    parent = os.path.dirname(os.path.abspath(_OUT.value))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out={_OUT.value}: directory {parent} does not exist or is not writable")
    checkpoint.load_hf_config(_HF_DIR.value, dtype=_DTYPE.value)


def _fail(message: str) -> NoReturn:
    print(f"convert_checkpoint: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    try:
        _check_flags(argv)
        config, params = checkpoint.load_hf_checkpoint(_HF_DIR.value, dtype=_DTYPE.value)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; both name the file at fault
        _fail(str(e))
    checkpoint.save_model(_OUT.value, config, params)
    print(f"wrote {_OUT.value}: {config.num_hidden_layers} layers, {config.n_routed_experts} experts x "
          f"{config.num_moe_layers + config.num_nextn_predict_layers} MoE layers, dtype {config.dtype}")


if __name__ == "__main__":
    app.run(main)
