"""RMSNorm fused with the FP8 row quantization (`norm_rows`): the kernel in Pallas interpret mode on CPU against
`fp8.quantize_rows(rms_norm(x))` (byte for byte with XLA's excess precision off, within the quantization's own
error with it on), its refusals and lowering for CUDA, the model's `fp8_fused_norm`; on a GPU (`-m gpu`) the
compiled kernel at R1's widths."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.kernels import dense_fp8, fp8, fp8_rows, norm_rows
from models import deepseek_v3
from models.config import tiny


def _rows(m: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp(2 * rng.standard_normal((m, 1)))
    x[1] = 0.0  # a zero row: the norm's eps alone, every group at the scale floor
    w = 1 + 0.3 * rng.standard_normal(k)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)


def _dequantized(q, s) -> np.ndarray:
    return np.asarray(fp8.dequantize_rows(q, s), np.float64)


def test_row_chunks_are_power_of_two_runs():
    assert norm_rows.chunks(56) == [(0, 32), (32, 16), (48, 8)]  # R1's hidden size, 7168
    assert norm_rows.chunks(12) == [(0, 8), (8, 4)] and norm_rows.chunks(4) == [(0, 4)]


def test_kernel_bytes_equal_the_unfused_path_at_the_input_dtypes_precision():
    """With XLA keeping every bf16 rounding (`--xla_allow_excess_precision=false`, as Triton does), the interpreted
    kernel's e4m3 values and scales equal the norm's rows quantized, at R1's width (runs of 32, 16 and 8 groups)
    and at 3 groups, a zero row among them."""
    script = textwrap.dedent("""
        import numpy as np, jax.numpy as jnp
        from dwdp_jax.kernels import fp8, norm_rows
        from tests.test_norm_rows import _rows
        for m, k in ((6, 7168), (37, 384)):
            x, w = _rows(m, k)
            q, s = norm_rows.rms_norm_quantized_kernel(x, w, eps=1e-6, interpret=True)
            rq, rs = fp8.quantize_rows(norm_rows.rms_norm(x, w, 1e-6))
            assert q.shape == (m, k) and s.shape == (k // 128, m), (q.shape, s.shape)
            np.testing.assert_array_equal(np.asarray(q.view(jnp.uint8)), np.asarray(rq.view(jnp.uint8)))
            np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
        print("equal")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_allow_excess_precision=false", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "equal" in done.stdout, done.stderr[-3000:]


def test_kernel_is_as_accurate_as_the_unfused_path():
    """At XLA's default precision the interpreter keeps the normed rows in fp32 where Triton rounds them: some
    e4m3 values land one step away, and the dequantized rows are as close to the norm's exact rows as the unfused
    path's."""
    x, w = _rows(64, 1024)
    exact = np.asarray(norm_rows.rms_norm(x, w, 1e-6), np.float64)
    fused = _dequantized(*norm_rows.rms_norm_quantized_kernel(x, w, eps=1e-6, interpret=True))
    unfused = _dequantized(*fp8.quantize_rows(norm_rows.rms_norm(x, w, 1e-6)))
    err_fused, err_unfused = (np.linalg.norm(a - exact) / np.linalg.norm(exact) for a in (fused, unfused))
    assert 0 < err_unfused < 0.04 and err_fused <= 1.01 * err_unfused
    assert np.linalg.norm(fused - unfused) / np.linalg.norm(unfused) < 0.02


def test_refusals_and_the_dispatch_off_gpu():
    x, w = _rows(8, 256)
    with pytest.raises(ValueError, match="K=200 must be a multiple of 128"):
        norm_rows.rms_norm_quantized_kernel(jnp.zeros((8, 200), jnp.bfloat16), jnp.ones(200, jnp.bfloat16), eps=1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[256\] of x's dtype bfloat16, got \[256\] float32"):
        norm_rows.rms_norm_quantized_kernel(x, w.astype(jnp.float32), eps=1e-6)
    q, s = norm_rows.rms_norm_quantized(x, w, 1e-6)  # CPU: the norm, then the rows quantized
    rq, rs = fp8.quantize_rows(norm_rows.rms_norm(x, w, 1e-6))
    np.testing.assert_array_equal(np.asarray(q.view(jnp.uint8)), np.asarray(rq.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))


def test_kernel_lowers_for_cuda_at_r1_width():
    x = jax.ShapeDtypeStruct((32768, 7168), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((7168,), jnp.bfloat16)
    fn = jax.jit(lambda x, w: norm_rows.rms_norm_quantized_kernel(x, w, eps=1e-6))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "rms_norm_quantize_rows_fp8" in text


def _attention(monkeypatch, fused: bool, fused_norm=None):
    """One FP8 layer's attention with the block-scaled kernel path forced on CPU for inputs of whole 128-wide groups
    (its GEMM the fp32 product of the quantized operands), and `fused_norm` in place of
    `norm_rows.rms_norm_quantized` if given."""
    cfg = tiny(hidden_size=256, q_lora_rank=128, dtype="bfloat16", fp8_dense=True, fp8_fused_norm=fused)
    layer = deepseek_v3.DecoderLayer(cfg, moe=False, rngs=nnx.Rngs(0))
    x, w = _rows(40, 256, seed=3)
    layer.input_layernorm.weight[...] = w  # not its initial ones: the weight multiply rounds

    def gemm(x_q, x_s, w, out_dtype=jnp.bfloat16, **_):
        w32 = fp8.dequantize_weights(w.values_GNK[None], w.scales_GRS[None])[0]
        return (fp8.dequantize_rows(x_q, x_s) @ w32.T).astype(out_dtype)

    monkeypatch.setattr(dense_fp8, "on_kernel", lambda x, w, device=None: x.shape[-1] % fp8.BLOCK == 0)
    monkeypatch.setattr(dense_fp8, "block_scaled_gemm", gemm)
    if fused_norm:
        monkeypatch.setattr(norm_rows, "rms_norm_quantized", fused_norm)
    seg, pos = jnp.zeros(40, jnp.int32), jnp.arange(40, dtype=jnp.int32)
    return np.asarray(layer.attention(x, seg, pos), np.float64)


def test_fused_norm_in_the_model(monkeypatch):
    """`fp8_fused_norm`: the input norm's rows reach MLA's FP8 projections quantized with the norm, the same
    output as the norm then the quantization (their reference arithmetic on CPU), within the quantization's
    error with the kernel itself (interpreted); off (the ablation), the fused function is never called; on by
    default."""
    reference, calls = norm_rows.rms_norm_quantized, []

    def spy(x, w, eps):
        calls.append(x.shape)
        return reference(x, w, eps)

    unfused = _attention(monkeypatch, False, spy)
    assert not calls
    np.testing.assert_array_equal(_attention(monkeypatch, True, spy), unfused)
    assert calls == [(40, 256)]
    kernel = _attention(monkeypatch, True, lambda x, w, eps: norm_rows.rms_norm_quantized_kernel(
        x, w, eps=eps, interpret=True))
    assert 0 < np.linalg.norm(kernel - unfused) / np.linalg.norm(unfused) < 1e-2
    assert tiny().fp8_fused_norm


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(32768, 7168), (4096 + 77, 1536)])
def test_compiled_kernel_at_r1_widths(m, k):
    """The compiled kernel at the input norm's width (7168) and q_a's (1536) against the unfused path: as close to
    the norm's rows as XLA computes them (which may skip a bf16 rounding the kernel makes) within 5% of the
    unfused path's quantization error, the e4m3 bytes mostly equal."""
    if not fp8.has_fp8_tensor_cores(jax.devices()[0]):
        pytest.skip("needs a GPU with FP8 conversion")
    x, w = _rows(m, k, seed=4)
    q, s = norm_rows.rms_norm_quantized_kernel(x, w, eps=1e-6)
    rq, rs = fp8.quantize_rows(norm_rows.rms_norm(x, w, 1e-6))
    exact = np.asarray(norm_rows.rms_norm(x, w, 1e-6), np.float64)
    err_fused, err_unfused = (np.linalg.norm(_dequantized(a, b) - exact) / np.linalg.norm(exact)
                              for a, b in ((q, s), (rq, rs)))
    assert err_fused <= 1.05 * err_unfused
    assert (np.asarray(q.view(jnp.uint8)) == np.asarray(rq.view(jnp.uint8))).mean() > 0.95


@pytest.mark.gpu
def test_fused_norm_in_the_r1_layer():
    """At R1's widths on the compiled kernels, 4096 tokens of one sequence: the layer's own input rows quantized with
    the norm equal the two passes' bytes but for rare ones (H100: 3 of 29.4M), the scales all, and the layer's
    attention output is the unfused one's within 1e-4 (H100: equal)."""
    if not fp8.has_fp8_tensor_cores(jax.devices()[0]):
        pytest.skip("needs a GPU with FP8 conversion")
    from dwdp_jax.runtime import stages
    from models.config import get_preset
    from models.deepseek_v3 import DeepseekV3
    cfg = get_preset("deepseek_r1_released", num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    model = stages.with_attention_impl(DeepseekV3(cfg, nnx.Rngs(0)), "hopper")
    layer, t = model.layers[0], 4096
    x = model.embed(jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, t), jnp.int32))
    w = layer.input_layernorm.weight[...]
    q, s = norm_rows.rms_norm_quantized(x, w, cfg.rms_norm_eps)
    rq, rs = jax.jit(lambda x: fp8_rows.quantize_rows(norm_rows.rms_norm(x, w, cfg.rms_norm_eps)))(x)  # the model's
    assert (np.asarray(q.view(jnp.uint8)) != np.asarray(rq.view(jnp.uint8))).mean() < 1e-5
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    seg, pos = jnp.zeros(t, jnp.int32), jnp.arange(t, dtype=jnp.int32)

    def attention(fused: bool) -> np.ndarray:
        layer.self_attn.cfg = cfg.replace(fp8_fused_norm=fused)
        graphdef, state = nnx.split(layer)
        return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s).attention(x, seg, pos))(state, x), np.float64)

    assert layer.self_attn.takes_quantized(x)
    fused, unfused = attention(True), attention(False)
    assert np.linalg.norm(fused - unfused) / np.linalg.norm(unfused) <= 1e-4
