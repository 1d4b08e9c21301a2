"""Per-stage jitted programs over the model's modules: what a runtime that steps layer by layer dispatches.

The DWDP ranks and the streaming reference call these, one program per stage on one device: the dense front
(embedding + dense layers), a MoE layer (attention + MoE, or each alone when profiling), the head. Every MoE layer
has the same module structure, so one compiled program per device and shape serves all of them.

`hook` (a transport's in-program fences, static; None for none): the MoE waits for its slot's copies right before
its grouped GEMM, and issues the next pulls once the output of the stage named by `issue_after` exists ("moe": the
layer's output, or "attention": its attention's, before the MoE); the front issues the priming pulls before its
first layer. The layer-level programs take the same `issue_after`, so profiled and fused steps issue alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax.packing import PackedBatch
from dwdp_jax.runtime.step import PrefillOutput, StageClock
from models.deepseek_v3 import MLA
from models.experts import ExpertView


@dataclasses.dataclass(frozen=True)
class FencedExperts:
    """The routed experts of a view whose slot a transport fills behind XLA's back: wait, then compute."""

    view: ExpertView
    hook: Any
    merge: bool

    def __call__(self, x_TD, ids_TK, weights_TK, valid_T=None):
        view = self.hook.wait_before(self.view, x_TD)
        return (view.merged() if self.merge else view)(x_TD, ids_TK, weights_TK, valid_T)


def _experts(view, merge, hook):
    if hook is not None:
        return FencedExperts(view, hook, merge)
    return view.merged() if merge else view


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def front(graphdef, dense_states, embed_VD, tokens_T, segment_ids_T, positions_T, hook=None):
    if hook is not None:
        tokens_T = hook.issue_after(tokens_T)
    with jax.named_scope("embed"):  # as `DeepseekV3.embed`, whose table this is
        x_TD = embed_VD[tokens_T]
    for state in dense_states:
        x_TD, _ = nnx.merge(graphdef, state)(x_TD, segment_ids_T, positions_T)
    return x_TD


ISSUE_POINTS = ("moe", "attention")


def _issue(x_TD, hook, issue_after: str, stage: str):
    if issue_after not in ISSUE_POINTS:
        raise ValueError(f"issue_after must be one of {ISSUE_POINTS}, got {issue_after!r}")
    return hook.issue_after(x_TD) if hook is not None and issue_after == stage else x_TD


def _attention(graphdef, state, x_TD, segment_ids_T, positions_T, hook=None, issue_after="moe"):
    x_TD = nnx.merge(graphdef, state).attention(x_TD, segment_ids_T, positions_T)
    return _issue(x_TD, hook, issue_after, "attention")


def _ffn(graphdef, state, x_TD, segment_ids_T, view, merge=False, hook=None, issue_after="moe"):
    x_TD, ids_TK = nnx.merge(graphdef, state).ffn(x_TD, _experts(view, merge, hook), segment_ids_T >= 0)
    return _issue(x_TD, hook, issue_after, "moe"), ids_TK


@functools.partial(jax.jit, static_argnames=("graphdef", "merge", "hook", "issue_after"))
def moe_layer(graphdef, state, x_TD, segment_ids_T, positions_T, view, merge=False, hook=None, issue_after="moe"):
    x_TD = _attention(graphdef, state, x_TD, segment_ids_T, positions_T, hook, issue_after)
    return _ffn(graphdef, state, x_TD, segment_ids_T, view, merge, hook, issue_after)


attention = jax.jit(_attention, static_argnames=("graphdef", "hook", "issue_after"))
ffn = jax.jit(_ffn, static_argnames=("graphdef", "merge", "hook", "issue_after"))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def head(graphdef, norm_state, lm_head_DV, x_TD, rows_R=None):
    with jax.named_scope("lm_head"):  # as `DeepseekV3.head`, whose final norm and lm_head these are
        h_TD = nnx.merge(graphdef, norm_state)(x_TD if rows_R is None else x_TD[rows_R])
        return jnp.einsum("td,dv->tv", h_TD, lm_head_DV, preferred_element_type=jnp.float32)


def run_front(graphdef, dense_states, embed_VD, tokens_T, segment_ids_T, positions_T, clock: StageClock, hook=None):
    """The embedding and the dense layers: one program, or one per stage when the clock profiles."""
    if not clock.profile:
        return front(graphdef, dense_states, embed_VD, tokens_T, segment_ids_T, positions_T, hook=hook)
    x_TD = front(graphdef, (), embed_VD, tokens_T, segment_ids_T, positions_T, hook=hook)
    clock.lap("embed", x_TD)
    for state in dense_states:
        x_TD = attention(graphdef, state, x_TD, segment_ids_T, positions_T)
        clock.lap("attention", x_TD)
        x_TD, _ = ffn(graphdef, state, x_TD, segment_ids_T, None)
        clock.lap("dense_mlp", x_TD)
    return x_TD


