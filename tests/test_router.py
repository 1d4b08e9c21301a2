"""The router's fp32 dot asks for full fp32 (HF's gate), not JAX's default precision, which lets NVIDIA GPUs take
TF32; `router_precision="tensorfloat32"` is the named ablation; anything else is refused naming the field."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from models import config as C
from models.deepseek_v3 import Router


def _dot_precisions(cfg) -> list[str]:
    router = Router(cfg, nnx.Rngs(0))
    graph, state = nnx.split(router)
    x = jnp.ones((16, cfg.hidden_size), jnp.bfloat16)
    text = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).as_text()
    return re.findall(r"dot_general.*?precision = \[(\w+), (\w+)\]", text)


def test_the_router_dot_is_full_fp32_by_default_and_tf32_only_as_the_ablation():
    cfg = C.tiny()
    assert cfg.router_precision == "float32"
    assert _dot_precisions(cfg) == [("HIGHEST", "HIGHEST")]
    assert _dot_precisions(dataclasses.replace(cfg, router_precision="tensorfloat32")) == [("HIGH", "HIGH")]


def test_an_unknown_router_precision_is_refused():
    with pytest.raises(ValueError, match=r"router_precision must be one of \('float32', 'tensorfloat32'\)"):
        dataclasses.replace(C.tiny(), router_precision="bfloat16")
