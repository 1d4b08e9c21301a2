"""The reference: one device, all weights. `prefill` (one jitted program) is the ground truth for DEP and DWDP;
`prefill_streaming` the same math for models too large for one device; `ReferenceRuntime` serves it stage by stage
as a baseline strategy."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax.expert_source import as_source, slabs_of
from dwdp_jax.kernels.split_gemm import max_slab_experts
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.runtime import stages
from dwdp_jax.runtime.step import PrefillOutput, StageClock, StepResult
from models.config import ModelConfig
from models.deepseek_v3 import DeepseekV3, Params
from models.experts import ExpertView


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
    all E of its experts on the device, but each layer's slab materialized on `device` only while that layer runs
    (`experts`: an ExpertSource or the full slabs). Only peak memory differs from `prefill`."""
    cfg, source = model.cfg, as_source(experts)
    per_slab = max_slab_experts(cfg.hidden_size, cfg.moe_intermediate_size)
    g, w = stages.split_model(model)
    w = jax.device_put(w, device)
    tokens, segs, pos = jax.device_put((batch.tokens_T, batch.segment_ids_T, batch.positions_T), device)
    x = stages.front(g.dense, w.dense_states, w.embed_VD, tokens, segs, pos)
    ids = []
    for m in range(cfg.num_moe_layers):
        view = ExpertView(slabs_of(source, m, 0, cfg.n_routed_experts, device, per_slab), cfg.n_routed_experts,
                          backend)
        x, layer_ids = stages.moe_layer(g.moe, w.moe_states[m], x, segs, pos, view)
        ids.append(layer_ids)
        jax.block_until_ready(x)  # frees this layer's slab before the next one is generated
        del view
    logits = stages.head(g.norm, w.norm_state, w.lm_head_DV, x)
    n = batch.num_tokens
    return PrefillOutput(np.asarray(logits, np.float32)[:n], [np.asarray(i)[:n] for i in ids], np.asarray(x)[:n])


class ReferenceRuntime:
    """The reference as a serving runtime: every weight on one device, run stage by stage as a DWDP rank runs it
    (the front, one program per MoE layer with all E experts on the device, the head), with nothing to pull and no
    peer. With `last_token_logits` > 0, logits only at each sequence's last token (serving)."""

    num_ranks = 1

    def __init__(self, params: Params, device: jax.Device, gemm_backend: str = "xla", last_token_logits: int = 0,
                 expert_views: Sequence[ExpertView] | None = None):
        """`expert_views`: the MoE layers' experts as another runtime on `device` holds them (`expert_views`), for
        runtimes that differ elsewhere (attention, projections) to hold one copy; params.experts is then unread."""
        model = params.model
        cfg = self.cfg = model.cfg
        self.device, self.last_token_logits = device, last_token_logits
        self.graphs, weights = stages.split_model(model)
        self.weights = jax.device_put(weights, device)
        if expert_views is not None:
            if len(expert_views) != cfg.num_moe_layers or any(v.num_experts != cfg.n_routed_experts
                                                               for v in expert_views):
                raise ValueError(f"expert_views must hold {cfg.num_moe_layers} MoE layers of "
                                 f"{cfg.n_routed_experts} experts, got {len(expert_views)} layers of "
                                 f"{sorted({v.num_experts for v in expert_views})}")
            self.expert_views = list(expert_views)
            return
        source, per_slab = as_source(params.experts), max_slab_experts(cfg.hidden_size, cfg.moe_intermediate_size)
        # all E experts of a layer, as slabs the split kernels can address
        self.expert_views = [ExpertView(slabs_of(source, m, 0, cfg.n_routed_experts, device, per_slab),
                                        cfg.n_routed_experts, gemm_backend) for m in range(cfg.num_moe_layers)]

    def _inputs(self, batch: PackedBatch):
        return jax.device_put((batch.tokens_T, batch.segment_ids_T, batch.positions_T), self.device)

    def step(self, rank: int, batch: PackedBatch, profile: bool = False) -> StepResult:
        """One prefill of `batch`; `profile` times each stage alone (`StageClock`)."""
        if rank != 0:
            raise ValueError(f"the reference runs on one rank (0), got rank={rank}")
        clock = StageClock(profile)
        rows = stages.last_token_rows(batch, self.last_token_logits) if self.last_token_logits else None
        tokens, segs, pos = self._inputs(batch)
        g, w = self.graphs, self.weights
        x = stages.run_front(g.dense, w.dense_states, w.embed_VD, tokens, segs, pos, clock)
        expert_ids = []
        for state, view in zip(w.moe_states, self.expert_views):
            x, ids = stages.run_moe_layer(g.moe, state, x, segs, pos, view, clock)
            expert_ids.append(ids)
        logits = stages.head(g.norm, w.norm_state, w.lm_head_DV, x,
                             None if rows is None else jax.device_put(rows, self.device))
        clock.lap("head", logits)
        return clock.result(stages.host_output(logits, x, expert_ids, batch, last_token=rows is not None))

    def compiled_hlo(self, batch: PackedBatch) -> dict[str, str]:
        """Optimized HLO text of its programs (front, one MoE layer, head) for `batch`'s shapes."""
        return stages.compiled_hlo(self.graphs, self.weights, batch, self.expert_views[0])


def prefill_logits(config: ModelConfig, params: Params, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [sum of lengths, vocab] (float32) of every token of the sequences, packed into one batch."""
    if params.model.cfg != config:
        raise ValueError("params were built for a different ModelConfig than the one given")
    return prefill(params, pack(sequences, vocab_size=config.vocab_size)).logits_TV
