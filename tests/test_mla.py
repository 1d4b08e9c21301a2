"""MLA's layout work: q's rope dims are rotated where q_b_proj wrote them (one pass over a third of q), so the
compiled layer concatenates only k (its nope part with the rope key shared by all heads) at the q/k head width."""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from models import config as C
from models.deepseek_v3 import MLA


def test_q_is_rotated_in_place_only_k_is_concatenated():
    cfg = C.tiny(dtype="bfloat16")
    t, h, k = 256, cfg.num_attention_heads, cfg.qk_head_dim
    graph, state = nnx.split(MLA(cfg, nnx.Rngs(0)))
    ids, pos = jnp.zeros((t,), jnp.int32), jnp.arange(t, dtype=jnp.int32)
    x = jnp.ones((t, cfg.hidden_size), jnp.bfloat16)
    hlo = jax.jit(lambda s, x: nnx.merge(graph, s)(x, ids, pos)).lower(state, x).compile().as_text()
    wide = rf"= \w+\[{t},{h},{k}\]\S* "  # an instruction's result at the q/k head width (any float type)
    assert len(re.findall(wide + r"concatenate\(", hlo)) == 1  # k's; q has none
    assert len(re.findall(wide + r"dynamic-update-slice\(", hlo)) == 1  # q's rope dims written into q
