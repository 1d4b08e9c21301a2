"""The router's fp32 dot: fp32 products and sums (HF's gate), on bf16 tensor cores for bf16 activations
(`fp32_dot`: a bf16 weight, as R1 stores it, in one pass; an fp32 weight split exactly into three bf16 parts), never
JAX's default precision, which lets NVIDIA GPUs take TF32; `router_precision="tensorfloat32"` is the named ablation;
anything else is refused naming the field."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dwdp_jax.kernels import fp32_dot
from models import config as C
from models.deepseek_v3 import Router


def _router_dots(cfg, dtype) -> list[str]:
    """(operand types, precision) of each dot_general in the router's lowered program."""
    graph, state = nnx.split(Router(cfg, nnx.Rngs(0)))
    x = jnp.ones((16, cfg.hidden_size), dtype)
    text = jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, x).as_text()
    dots = []
    for line in (line for line in text.splitlines() if "dot_general" in line):
        precision = re.search(r"precision = \[(\w+),", line)
        dots.append((re.search(r": \((tensor<[^)]*)\)", line).group(1), precision.group(1) if precision else ""))
    return dots


def test_the_weight_splits_exactly_into_three_bf16_parts():
    rng = np.random.default_rng(0)
    # magnitudes from 2^-100 up (below 2^-102 the third part would be an fp32 subnormal, which XLA flushes)
    w = (rng.choice([-1.0, 1.0], (64, 32)) * rng.uniform(1, 2, (64, 32))
         * 2.0 ** rng.integers(-100, 100, (64, 32))).astype(np.float32)
    parts = fp32_dot.split_bf16(jnp.asarray(w))
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    total = np.asarray(parts[0], np.float64) + np.asarray(parts[1], np.float64) + np.asarray(parts[2], np.float64)
    np.testing.assert_array_equal(total, w.astype(np.float64))


def _operands(seed: int, w_dtype, t: int = 128, d: int = 512, e: int = 64):
    """bf16 activations [t, d], a weight [d, e] in `w_dtype` and their float64 product."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((d, e)) * 0.05, w_dtype)
    return x, w, np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def _rel(a, b) -> float:
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_bf16_activations_get_the_fp32_product():
    x, w, exact = _operands(1, jnp.float32)
    assert _rel(fp32_dot.dot_f32(x, w), exact) < 1e-6
    # a single bf16 pass (the weight rounded) is three orders of magnitude off
    assert _rel(jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32), exact) > 1e-3


def test_a_bf16_weight_takes_one_pass_with_the_same_exact_products():
    x, w, exact = _operands(2, jnp.bfloat16)
    one = fp32_dot.dot_f32(x, w)
    assert _rel(one, exact) < 1e-6
    three = np.asarray(fp32_dot.dot_f32(x, w.astype(jnp.float32)), np.float64)  # split: two parts of zeros
    assert _rel(one, three) < 1e-6
    [dot] = [line for line in jax.jit(fp32_dot.dot_f32).lower(x, w).as_text().splitlines() if "dot_general" in line]
    assert "tensor<512x64xbf16>" in dot and "-> tensor<128x64xf32>" in dot


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16_one_pass", "fp32_three_parts"])
def test_the_fp32_dot_on_the_gpu_at_r1s_router_shape(w_dtype):
    """On the GPU's tensor cores (bf16 GEMMs accumulating in fp32): R1's router logits, 4096 tokens x 7168 x 256
    experts, within 1e-5 of float64 for the weight in bf16 (one pass) and in fp32 (three parts). fp32 sums of exact
    products land near 1e-7; inputs rounded to TF32 or bf16 land near 1e-3."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    x, w, exact = _operands(3, w_dtype, t=4096, d=7168, e=256)
    assert _rel(jax.jit(fp32_dot.dot_f32)(x, w), exact) < 1e-5


def test_the_router_takes_tensor_cores_in_fp32_and_tf32_only_as_the_ablation():
    cfg = C.tiny()
    assert cfg.router_precision == "float32" and cfg.router_dtype == "bfloat16"  # R1's gate as the checkpoint has it
    e = cfg.n_routed_experts
    [(types, precision)] = _router_dots(cfg, jnp.bfloat16)
    assert types.endswith(f"x{e}xbf16>") and precision in ("", "DEFAULT")  # one bf16 pass
    [(types, precision)] = _router_dots(dataclasses.replace(cfg, router_dtype="float32"), jnp.bfloat16)
    assert types.endswith(f"x{3 * e}xbf16>") and precision in ("", "DEFAULT")  # the three-part split
    [(types, precision)] = _router_dots(cfg, jnp.float32)
    assert "bf16" not in types and precision == "HIGHEST"
    [(types, precision)] = _router_dots(dataclasses.replace(cfg, router_precision="tensorfloat32"), jnp.bfloat16)
    assert "bf16" not in types and precision == "HIGH"


def test_an_unknown_router_precision_or_dtype_is_refused():
    with pytest.raises(ValueError, match=r"router_precision must be one of \('float32', 'tensorfloat32'\)"):
        dataclasses.replace(C.tiny(), router_precision="bfloat16")
    with pytest.raises(ValueError, match=r"router_dtype must be one of float32, bfloat16, float16, got 'float8'"):
        dataclasses.replace(C.tiny(), router_dtype="float8")


@pytest.mark.gpu
def test_gpu_tests_compute_their_oracles_at_full_fp32():
    """`conftest`: every GPU-marked test runs with fp32 dots at full precision (its XLA oracles), checked here on
    any platform; CPU-only tests keep JAX's default."""
    assert jax.config.jax_default_matmul_precision == "float32"


def test_cpu_tests_keep_the_default_matmul_precision():
    assert jax.config.jax_default_matmul_precision is None
