"""The reference runtime: one device, all weights, one jitted prefill. The ground truth for DEP and DWDP."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax.expert_source import as_source
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.runtime import stages
from models.config import ModelConfig
from models.deepseek_v3 import DeepseekV3, Params
from models.experts import ExpertView


class PrefillOutput(NamedTuple):
    logits_TV: np.ndarray  # float32, real tokens only, in input order
    expert_ids: list[np.ndarray]  # per MoE layer [T, top-k], real tokens only
    hidden_TD: np.ndarray | None  # None from the serving runtimes (last-token logits): no host copy of [T, D]


@functools.partial(jax.jit, static_argnames=("graphdef", "backend"))
def _forward(graphdef, state, experts, tokens_T, segment_ids_T, positions_T, backend="xla"):
    model = nnx.merge(graphdef, state)
    views = [ExpertView.single(slab, backend) for slab in experts[:model.cfg.num_moe_layers]]
    return model(tokens_T, segment_ids_T, positions_T, views)


def prefill(params: Params, batch: PackedBatch, backend: str = "xla") -> PrefillOutput:
    graphdef, state = nnx.split(params.model)
    h, logits, ids = _forward(graphdef, state, params.experts, jnp.asarray(batch.tokens_T),
                              jnp.asarray(batch.segment_ids_T), jnp.asarray(batch.positions_T), backend=backend)
    n = batch.num_tokens
    # Slice on the host: an eager device slice would compile a new program for every token count.
    return PrefillOutput(np.asarray(logits, np.float32)[:n], [np.asarray(i)[:n] for i in ids], np.asarray(h)[:n])


def prefill_streaming(model: DeepseekV3, experts, batch: PackedBatch, device: jax.Device,
                      backend: str = "xla") -> PrefillOutput:
    """The reference for models too large for one device: the same single-device math, every MoE layer run with
    all E of its experts in one slab, but each layer's slab materialized on `device` only while that layer runs
    (`experts`: an ExpertSource or the full slabs). Only peak memory differs from `prefill`."""
    cfg, source = model.cfg, as_source(experts)
    k = cfg.first_k_dense_replace
    dense_graph, dense_states = stages.split_stack(model.layers[:k])
    moe_graph, moe_states = stages.split_stack(model.layers[k:cfg.num_hidden_layers])
    norm_graph, norm_state = nnx.split(model.norm)
    put = functools.partial(jax.device_put, device=device)
    tokens, segs, pos = put((batch.tokens_T, batch.segment_ids_T, batch.positions_T))
    x = stages.front(dense_graph, put(dense_states), put(model.embed_tokens[...]), tokens, segs, pos)
    ids = []
    for m in range(cfg.num_moe_layers):
        view = ExpertView.single(source.rows(m, 0, cfg.n_routed_experts, device), backend)
        x, layer_ids = stages.moe_layer(moe_graph, put(moe_states[m]), x, segs, pos, view)
        ids.append(layer_ids)
        jax.block_until_ready(x)  # frees this layer's slab before the next one is generated
        del view
    logits = stages.head(norm_graph, put(norm_state), put(model.lm_head[...]), x)
    n = batch.num_tokens
    return PrefillOutput(np.asarray(logits, np.float32)[:n], [np.asarray(i)[:n] for i in ids], np.asarray(x)[:n])


def prefill_logits(config: ModelConfig, params: Params, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [sum of lengths, vocab] (float32) of every token of the sequences, packed into one batch."""
    if params.model.cfg != config:
        raise ValueError("params were built for a different ModelConfig than the one given")
    return prefill(params, pack(sequences, vocab_size=config.vocab_size)).logits_TV
