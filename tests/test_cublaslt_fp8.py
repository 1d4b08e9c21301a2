"""The block-scaled dense FP8 GEMM on cuBLASLt (`cublaslt_fp8`): on CPU, its refusals (each operand's shape and
dtype, no Hopper GPU) before any device work and the weight scales' padding to cuBLAS's layout; on a Hopper GPU
(`-m gpu`), the product against the fp64 one of the same quantized operands at R1's projection shapes, kv_a's
partial output block and a K of 5 scale blocks (padded to 8) included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dense_fp8 import _exact, _operands, _rel

from dwdp_jax.kernels import cublaslt_fp8, dense_fp8, fp8, tuning


def _quantized(t: int, k: int, n: int, seed: int = 0):
    x, w = _operands(seed, t, k, n)
    return (*fp8.quantize_rows(x), w)


def test_bad_operands_are_refused_naming_the_operand():
    x_q, x_s, w = _quantized(256, 384, 192)
    assert cublaslt_fp8.check_operands(x_q, x_s, w) == (256, 384, 192)
    cases = {
        "x must be e4m3": (x_q.astype(jnp.bfloat16), x_s, w),
        "K must be a positive multiple of 128": (x_q[:, :200], x_s, w),
        "T must be a positive multiple of 4": (x_q[:254], x_s[:, :254], w),
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


def test_plans_take_a_handle_per_device_and_a_plan_per_device_and_shape():
    """One process drives a program per GPU: a handle made on one device must not launch on another, so each
    device gets its own, made in its first call there, and its plans are built with it."""
    device, handles = [0], []

    def create_handle():
        handles.append(100 + len(handles))
        return handles[-1]

    plans = cublaslt_fp8.Plans(create_handle, lambda handle, *shape: (handle, *shape), lambda: device[0])
    first = plans.get(256, 384, 192, 11, 12)
    assert first == (100, 256, 384, 192, 11, 12) and plans.get(256, 384, 192, 21, 22) is first
    device[0] = 1
    assert plans.get(256, 384, 192, 31, 32) == (101, 256, 384, 192, 31, 32)
    assert plans.get(128, 384, 192, 41, 42)[0] == 101
    device[0] = 0
    assert plans.get(128, 384, 192, 51, 52)[0] == 100 and plans.get(256, 384, 192, 0, 0) is first
    assert handles == [100, 101] and len(plans.plans) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,n", [(4096 + 76, 7168, 576), (4096, 1536, 3072), (2048 + 128, 16384, 1024),
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


class _Card:
    device_kind, platform = "NVIDIA H200", "gpu"


def _record_rates(kind: str, k: int, width: int, rows: int, mosaic: float, library: float) -> None:
    tuning.record(dense_fp8.NAME_TUNED, kind, k, width, False, rows, dense_fp8.default_blocks(k), mosaic, "t")
    tuning.record(cublaslt_fp8.KERNEL, kind, k, width, False, rows, cublaslt_fp8.Blocks(), library, "t")


def test_dense_fp8_takes_cublaslt_only_where_its_recorded_rate_is_higher(tmp_path, monkeypatch):
    """`dense_fp8.library_faster`: the two entries of this card, K and padded width (kv_a's 576 under 640), nearest
    in rows, compared; no entry of cuBLASLt, another card, or cuBLASLt unavailable: the Mosaic GPU kernel."""
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    card = _Card()
    monkeypatch.setattr(cublaslt_fp8, "unavailable", lambda device=None: None)
    assert not dense_fp8.library_faster(7168, 576, 32768, card)
    _record_rates(card.device_kind, 7168, 640, 32768, 900.0, 1100.0)
    _record_rates(card.device_kind, 16384, 7168, 32768, 1200.0, 1100.0)
    assert dense_fp8.library_faster(7168, 576, 30000, card)
    assert not dense_fp8.library_faster(7168, 576, 30001, card)  # rows not a multiple of 4: the kernel
    assert not dense_fp8.library_faster(16384, 7168, 32768, card)
    other = type("Other", (_Card,), {"device_kind": "NVIDIA H100 80GB HBM3"})()
    assert not dense_fp8.library_faster(7168, 576, 32768, other)
    monkeypatch.setattr(cublaslt_fp8, "unavailable", lambda device=None: "no cuBLASLt")
    assert not dense_fp8.library_faster(7168, 576, 32768, card)


def test_dense_fp8_dispatch_to_cublaslt_only_for_plain_bf16_products(monkeypatch):
    """Where cuBLASLt is faster, `block_scaled_gemm` hands it the operands unchanged, unless blocks are named (the
    benchmark's kernel cases), the output is spread or not bf16, or the kernel is interpreted."""
    x_q, x_s, w = _quantized(256, 384, 256)
    calls = []
    monkeypatch.setattr(dense_fp8, "library_faster", lambda k, n, rows: (k, n, rows) == (384, 256, 256))
    monkeypatch.setattr(cublaslt_fp8, "block_scaled_gemm", lambda *ops: calls.append(ops) or "cublaslt")
    assert dense_fp8.block_scaled_gemm(x_q, x_s, w) == "cublaslt" and calls[0] == (x_q, x_s, w)
    monkeypatch.setattr(dense_fp8, "split_ragged_dot_fp8_mgpu", lambda *a, **kw: calls.append("mosaic") or
                        jnp.zeros((256, 256), kw["out_dtype"]))
    for kwargs in ({"blocks": dense_fp8.default_blocks(384)}, {"out_dtype": jnp.float32}, {"interpret": True},
                   {"out_spread": (128, 256)}):
        dense_fp8.block_scaled_gemm(x_q, x_s, w, **kwargs)
    assert calls[1:] == ["mosaic"] * 4


@pytest.mark.gpu
def test_gpu_dense_fp8_on_cublaslt_where_recorded_faster(tmp_path, monkeypatch):
    """With a cache recording cuBLASLt faster at this shape, the model's `dense_fp8.linear` gives cuBLASLt's output
    bit for bit, within 2e-3 of the fp64 product; the Mosaic GPU kernel's within the same bound."""
    reason = cublaslt_fp8.unavailable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    x, w = _operands(5, 2048, 1536, 576)
    x = x.astype(jnp.bfloat16)
    mosaic = jax.jit(dense_fp8.linear)(x, w)
    _record_rates(jax.devices()[0].device_kind, 1536, 640, 2048, 1.0, 2.0)
    jax.clear_caches()
    out = jax.jit(dense_fp8.linear)(x, w)
    lib = jax.jit(cublaslt_fp8.block_scaled_gemm)(*fp8.quantize_rows(x), w)
    assert (np.asarray(out.astype(jnp.float32)) == np.asarray(lib.astype(jnp.float32))).all()
    exact = _exact(*fp8.quantize_rows(x), w)
    assert _rel(out, exact) < 2e-3 and _rel(mosaic, exact) < 2e-3


@pytest.mark.gpu
def test_gpu_benchmark_case_times_the_checked_product():
    """`gpu_bench.cublaslt_case`, the benchmarks' reference: its error against the fp32 product is bf16 rounding
    and its case computes the same output, at 2 T K N FLOPs; past the bound, no case and the reason."""
    reason = cublaslt_fp8.unavailable()
    if reason:
        pytest.skip(reason)
    from dwdp_jax.measure import gpu_bench

    x_q, x_s, w = _quantized(1024, 1024, 512, seed=6)
    (fn, args, flops), err, why = gpu_bench.cublaslt_case(x_q, x_s, w, 256, 2e-3)
    assert err < 2e-3 and not why and flops == 2 * 1024 * 1024 * 512
    assert _rel(fn(*args), _exact(x_q, x_s, w)) < 2e-3
    case, err_again, why = gpu_bench.cublaslt_case(x_q, x_s, w, 256, err / 2)  # a bound it misses: no case
    assert case is None and err_again == err and "relative error" in why