def run_moe_layer(graphdef, state, x_TD, segment_ids_T, positions_T, view, clock: StageClock, *, merge=False,
                  hook=None, issue_after="moe"):
    """One MoE layer: attention and MoE in one program, or each alone when the clock profiles."""
    if clock.profile:
        x_TD = attention(graphdef, state, x_TD, segment_ids_T, positions_T, hook=hook, issue_after=issue_after)
        clock.lap("attention", x_TD)
        x_TD, ids_TK = ffn(graphdef, state, x_TD, segment_ids_T, view, merge=merge, hook=hook,
                           issue_after=issue_after)
    else:
        x_TD, ids_TK = moe_layer(graphdef, state, x_TD, segment_ids_T, positions_T, view, merge=merge, hook=hook,
                                 issue_after=issue_after)
    clock.lap("moe", x_TD)
    return x_TD, ids_TK


def host_output(logits, x_TD, expert_ids, batch: PackedBatch, last_token: bool) -> PrefillOutput:
    """The step's outputs on the host, real tokens only (last-token logits: one row per sequence). Sliced on the
    host: an eager device slice would compile a new program for every token count."""
    n = batch.num_tokens
    logits = np.asarray(logits, np.float32)[:len(batch.lengths) if last_token else n]
    return PrefillOutput(logits, [np.asarray(i)[:n] for i in expert_ids], None if last_token else np.asarray(x_TD)[:n])


def last_token_rows(batch: PackedBatch, max_sequences: int) -> np.ndarray:
    """Row of each sequence's last token, padded to a static count (repeating the last row)."""
    last = batch.last_token_index()
    if last.size > max_sequences:
        raise ValueError(f"batch has {last.size} sequences, more than last_token_logits={max_sequences}")
    return np.pad(last, (0, max_sequences - last.size), mode="edge").astype(np.int32)


def split_stack(modules):
    splits = [nnx.split(m) for m in modules]
    return (splits[0][0] if splits else None), tuple(s for _, s in splits)


@dataclasses.dataclass(frozen=True)
class Graphs:
    """The stage programs' static graphs: the dense layers', a MoE layer's (all alike), the final norm's."""

    dense: Any
    moe: Any
    norm: Any


class Weights(NamedTuple):
    """The states and arrays the stage programs of one device take (a pytree: placed with one device_put)."""

    dense_states: tuple
    moe_states: tuple
    norm_state: Any
    embed_VD: jax.Array
    lm_head_DV: jax.Array


def split_model(model) -> tuple[Graphs, Weights]:
    """The model as the stage programs take it: graphs (kept by a runtime) and weights (placed on each device)."""
    k, n = model.cfg.first_k_dense_replace, model.cfg.num_hidden_layers
    dense_graph, dense_states = split_stack(model.layers[:k])
    moe_graph, moe_states = split_stack(model.layers[k:n])
    norm_graph, norm_state = nnx.split(model.norm)
    return (Graphs(dense_graph, moe_graph, norm_graph),
            Weights(dense_states, moe_states, norm_state, model.embed_tokens[...], model.lm_head[...]))


def compiled_hlo(graphs: Graphs, w: Weights, batch: PackedBatch, view, hook=None, **moe_options) -> dict[str, str]:
    """Optimized HLO text of one device's programs (front, one MoE layer over `view`, head) for `batch`'s shapes;
    `w` on that device, `moe_options` as `moe_layer` takes them."""
    device = next(iter(w.embed_VD.devices()))
    tokens, segs, pos = jax.device_put((batch.tokens_T, batch.segment_ids_T, batch.positions_T), device)
    x = jax.ShapeDtypeStruct((batch.budget, w.embed_VD.shape[1]), w.embed_VD.dtype, sharding=w.embed_VD.sharding)
    fenced = {} if hook is None else {"hook": hook}
    return {
        "front": front.lower(graphs.dense, w.dense_states, w.embed_VD, tokens, segs, pos, **fenced).compile().as_text(),
        "moe_layer": moe_layer.lower(graphs.moe, w.moe_states[0], x, segs, pos, view, **fenced,
                                     **moe_options).compile().as_text(),
        "head": head.lower(graphs.norm, w.norm_state, w.lm_head_DV, x).compile().as_text(),
    }


def with_attention_impl(model, attention_impl: str):
    """A copy of the model (sharing its arrays) whose MLA modules use the named attention backend."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MLA):
            module.attention_impl = attention_impl
    return model
