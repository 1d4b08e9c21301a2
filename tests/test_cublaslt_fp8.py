"""The block-scaled dense FP8 GEMM on cuBLASLt (`cublaslt_fp8`): on CPU, its refusals (each operand's shape and
dtype, no Hopper GPU) before any device work and the weight scales' padding to cuBLAS's layout; on a Hopper GPU
(`-m gpu`), the product against the fp64 one of the same quantized operands at R1's projection shapes, kv_a's
partial output block and a K of 5 scale blocks (padded to 8) included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dense_fp8 import _exact, _operands, _rel

from dwdp_jax.kernels import cublaslt_fp8, fp8


def _quantized(t: int, k: int, n: int, seed: int = 0):
    x, w = _operands(seed, t, k, n)
    return (*fp8.quantize_rows(x), w)


def test_bad_operands_are_refused_naming_the_operand():
    x_q, x_s, w = _quantized(256, 384, 192)
    assert cublaslt_fp8.check_operands(x_q, x_s, w) == (256, 384, 192)
    cases = {
        "x must be e4m3": (x_q.astype(jnp.bfloat16), x_s, w),
        "K must be a positive multiple of 128": (x_q[:, :200], x_s, w),
        r"x_scale must be float32 \[K/128, T\]": (x_q, x_s.T, w),
        "x_scale must be float32": (x_q, x_s.astype(jnp.bfloat16), w),
        "the weight must be e4m3": (x_q, x_s, fp8.BlockScaled(w.values_GNK[:, :128], w.scales_GRS)),
        "N must be a positive multiple of 8": (x_q, x_s, fp8.BlockScaled(w.values_GNK[:190], w.scales_GRS)),
        r"the weight's scales must be float32 \[N/128, K/128\]": (x_q, x_s, fp8.BlockScaled(w.values_GNK,
                                                                                           w.scales_GRS.T)),
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=message):
            cublaslt_fp8.check_operands(*args)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="the refusal off a GPU")
def test_off_a_gpu_the_gemm_is_refused_before_device_work():
    assert "needs a Hopper GPU" in cublaslt_fp8.unavailable()
    with pytest.raises(ValueError, match="cublaslt_fp8: needs a Hopper GPU"):
        cublaslt_fp8.block_scaled_gemm(*_quantized(128, 256, 128))


def test_weight_scales_padded_to_four_k_blocks_with_zeros():
    s = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5) + 1
    padded = np.asarray(cublaslt_fp8.padded_weight_scales(s))
    assert padded.shape == (2, 8) and (padded[:, :5] == np.asarray(s)).all() and not padded[:, 5:].any()
    assert cublaslt_fp8.padded_weight_scales(s[:, :4]).shape == (2, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,n", [(4096 + 77, 7168, 576), (4096, 1536, 3072), (2048 + 128, 16384, 1024),
                                   (1024, 640, 256)], ids=["kv_a", "q_b_part", "o_part", "k_5_blocks"])
def test_gpu_product_is_the_exact_one_up_to_bf16(t, k, n):
    """Against the fp64 product of the same quantized operands: relative error < 2e-3 (bf16 output), with
    scales spread over two decades per row and per weight row, so a scale read from the wrong place shows."""
    reason = cublaslt_fp8.unavailable()
    if reason:
        pytest.skip(reason)
    x_q, x_s, w = _quantized(t, k, n, seed=4)
    out = jax.jit(cublaslt_fp8.block_scaled_gemm)(x_q, x_s, w)
    assert out.shape == (t, n) and out.dtype == jnp.bfloat16
    assert _rel(out, _exact(x_q, x_s, w)) < 2e-3
