"""Converts a HuggingFace-format DeepSeek-V3/R1 checkpoint into an Orbax model checkpoint (one command).

  python -m experiments.convert_checkpoint --hf_dir=DIR --out=ORBAX_DIR [--dtype=bfloat16]

The HF import checks every tensor against the config before reading data; the Orbax checkpoint is then
restorable whole, per DWDP rank (only that rank's experts are read) or sharded for DEP. Exits 2 on bad input.
"""

import os

from absl import app, flags, logging

from dwdp_jax import checkpoint

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace checkpoint directory (config.json + *.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Orbax model checkpoint directory to create (must not exist).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).")


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
    for flag in (_HF_DIR, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required", exitcode=2)
    if os.path.exists(_OUT.value):
        raise app.UsageError(f"--out={_OUT.value} exists; a checkpoint is never overwritten", exitcode=2)
    try:
        config, params = checkpoint.load_hf_checkpoint(_HF_DIR.value, dtype=_DTYPE.value)
    except (ValueError, OSError) as e:
        raise app.UsageError(f"cannot load {_HF_DIR.value}: {e}", exitcode=2) from None
    checkpoint.save_model(_OUT.value, config, params)
    print(f"wrote {_OUT.value}: {config.num_hidden_layers} layers, {config.n_routed_experts} experts x "
          f"{config.num_moe_layers + config.num_nextn_predict_layers} MoE layers, dtype {config.dtype}")


if __name__ == "__main__":
    app.run(main)
