"""The grouped GEMM benchmarks' oracle (`gpu_bench.grouped_rel_err`) on CPU: against a float64 numpy product of
every row, it samples every group (first and last rows included), sees an error in a sampled row, and never reads
past a group's rows; the GPU tests' full product built the same way (`gpu_bench.exact_ragged_dot`)."""

import numpy as np
import pytest

from dwdp_jax.measure import gpu_bench

SIZES = np.array([300, 0, 5, 1, 130, 64])  # an empty group, groups of 1 and of fewer rows than sampled


def _operands(seed=0, k=256, n=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(SIZES.sum()), k)).astype(np.float32)
    w = (0.05 * rng.standard_normal((len(SIZES), k, n))).astype(np.float32)
    exact = np.concatenate([x[a:b].astype(np.float64) @ w[g] for g, a, b in gpu_bench.group_spans(SIZES)])
    return x, w, exact


def test_every_group_is_sampled_with_its_first_and_last_row():
    idx = gpu_bench.sampled_group_rows(SIZES, per_group=16)
    ends = np.cumsum(SIZES)
    for g, (size, end) in enumerate(zip(SIZES, ends)):
        rows = idx[g][idx[g] >= 0]
        assert len(rows) == min(size, 16)
        if size:
            assert rows[0] == end - size and rows[-1] == end - 1
            assert ((rows >= end - size) & (rows < end)).all() and len(set(rows)) == len(rows)
    with pytest.raises(ValueError, match="per_group must be >= 2"):
        gpu_bench.sampled_group_rows(SIZES, per_group=1)


def test_the_exact_product_has_fp32_error_and_a_wrong_sampled_row_shows():
    x, w, exact = _operands()
    out = exact.astype(np.float32)
    # fp32 products at precision HIGHEST: the float64 product within fp32 rounding over K = 256
    assert gpu_bench.grouped_rel_err(out, x, w, SIZES, per_group=16) < 1e-6
    idx = gpu_bench.sampled_group_rows(SIZES, per_group=16)
    wrong = out.copy()
    wrong[idx[0, 5]] += 1.0  # one sampled row of the first group, off by 1 in every column
    err = gpu_bench.grouped_rel_err(wrong, x, w, SIZES, per_group=16)
    sampled = np.concatenate([exact[r[r >= 0]] for r in idx])
    assert err == pytest.approx(np.sqrt(exact.shape[1]) / np.linalg.norm(sampled), rel=1e-4)


def test_rows_past_the_groups_are_never_compared():
    x, w, exact = _operands(seed=1)
    out = np.concatenate([exact, np.full((7, exact.shape[1]), np.nan, np.float32)]).astype(np.float32)
    x_pad = np.concatenate([x, np.zeros((7, x.shape[1]), np.float32)])
    assert gpu_bench.grouped_rel_err(out, x_pad, w, SIZES, per_group=16) < 1e-6


def test_uniform_noise_reads_the_same_on_samples_as_on_every_row():
    x, w, exact = _operands(seed=2)
    noise = 1e-3 * np.random.default_rng(3).standard_normal(exact.shape) * np.abs(exact)
    full = np.linalg.norm(noise) / np.linalg.norm(exact)
    sampled = gpu_bench.grouped_rel_err((exact + noise).astype(np.float32), x, w, SIZES, per_group=32)
    assert sampled == pytest.approx(full, rel=0.2)


def test_fp8_operands_are_dequantized_as_sampled_and_one_group_at_a_time():
    """FP8 rows (values, scales) and block-scaled weights give the error of their dequantized arrays: the
    reference is the product of the same quantized operands, not of the bf16 ones they came from."""
    import jax.numpy as jnp

    from dwdp_jax.kernels import fp8

    x, w, _ = _operands(seed=4)
    x_q, x_s = fp8.quantize_rows(jnp.asarray(x))
    w_q = fp8.quantize_weights_kn(jnp.asarray(w))
    x_deq, w_deq = np.asarray(fp8.dequantize_rows(x_q, x_s)), np.asarray(fp8.dequantize_weights_kn(*w_q))
    exact = np.concatenate([x_deq[a:b].astype(np.float64) @ w_deq[g] for g, a, b in gpu_bench.group_spans(SIZES)])
    out = exact.astype(np.float32)
    assert gpu_bench.grouped_rel_err(out, (x_q, x_s), w_q, SIZES, per_group=16) < 1e-6
    noisy = (exact * (1 + 1e-3 * np.random.default_rng(5).standard_normal(exact.shape))).astype(np.float32)
    assert gpu_bench.grouped_rel_err(noisy, (x_q, x_s), w_q, SIZES, per_group=16) == pytest.approx(
        gpu_bench.grouped_rel_err(noisy, x_deq, w_deq, SIZES, per_group=16), rel=1e-4)
    # against the unquantized operands the same output reads e4m3's rounding, far above fp32's
    assert gpu_bench.grouped_rel_err(out, x, w, SIZES, per_group=16) > 1e-2


