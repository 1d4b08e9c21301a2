"""The one-pass activation quantization kernel (`fp8_rows`): in Pallas interpret mode on CPU against
`fp8.quantize_rows` (byte for byte), its refusals, its lowering for CUDA, the MoE quantizing each token once before
the copy into expert order; on a GPU (`-m gpu`), the compiled kernel at R1's shapes and the dispatch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import fp8, fp8_rows
from models import deepseek_v3
from models.config import tiny
from models.experts import ExpertView


def _rows(m: int, k: int, dtype=jnp.bfloat16, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp(3 * rng.standard_normal((m, 1)))
    x[3] = 0.0  # a row of zero groups: scale floor, values 0
    x[5, :128] = 448.0 * 2.0**-140  # a group whose scale underflows to the floor
    return jnp.asarray(x, dtype)


def _assert_same(got, want):
    (q, s), (rq, rs) = got, want
    assert q.dtype == fp8.E4M3 and s.dtype == jnp.float32 and q.shape == rq.shape and s.shape == rs.shape
    np.testing.assert_array_equal(np.asarray(q.view(jnp.uint8)), np.asarray(rq.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))


@pytest.mark.parametrize("m,k,dtype,block_m", [(200, 384, jnp.bfloat16, 64), (64, 128, jnp.float32, 16),
                                               (37, 256, jnp.float16, 32)])
def test_kernel_bytes_equal_the_reference(m, k, dtype, block_m):
    """Rows not a multiple of the row block (the last block masked), several column groups, bf16/fp16/fp32 in."""
    x = _rows(m, k, dtype)
    _assert_same(fp8_rows.quantize_rows_kernel(x, block_m=block_m, interpret=True), fp8.quantize_rows(x))


def test_kernel_refusals():
    with pytest.raises(ValueError, match="K=200 must be a multiple of 128"):
        fp8_rows.quantize_rows_kernel(jnp.zeros((8, 200), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        fp8_rows.quantize_rows_kernel(jnp.zeros((8, 128), jnp.bfloat16), block_m=48, interpret=True)


def test_dispatch_off_gpu_is_the_reference_and_the_kernel_lowers_for_cuda():
    x = _rows(96, 256)
    assert not fp8_rows.on_kernel(x)  # CPU
    _assert_same(fp8_rows.quantize_rows(x), fp8.quantize_rows(x))
    text = jax.jit(fp8_rows.quantize_rows_kernel).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "quantize_rows_fp8" in text


def test_fp8_tensor_cores_by_compute_capability():
    """The kernel needs FP8 conversions (compute capability >= 8.9, `fp8.has_fp8_tensor_cores`, whose card table
    `test_context_bench_validation` checks); CPUs, GPUs of unknown capability and older ones go to XLA."""
    from types import SimpleNamespace

    x = jnp.zeros((8, 128), jnp.bfloat16)
    for platform, cc, ok in (("gpu", "9.0", True), ("gpu", "8.9", True), ("gpu", "10.0", True), ("gpu", "8.0", False),
                             ("gpu", None, False), ("cpu", None, False)):
        device = SimpleNamespace(platform=platform, compute_capability=cc)
        assert fp8.has_fp8_tensor_cores(device) is ok and fp8_rows.on_kernel(x, device) is ok
    assert not fp8_rows.on_kernel(jnp.zeros((8, 200), jnp.bfloat16), SimpleNamespace(platform="gpu",
                                                                                       compute_capability="9.0"))


def test_the_moe_copies_quantized_tokens_into_expert_order():
    """FP8 experts on a split backend: each token quantized once, the copy into expert order moves e4m3 rows (one
    byte an element, gathered as words; the only bf16 row gather is the combine's), and the result is the reference
    path's."""
    cfg = tiny(hidden_size=256, moe_intermediate_size=128, fp8_experts=True, dtype="bfloat16")
    slab = deepseek_v3.init_expert_slab(cfg, jax.random.key(0))
    slabs = (slab.rows(0, 3), slab.rows(3, cfg.n_routed_experts))
    x = _rows(64, 256)
    ids = jax.random.randint(jax.random.key(2), (64, 2), 0, cfg.n_routed_experts)
    weights = jnp.full((64, 2), 0.5, jnp.float32)
    view = ExpertView(slabs, cfg.n_routed_experts, "pallas_split_interpret")
    assert view.quantizes_tokens and not ExpertView(slabs, cfg.n_routed_experts, "xla").quantizes_tokens
    text = jax.jit(lambda v, *args: v(*args)).lower(view, x, ids, weights).as_text()
    rows = re.findall(r"stablehlo\.gather.*-> tensor<(\d+)x(\d+)x(\w+)>", text)
    into_order = [(width, dtype) for n, width, dtype in rows if int(width) > 1 and dtype != "f32" and int(n) != 64 * 2]
    # the copy into expert order moves 256 e4m3 bytes a row as 64 words; the combine gathers T*K bf16 output rows
    assert into_order == [("64", "ui32")] and ("128", "256", "bf16") in rows, rows
    want = ExpertView(slabs, cfg.n_routed_experts, "xla")(x, ids, weights)
    ours = view(x, ids, weights)
    err = float(jnp.linalg.norm((ours - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
    assert err <= 1e-3  # bf16 outputs of the same quantized operands


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(262144, 2048), (32768, 7168), (4099, 16384)])
def test_compiled_kernel_at_r1_shapes(m, k):
    """On the GPU: e4m3 values equal the reference's but for a division rounded differently (<= 1e-4 of them,
    one e4m3 step apart), scales equal; the dispatch takes the kernel."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    x = _rows(m, k)
    (q, s), (rq, rs) = fp8_rows.quantize_rows_kernel(x), jax.jit(fp8.quantize_rows)(x)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    qf, rqf = np.asarray(q.astype(jnp.float32)), np.asarray(rq.astype(jnp.float32))
    differ = qf != rqf
    assert differ.mean() <= 1e-4
    step = np.abs(rqf) * 2.0**-3 + 2.0**-9  # one e4m3 step at the value (normal range) or the subnormal step
    assert (np.abs(qf - rqf)[differ] <= step[differ]).all()
    assert fp8_rows.on_kernel(x)
    assert "quantize_rows_fp8" in jax.jit(fp8_rows.quantize_rows).lower(x).as_text()


@pytest.mark.parametrize("module,needs", [("experiments.bench_fp8_rows", "an NVIDIA GPU with FP8"),
                                          ("experiments.bench_fp8_dense", "a Hopper GPU")])
def test_fp8_benchmarks_refuse_a_cpu_before_any_work(module, needs, tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-m", module, f"--results={tmp_path}"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 2 and f"needs {needs}" in done.stderr, done.stderr[-2000:]
    assert not any(tmp_path.iterdir())
