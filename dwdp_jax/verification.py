"""Each strategy against the reference runtime: the verification batches, the reference's outputs, the comparison
(last-token logits by relative error, expert choices by set equality), the last-bit noise floor a strategy that
differs only in rounding lands near, and the routing skew of the run's weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax import evaluate
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.run_plan import Plan, tokens_of
from dwdp_jax.runtime import reference
from dwdp_jax.serving import workload
from models import deepseek_v3


def verification_split(requests: list[workload.Request], num_ranks: int) -> list[list[workload.Request]]:
    """The requests round-robin over the ranks but the last, left empty (it must not matter)."""
    per_rank: list[list] = [[] for _ in range(num_ranks)]
    for i, r in enumerate(requests):
        per_rank[i % max(num_ranks - 1, 1)].append(r)
    return per_rank


def verification_batches(p: Plan) -> list[PackedBatch | None]:
    """The first config.verify.num_requests requests spread over DWDP's ranks, padded to max_num_tokens."""
    b = p.batching
    return [pack([tokens_of(r, b.vocab_size, b.token_seed) for r in rs], budget=b.max_num_tokens) if rs else None
            for rs in verification_split(p.requests[:p.verify.num_requests], p.dwdp.num_ranks)]


def reference_output(params: reference.Params, batch: PackedBatch, p: Plan) -> reference.PrefillOutput:
    """The reference on one device, reduced to what serving produces: the last token's logits of each sequence."""
    if isinstance(params.experts, tuple):
        out = reference.prefill(params, batch, backend=p.weights.gemm_backend)
    else:
        out = reference.prefill_streaming(params.model, params.experts, batch, p.devices[0],
                                          backend=p.weights.gemm_backend)
    return last_token_only(out, batch)


def last_token_only(out: reference.PrefillOutput, batch: PackedBatch) -> reference.PrefillOutput:
    """An output with every token's logits reduced to each sequence's last token (what serving returns)."""
    if out.logits_TV.shape[0] == len(batch.lengths):
        return out
    return out._replace(logits_TV=out.logits_TV[batch.last_token_index()])


def verify(outputs: list[reference.PrefillOutput | None], refs: list[reference.PrefillOutput | None],
           tol: float, min_id_match: float = 1.0) -> dict[str, Any]:
    """Last-token logits by relative norm error, expert choices of every token by exact set equality."""
    pairs = [(o, r) for o, r in zip(outputs, refs) if r is not None]
    err = rel_err([o.logits_TV for o, _ in pairs], [r.logits_TV for _, r in pairs])
    match, per_layer = id_match([o.expert_ids for o, _ in pairs], [r.expert_ids for _, r in pairs])
    finite = all(np.isfinite(o.logits_TV).all() for o, _ in pairs)
    return {"rel_err": err, "expert_id_match": match, "expert_id_match_per_layer": per_layer,
            "finite": finite, "rel_tol": tol, "min_id_match": min_id_match,
            "passed": bool(finite and err <= tol and match >= min_id_match)}


def rel_err(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    a, b = np.concatenate([x.ravel() for x in ours]), np.concatenate([x.ravel() for x in ref])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def id_match(ours: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> tuple[float, list[float]]:
    """(over all tokens and MoE layers, per MoE layer) the fraction of tokens whose chosen expert sets are identical:
    a rounding difference grows with depth (the first MoE layer barely moves), a fault shows where it enters."""
    batches = [np.array([((np.sort(a, 1) == np.sort(b, 1)).all(1).sum(), a.shape[0])
                         for a, b in zip(layers_a, layers_b, strict=True)], float).reshape(-1, 2)
               for layers_a, layers_b in zip(ours, ref, strict=True)]
    same, total = (np.sum(batches, axis=0) if batches else np.zeros((0, 2))).T
    return float(same.sum() / max(total.sum(), 1)), (same / np.maximum(total, 1)).tolist()


def last_bit_perturbed(model: deepseek_v3.DeepseekV3, seed: int) -> deepseek_v3.DeepseekV3:
    """A copy of the model whose embedding table is one unit in the last place off, up or down at random per
    entry (zeros move up): the smallest change of the model's input, the size of one rounding difference."""
    graphdef, state = nnx.split(model)
    perturbed = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new variables, the same (shared) arrays
    perturbed.embed_tokens[...] = _flip_last_bit(model.embed_tokens[...], jax.random.key(seed))
    return perturbed


@jax.jit
def _flip_last_bit(table: jax.Array, key: jax.Array) -> jax.Array:
    uint = {2: jnp.uint16, 4: jnp.uint32}[table.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(table, uint)
    magnitude = bits & jnp.array(jnp.iinfo(uint).max >> 1, uint)
    down = jax.random.bernoulli(key, 0.5, table.shape) & (magnitude > 0)
    return jax.lax.bitcast_convert_type(jnp.where(down, bits - 1, bits + 1).astype(uint), table.dtype)


def reference_noise(params: reference.Params, refs: list[reference.PrefillOutput | None], vb, p: Plan
                    ) -> dict[str, Any]:
    """The reference against itself with its embeddings one last bit off (`last_bit_perturbed`): how far the logits
    and the expert choices move when the model is perturbed by one rounding difference. bf16 with random weights
    routes on near-ties, so a strategy that differs from the reference only in rounding (another summation order,
    another kernel) lands near this floor rather than within a fixed tolerance; a real fault lands far above it."""
    model = last_bit_perturbed(params.model, p.weights.seed + 1)
    others = [reference_output(params._replace(model=model), b, p) if b is not None else None for b in vb]
    floor = verify(others, refs, tol=float("inf"))
    return {k: floor[k] for k in ("rel_err", "expert_id_match", "expert_id_match_per_layer", "finite")}


def judged_by_floor(v: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """A verification that also passes when its strategy is no further from the reference than the last-bit
    floor (`reference_noise`), on both measures; `passed_tolerance` keeps the tolerance verdict."""
    within = bool(floor) and v["finite"] and v["rel_err"] <= floor["rel_err"] and \
        v["expert_id_match"] >= floor["expert_id_match"]
    return {**v, "passed_tolerance": v["passed"], "within_noise_floor": within, "passed": v["passed"] or within}


def routing_skew(refs: list[reference.PrefillOutput | None] | None, num_experts: int) -> dict[str, Any]:
    """Max/mean expert load (and normalized routing entropy) per MoE layer of the reference over the verification
    batches: the routing skew the run's weights produce (about 1 for random weights, more for trained ones; a few
    hundred tokens add sampling noise, hence the token count)."""
    outs = [r for r in refs or [] if r is not None]
    if not outs:
        return {}
    stats = evaluate.expert_load_stats(outs, num_experts)
    tokens = sum(int(o.expert_ids[0].shape[0]) for o in outs)
    return {"max_over_mean": [s["max_over_mean"] for s in stats],
            "normalized_entropy": [s["normalized_entropy"] for s in stats], "tokens": tokens,
            "uniform_max_over_mean": evaluate.uniform_max_over_mean(tokens, num_experts,
                                                                    outs[0].expert_ids[0].shape[1])}