def test_fp8_kernel_error_is_bf16_rounding_against_its_quantized_operands():
    """`fp8_grouped_gemm_error` on the FP8 kernel (Mosaic GPU interpret mode, two slabs of one quantized weight):
    against the product of the same quantized operands within bf16 output rounding (issue 26's 2e-3), against the
    bf16 operands e4m3's rounding."""
    import functools

    from dwdp_jax.kernels.split_gemm_fp8_mgpu import Fp8Blocks, split_ragged_dot_fp8_mgpu

    sizes = np.array([64, 0, 130, 62], np.int32)
    kernel = functools.partial(split_ragged_dot_fp8_mgpu, interpret=True)
    blocks = Fp8Blocks(tile_m=128, tile_n=128, max_concurrent_steps=2, num_sms=1)
    errors = gpu_bench.fp8_grouped_gemm_error(sizes, 256, 128, blocks=blocks, kernel=kernel)
    assert errors["kernel"] < 2e-3
    assert 1e-2 < errors["quantization"] < 1e-1


def test_the_full_product_group_by_group_is_ragged_dot_with_zeros_past_the_groups():
    """Every row's fp32 product with its group's weights (within fp32 rounding of the float64 one), rows past the
    groups 0 as `lax.ragged_dot` leaves them, FP8 operands dequantized first."""
    import jax
    import jax.numpy as jnp

    from dwdp_jax.kernels import fp8

    x, w, exact = _operands(seed=6)
    x_pad = np.concatenate([x, np.full((5, x.shape[1]), 3.0, np.float32)])
    ours = np.asarray(gpu_bench.exact_ragged_dot(x_pad, w, SIZES))
    assert ours.shape == (len(x_pad), w.shape[2]) and not ours[len(x):].any()
    assert np.linalg.norm(ours[:len(x)] - exact) / np.linalg.norm(exact) < 1e-6
    ragged = jax.lax.ragged_dot(jnp.asarray(x_pad), jnp.asarray(w), jnp.asarray(SIZES, jnp.int32),
                                precision=jax.lax.Precision.HIGHEST)
    assert np.linalg.norm(ours - np.asarray(ragged)) / np.linalg.norm(ragged) < 1e-6
    x_q, x_s = fp8.quantize_rows(jnp.asarray(x))
    w_q = fp8.quantize_weights_kn(jnp.asarray(w))
    deq = np.asarray(gpu_bench.exact_ragged_dot(np.asarray(fp8.dequantize_rows(x_q, x_s)),
                                                np.asarray(fp8.dequantize_weights_kn(*w_q)), SIZES))
    assert np.abs(np.asarray(gpu_bench.exact_ragged_dot((x_q, x_s), w_q, SIZES)) - deq).max() == 0


def test_block_scaled_product_is_the_dequantized_float64_product():
    """The dense FP8 benchmarks' oracle: rows and weight dequantized from their scales (partial edge blocks
    included), multiplied in fp32 at HIGHEST precision: within 1e-6 of float64; a perturbed output reads as such."""
    import jax
    import jax.numpy as jnp

    from dwdp_jax.kernels import fp8

    x = jax.random.normal(jax.random.key(3), (200, 384), jnp.float32).astype(jnp.bfloat16)
    x_q, x_s = fp8.quantize_rows(x)
    w = gpu_bench.block_scaled_weight(384, 200)
    assert w.values_GNK.shape == (200, 384) and w.scales_GRS.shape == (2, 3)
    x64 = np.asarray(fp8.dequantize_rows(x_q, x_s), np.float64)
    w64 = np.asarray(fp8.dequantize_weights(w.values_GNK[None], w.scales_GRS[None])[0], np.float64)
    exact = x64 @ w64.T
    got = gpu_bench.block_scaled_product(x_q, x_s, w)
    assert gpu_bench.rel_error(got, exact.astype(np.float32)) < 1e-6
    assert gpu_bench.rel_error(got.at[7].multiply(1.1), exact.astype(np.float32)) > 1e-3
