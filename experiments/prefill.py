"""Logits of every token of a HuggingFace-format DeepSeek-V3/R1 checkpoint, for checking an import.

  python -m experiments.prefill --hf_dir=DIR --tokens=1,2,3;4,5 --output=logits.npy

Sequences are separated by `;` and packed into one batch (they do not attend to each other). The output is
float32 [total tokens, vocab], rows in input order. Bad input exits with status 2 before weights are loaded.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

import dwdp_jax
from dwdp_jax.checkpoint import load_hf_config

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace checkpoint directory (config.json + *.safetensors).")
_TOKENS = flags.DEFINE_string("tokens", None, "Token ids: comma-separated, sequences separated by ';'.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the float32 [T, V] logits (.npy).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).")


def parse_tokens(text: str) -> list[list[int]]:
    """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]]; raises ValueError on anything else."""
    sequences = []
    for i, part in enumerate(text.split(";")):
        try:
            sequences.append([int(t) for t in part.split(",")])
        except ValueError:
            raise ValueError(f"--tokens sequence {i} ({part!r}) is not a comma-separated list of integers") from None
    return sequences


def _checked_sequences() -> list[list[int]]:
    """The --tokens sequences, checked against the checkpoint's config, or a UsageError (exit status 2)."""
    for flag in (_HF_DIR, _TOKENS, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required", exitcode=2)
    if not os.path.isfile(os.path.join(_HF_DIR.value, "config.json")):
        raise app.UsageError(f"--hf_dir={_HF_DIR.value} is not a checkpoint directory (no config.json)", exitcode=2)
    try:
        sequences = parse_tokens(_TOKENS.value)
        vocab_size = load_hf_config(_HF_DIR.value).vocab_size
    except ValueError as e:
        raise app.UsageError(str(e), exitcode=2) from None
    bad = sorted({t for seq in sequences for t in seq if not 0 <= t < vocab_size})
    if bad:
        raise app.UsageError(f"--tokens has ids outside [0, {vocab_size}): {bad[:10]}", exitcode=2)
    return sequences


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
    sequences = _checked_sequences()
    try:
        config, params = dwdp_jax.load_hf_checkpoint(_HF_DIR.value, dtype=_DTYPE.value)
    except (ValueError, OSError) as e:
        raise app.UsageError(f"cannot load {_HF_DIR.value}: {e}", exitcode=2) from None
    logits_TV = dwdp_jax.prefill_logits(config, params, sequences)
    np.save(_OUTPUT.value, logits_TV.astype(np.float32))
    print(f"wrote logits {logits_TV.shape} of {len(sequences)} sequence(s) to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
