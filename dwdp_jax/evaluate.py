"""Accuracy of a trained checkpoint under every runtime: held-out next-byte perplexity, bits per byte and accuracy
from the reference, DEP and DWDP on the same packed held-out windows, the routing statistics behind them, and a
unigram baseline on the same bytes.

Why: DWDP and DEP move weights or tokens around but must compute the reference model exactly; on a trained model
agreeing perplexities (to 4 significant digits) is a check that means something, and the per-layer expert loads
say how skewed the routing is that the benchmark then runs with.

Each runtime is built the way it would be deployed from the checkpoint: the reference from the whole restore,
DEP from the expert-sharded restore, DWDP from per-rank restores (each rank reading only its own experts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dwdp_jax import checkpoint
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import dep as dep_lib
from dwdp_jax.runtime import reference
from dwdp_jax.runtime.dwdp import DwdpEngine

RUNTIMES = ("reference", "dep", "dwdp")
SIGNIFICANT_DIGITS = 4


@dataclasses.dataclass(frozen=True)
class Scores:
    """Next-byte prediction quality over `tokens` predicted bytes."""

    nll_nats: float  # mean negative log-likelihood per byte
    accuracy: float  # argmax == next byte
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2)

    def as_dict(self) -> dict[str, float]:
        return {"nll_nats": self.nll_nats, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "accuracy": self.accuracy, "tokens": self.tokens}


def window_batches(windows_NS1: np.ndarray, windows_per_batch: int, vocab_size: int):
    """Packed batches of `windows_per_batch` sequences (each window minus its last byte) and their next bytes."""
    out = []
    for i in range(0, len(windows_NS1), windows_per_batch):
        chunk = windows_NS1[i:i + windows_per_batch]
        seq_len = chunk.shape[1] - 1
        batch = pack([w[:-1] for w in chunk], budget=windows_per_batch * seq_len, vocab_size=vocab_size)
        out.append((batch, chunk[:, 1:].reshape(-1)))
    return out


def score(outputs: Sequence[reference.PrefillOutput], targets: Sequence[np.ndarray]) -> Scores:
    """Scores from fp32 logits, the log-softmax taken in float64."""
    nll = correct = count = 0.0
    for out, target_T in zip(outputs, targets, strict=True):
        logits_TV = out.logits_TV.astype(np.float64)
        top_T = logits_TV.max(-1)
        log_z_T = top_T + np.log(np.exp(logits_TV - top_T[:, None]).sum(-1))
        nll += float((log_z_T - logits_TV[np.arange(target_T.size), target_T]).sum())
        correct += float((logits_TV.argmax(-1) == target_T).sum())
        count += target_T.size
    return Scores(nll / count, correct / count, int(count))


def expert_load_stats(outputs: Sequence[reference.PrefillOutput], num_experts: int) -> list[dict[str, Any]]:
    """Per MoE layer, over all outputs: (token, choice) rows per expert, max/mean and min/mean load, normalized routing
    entropy (1 = uniform); and per output (one batch, what a rank serves at once): the mean max/mean load beside
    what uniform random routing of as many tokens shows by chance (a trained, bias-balanced model is near uniform
    overall; its skew is per batch, content-dependent)."""
    tokens = int(np.mean([o.expert_ids[0].shape[0] for o in outputs]))
    top_k = outputs[0].expert_ids[0].shape[1]
    stats = []
    for layer in range(len(outputs[0].expert_ids)):
        loads_BE = np.stack([np.bincount(o.expert_ids[layer].reshape(-1), minlength=num_experts) for o in outputs])
        load_E = loads_BE.sum(0).astype(np.float64)
        p_E = load_E / load_E.sum()
        entropy = -float((p_E[p_E > 0] * np.log(p_E[p_E > 0])).sum()) / math.log(num_experts)
        stats.append({"load": load_E.astype(int).tolist(), "max_over_mean": float(load_E.max() / load_E.mean()),
                      "min_over_mean": float(load_E.min() / load_E.mean()), "normalized_entropy": entropy,
                      "batch_max_over_mean": float((loads_BE.max(1) / loads_BE.mean(1)).mean()),
                      "uniform_batch_max_over_mean": uniform_max_over_mean(tokens, num_experts, top_k)})
    return stats


def uniform_max_over_mean(tokens: int, num_experts: int, top_k: int, samples: int = 256, seed: int = 0) -> float:
    """Mean max/mean load when each of `tokens` tokens picks `top_k` distinct experts uniformly at random: the skew
    that sampling noise alone shows at this batch size (the yardstick for calling routing non-uniform)."""
    rng = np.random.default_rng(seed)
    picks_STK = rng.random((samples, tokens, num_experts)).argsort(-1)[..., :top_k]
    loads_SE = np.stack([np.bincount(p.reshape(-1), minlength=num_experts) for p in picks_STK])
    return float((loads_SE.max(1) / loads_SE.mean(1)).mean())


def unigram_scores(train_bytes: np.ndarray, targets: Sequence[np.ndarray], vocab_size: int = 256) -> Scores:
    """The baseline: byte frequencies of the training text (add-one smoothed), scored on the same next bytes."""
    counts_V = np.bincount(train_bytes, minlength=vocab_size).astype(np.float64) + 1.0
    log_p_V = np.log(counts_V / counts_V.sum())
    target_T = np.concatenate(targets)
    return Scores(float(-log_p_V[target_T].mean()), float((target_T == counts_V.argmax()).mean()), int(target_T.size))


def run_reference(params: reference.Params, batches: Sequence[PackedBatch]) -> list[reference.PrefillOutput]:
    return [reference.prefill(params, b) for b in batches]


def run_dep(dep: dep_lib.DepRuntime, batches: Sequence[PackedBatch]) -> list[reference.PrefillOutput]:
    """Batch i on rank i % N, N batches per lock-step (the last step's idle ranks get None)."""
    outs = []
    n = dep.num_ranks
    for i in range(0, len(batches), n):
        group = list(batches[i:i + n])
        outs.extend(dep.step(group + [None] * (n - len(group)))[:len(group)])
    return outs


def run_dwdp(engine: DwdpEngine, batches: Sequence[PackedBatch]) -> list[reference.PrefillOutput]:
    """Batch i on rank i % N, each rank's step independent of the others."""
    return [engine.step(i % engine.num_ranks, b).output for i, b in enumerate(batches)]


def same_to_digits(a: float, b: float, digits: int = SIGNIFICANT_DIGITS) -> bool:
    return f"{a:.{digits}g}" == f"{b:.{digits}g}"


def evaluate_checkpoint(path: str, windows_NS1: np.ndarray, train_bytes: np.ndarray, num_ranks: int,
                        windows_per_batch: int, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Scores of every runtime on the same windows, routing statistics, the unigram baseline and the verification
    block (each runtime's perplexity against the reference's to SIGNIFICANT_DIGITS digits, expert choices)."""
    devices = list(jax.devices() if devices is None else devices)[:num_ranks]
    config, params = checkpoint.restore_model(path)
    pairs = window_batches(windows_NS1, windows_per_batch, config.vocab_size)
    batches, targets = [b for b, _ in pairs], [t for _, t in pairs]
    _, dep_params = checkpoint.restore_dep(path, Mesh(np.asarray(devices), (dep_lib.AXIS,)))
    outputs = {
        "reference": run_reference(params, batches),
        "dep": run_dep(dep_lib.DepRuntime(dep_params, num_ranks, batches[0].budget, devices=devices), batches),
        "dwdp": run_dwdp(DwdpEngine.from_checkpoint(path, Placement.for_group(config.n_routed_experts, num_ranks),
                                                    devices), batches),
    }
    scores = {name: score(outs, targets) for name, outs in outputs.items()}
    ref = scores["reference"]
    verification = {}
    for name in ("dep", "dwdp"):
        ids_equal = all(np.array_equal(np.sort(a, 1), np.sort(b, 1))
                        for o, r in zip(outputs[name], outputs["reference"])
                        for a, b in zip(o.expert_ids, r.expert_ids, strict=True))
        verification[name] = {"perplexity": scores[name].perplexity, "reference_perplexity": ref.perplexity,
                              "rel_err": abs(scores[name].perplexity - ref.perplexity) / ref.perplexity,
                              "expert_ids_equal": ids_equal,
                              "passed": same_to_digits(scores[name].perplexity, ref.perplexity) and ids_equal}
    return {"config": config, "scores": {k: v.as_dict() for k, v in scores.items()},
            "unigram": unigram_scores(train_bytes, targets, config.vocab_size).as_dict(),
            "expert_load": expert_load_stats(outputs["reference"], config.n_routed_experts),
            "verification": verification, "windows": int(len(windows_NS1)), "seq_len": int(windows_NS1.shape[1] - 1)}
