"""Held-out accuracy of a trained checkpoint under the reference, DEP and DWDP runtimes (same packed windows).

  python -m experiments.evaluate                                    # checkpoints/tiny_stdlib, 4 virtual CPU devices
  python -m experiments.evaluate --checkpoint=DIR --num_windows=256 --num_ranks=4

Prints perplexity, bits per byte and next-byte accuracy per runtime, the unigram baseline and the per-layer
routing skew, and writes results/evaluate/<run>.json. Exits 1 if DEP or DWDP disagrees with the reference (to 4
significant digits of perplexity, or in any expert choice), 2 on bad input.
"""

import datetime
import os
import sys

import jax
from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", "checkpoints/tiny_stdlib", "Orbax model checkpoint directory.")
_NUM_WINDOWS = flags.DEFINE_integer("num_windows", 64, "Held-out windows, evenly spaced over the held-out bytes.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Bytes predicted per window.")
_WINDOWS_PER_BATCH = flags.DEFINE_integer("windows_per_batch", 4, "Windows packed into one batch.")
_NUM_RANKS = flags.DEFINE_integer("num_ranks", 4, "DEP and DWDP group size.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 4, "Virtual CPU devices when running on CPU.")
_HELDOUT_PER_MILLE = flags.DEFINE_integer("heldout_per_mille", 50, "The training run's held-out split.")
_RUN = flags.DEFINE_string("run", "", "Results file name (default: evaluate_<date>).")
_RESULTS_ROOT = flags.DEFINE_string("results_root", "results", "Results directory.")


LOAD_METRICS = ("max_over_mean", "normalized_entropy", "batch_max_over_mean", "uniform_batch_max_over_mean")


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}", exitcode=2)
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # only affects the CPU backend
    from dwdp_jax import evaluate, results, train

    if not os.path.isdir(_CHECKPOINT.value):
        raise app.UsageError(f"--checkpoint={_CHECKPOINT.value} is not a directory", exitcode=2)
    try:
        corpus = train.load_corpus(_HELDOUT_PER_MILLE.value)
        windows = train.evenly_spaced_windows(corpus.heldout_bytes, _SEQ_LEN.value, _NUM_WINDOWS.value)
        doc = evaluate.evaluate_checkpoint(_CHECKPOINT.value, windows, corpus.train_bytes, _NUM_RANKS.value,
                                           _WINDOWS_PER_BATCH.value)
    except ValueError as e:
        print(f"evaluate: invalid input: {e}", file=sys.stderr)
        sys.exit(2)
    run = _RUN.value or f"evaluate_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    flags_used = {f.name: f.value for f in (_CHECKPOINT, _NUM_WINDOWS, _SEQ_LEN, _WINDOWS_PER_BATCH, _NUM_RANKS,
                                            _HELDOUT_PER_MILLE)}
    path = results.write_results("evaluate", run, config=flags_used, raw={"expert_load": doc["expert_load"]},
                                 metrics={"scores": doc["scores"], "unigram": doc["unigram"],
                                          **{k: [s[k] for s in doc["expert_load"]] for k in LOAD_METRICS}},
                                 verification=doc["verification"], root=_RESULTS_ROOT.value, model=doc["config"],
                                 heldout_files=len(corpus.heldout_files), windows=doc["windows"],
                                 seq_len=doc["seq_len"])
    print(format_table(doc))
    print(f"results: {path}")
    failed = [name for name, v in doc["verification"].items() if not v["passed"]]
    if failed:
        print(f"evaluate: {failed} disagree with the reference", file=sys.stderr)
        sys.exit(1)


def format_table(doc) -> str:
    rows = [f"{'runtime':<11}{'perplexity':>12}{'bits/byte':>11}{'accuracy':>10}"]
    for name, s in [*doc["scores"].items(), ("unigram", doc["unigram"])]:
        rows.append(f"{name:<11}{s['perplexity']:>12.4f}{s['bits_per_byte']:>11.4f}{s['accuracy']:>10.4f}")
    for m, s in enumerate(doc["expert_load"]):
        rows.append(f"MoE layer {m}: max/mean load {s['max_over_mean']:.2f}, min/mean {s['min_over_mean']:.2f}, "
                    f"normalized entropy {s['normalized_entropy']:.4f}; per batch max/mean "
                    f"{s['batch_max_over_mean']:.2f} (uniform routing: {s['uniform_batch_max_over_mean']:.2f})")
    return "\n".join(rows)


if __name__ == "__main__":
    app.run(main)
