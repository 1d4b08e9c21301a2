"""Logits of every token of a HuggingFace-format DeepSeek-V3/R1 checkpoint, for checking an import.

  python -m experiments.prefill --hf_dir=DIR --tokens='1,2,3;4,5' --output=logits.npy

Sequences are separated by `;` (quote the value: a shell ends a command at `;`) and packed into one batch (they
do not attend to each other). The output is float32 [total tokens, vocab], rows in input order.

Exits with status 2 and a one-line message on bad input: every flag and path is checked before any weight is
read; a damaged checkpoint fails naming the file (and the tensor); logits holding NaN or Inf are refused, nothing
written, unless --allow_nonfinite.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import numpy as np
from absl import app, flags

from dwdp_jax.checkpoint import DTYPES, load_hf_checkpoint, load_hf_config
from dwdp_jax.runtime.reference import prefill_logits

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace checkpoint directory (config.json + *.safetensors).")
_TOKENS = flags.DEFINE_string("tokens", None, "Token ids: comma-separated, sequences separated by ';', e.g. "
                              "--tokens='1,2,3;4,5' (quoted: a shell ends a command at ';').")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the float32 [T, V] logits (.npy); its directory "
                              "must exist.")
_DTYPE = flags.DEFINE_string("dtype", None, f"Parameter dtype, one of {', '.join(DTYPES)} (default: the "
                             "checkpoint's).")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False, "Write logits holding NaN or Inf (counted on "
                                     "stderr) instead of refusing them.")


def parse_tokens(text: str) -> list[list[int]]:
    """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]]; raises ValueError on anything else."""
    sequences = []
    for i, part in enumerate(text.split(";")):
        try:
            sequences.append([int(t) for t in part.split(",")])
        except ValueError:
            raise ValueError(f"--tokens sequence {i} ({part!r}) is not a comma-separated list of integers") from None
    return sequences


def check_output(path: str) -> None:
    """Raises ValueError unless `path` can be written: checked up front so a bad path costs no load and no run."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output={path} is a directory; give the .npy file to write")
    if not os.path.isdir(directory):
        raise ValueError(f"--output={path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--output={path}: directory {directory} is not writable")


def nonfinite_report(logits_TV: np.ndarray, lengths: list[int]) -> str:
    """'' when every logit is finite, else how many are not and in which sequences (rows packed in order)."""
    bad_T = np.count_nonzero(~np.isfinite(logits_TV), axis=1)
    if not bad_T.any():
        return ""
    bad_per_sequence = np.add.reduceat(bad_T, np.cumsum([0, *lengths[:-1]]))
    sequences = [i for i, n in enumerate(bad_per_sequence) if n]
    return (f"{int(bad_T.sum())} non-finite value(s) (NaN or Inf) in {len(sequences)} of {len(lengths)} "
            f"sequence(s): {sequences[:20]}")


def _checked_sequences(argv: list[str]) -> list[list[int]]:
    """The --tokens sequences, after every flag and the checkpoint's config are checked; ValueError otherwise."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    for flag in (_HF_DIR, _TOKENS, _OUTPUT):
        if not flag.value:
            raise ValueError(f"--{flag.name} is required")
    if _DTYPE.value is not None and _DTYPE.value not in DTYPES:
        raise ValueError(f"--dtype={_DTYPE.value!r} is not one of {', '.join(DTYPES)}")
    check_output(_OUTPUT.value)
    if not os.path.isfile(os.path.join(_HF_DIR.value, "config.json")):
        raise ValueError(f"--hf_dir={_HF_DIR.value} is not a checkpoint directory (no config.json)")
    sequences = parse_tokens(_TOKENS.value)
    vocab_size = load_hf_config(_HF_DIR.value, dtype=_DTYPE.value).vocab_size
    bad = sorted({t for seq in sequences for t in seq if not 0 <= t < vocab_size})
    if bad:
        raise ValueError(f"--tokens has ids outside [0, {vocab_size}): {bad[:10]}")
    return sequences


def _fail(message: str) -> NoReturn:
    print(f"prefill: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    try:
        sequences = _checked_sequences(argv)
        config, params = load_hf_checkpoint(_HF_DIR.value, dtype=_DTYPE.value)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; both name the file at fault
        _fail(str(e))
    logits_TV = np.asarray(prefill_logits(config, params, sequences), np.float32)
    nonfinite = nonfinite_report(logits_TV, [len(s) for s in sequences])
    if nonfinite and not _ALLOW_NONFINITE.value:
        _fail(f"the logits hold {nonfinite}; nothing written (--allow_nonfinite writes them)")
    with open(_OUTPUT.value, "wb") as f:  # np.save given a path would append .npy to one without it
        np.save(f, logits_TV)
    if nonfinite:
        print(f"prefill: warning: the logits hold {nonfinite}", file=sys.stderr)
    print(f"wrote logits {logits_TV.shape} of {len(sequences)} sequence(s) to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
