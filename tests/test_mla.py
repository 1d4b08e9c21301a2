"""MLA's layout work: q's rope dims are rotated where q_b_proj wrote them (one pass over a third of q), so the
compiled layer concatenates only k (its nope part with the rope key shared by all heads) at the q/k head width, and
on the FP8 kernel not even k (the k_nope GEMM writes into k); kv_b_proj's k_nope and v parts come from their own
GEMMs (FP8: the weight's own scale-block rows), not a split."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwdp_jax.kernels import fp8
from models import config as C
from models.deepseek_v3 import MLA, project, project_heads


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


def test_k_nope_and_v_come_from_their_own_gemms_not_a_split():
    """kv_b_proj's per-head k_nope and v columns each through their own GEMM: no slice of a [T, H, nope + v] output."""
    cfg = C.tiny(dtype="bfloat16")
    t, h = 256, cfg.num_attention_heads
    graph, state = nnx.split(MLA(cfg, nnx.Rngs(0)))
    ids, pos = jnp.zeros((t,), jnp.int32), jnp.arange(t, dtype=jnp.int32)
    x = jnp.ones((t, cfg.hidden_size), jnp.bfloat16)
    hlo = jax.jit(lambda s, x: nnx.merge(graph, s)(x, ids, pos)).lower(state, x).compile().as_text()
    assert not re.findall(rf"= \w+\[{t},{h},{cfg.v_head_dim}\]\S* slice\(", hlo)


def test_fp8_per_head_parts_equal_the_split_product():
    """An FP8 kv_b (k_nope 128 and v 128 per head: whole scale blocks) through `project_heads`, each part from the
    weight's own block rows, equals the whole projection split per head (the dequantized reference path on CPU)."""
    cfg = C.tiny(dtype="float32", fp8_dense=True, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=256)
    mla = MLA(cfg, nnx.Rngs(0))
    assert isinstance(mla.kv_b_proj.get_value(), fp8.BlockScaled)
    c = jax.random.normal(jax.random.key(1), (64, cfg.kv_lora_rank), jnp.float32)
    rope = jax.random.normal(jax.random.key(2), (64, 1, 64), jnp.float32)
    k, v = project_heads(c, mla.kv_b_proj, (128, 128), rope)
    whole = project(c, mla.kv_b_proj).reshape(64, cfg.num_attention_heads, 256)
    assert k.shape == (64, cfg.num_attention_heads, 192) and v.shape == (64, cfg.num_attention_heads, 128)
    np.testing.assert_allclose(np.asarray(k[..., :128]), np.asarray(whole[..., :128]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(k[..., 128:]), np.broadcast_to(np.asarray(rope), (64, 4, 64)))
    np.testing.assert_allclose(np.asarray(v), np.asarray(whole[..., 128:]), rtol=1e-6, atol=1e-6)


def test_fp8_kernel_writes_k_nope_where_it_lies_in_k(monkeypatch):
    """On the kernel path (forced on CPU, the kernel interpreted), kv_b's k_nope GEMM writes each head's 128
    columns into the [T, H, 128 + rope] k and the rope key is written in place after them: the compiled MLA has no
    concatenation at the q/k head width, and k and v equal the reference path's (dequantized operands) within bf16
    rounding, the rope columns exactly."""
    from dwdp_jax.kernels import dense_fp8
    from tests.test_dense_fp8 import SMALL

    cfg = C.tiny(dtype="bfloat16", fp8_dense=True, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=256)
    t, h, r = 256, cfg.num_attention_heads, cfg.qk_rope_head_dim
    mla = MLA(cfg, nnx.Rngs(0))
    c = jax.random.normal(jax.random.key(1), (t, cfg.kv_lora_rank), jnp.bfloat16)
    rope = jax.random.normal(jax.random.key(2), (t, 1, r), jnp.bfloat16)
    want_k, want_v = project_heads(c, mla.kv_b_proj, (128, 128), rope)
    interpreted = dense_fp8.block_scaled_gemm
    # the kernel where K is whole scale blocks, as on Hopper (the tiny hidden size is not)
    monkeypatch.setattr(dense_fp8, "on_kernel", lambda x, w: w.values_GNK.shape[1] % fp8.BLOCK == 0)
    monkeypatch.setattr(dense_fp8, "block_scaled_gemm",
                        lambda *a, **kw: interpreted(*a, **kw, blocks=SMALL, interpret=True))
    k, v = jax.jit(lambda c, r: project_heads(c, mla.kv_b_proj, (128, 128), r))(c, rope)
    assert k.shape == (t, h, 128 + r) and v.shape == (t, h, 128)
    np.testing.assert_array_equal(np.asarray(k[..., 128:], np.float32),
                                  np.broadcast_to(np.asarray(rope, np.float32), (t, h, r)))
    for got, want in ((k[..., :128], want_k[..., :128]), (v, want_v)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    graph, state = nnx.split(mla)
    ids, pos = jnp.zeros((t,), jnp.int32), jnp.arange(t, dtype=jnp.int32)
    x = jnp.ones((t, cfg.hidden_size), jnp.bfloat16)
    hlo = jax.jit(lambda s, x: nnx.merge(graph, s)(x, ids, pos)).lower(state, x).as_text()
    assert not re.findall(rf"tensor<{t}x{h}x{cfg.qk_head_dim}x\w+>.*concatenate|concatenate.*"
                          rf"tensor<{t}x{h}x{cfg.qk_head_dim}x", hlo)
