"""The block-scaled dense FP8 GEMM (`dense_fp8`): on CPU, the Mosaic GPU kernel in interpret mode against the fp64
product of the same quantized operands (an output width of partial blocks, as kv_a's 576, and rows not a multiple
of the tile), the dispatch of `linear` and its refusals; on a GPU (`-m gpu`), the compiled kernel at R1's
projection shapes and the model's `project` on it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import dense_fp8, fp8
from dwdp_jax.measure.kernel_sweeps import swiglu_fp8_candidates

# one CTA, two-row-tile windows: several windows, column blocks and K steps in the interpreter's reach
SMALL = dataclasses.replace(dense_fp8.DEFAULT_DENSE_BLOCKS, max_concurrent_steps=2, num_sms=1, group_m=2)
SMALL_COLS = dataclasses.replace(SMALL, wg_cols=True, out_by_row_block=True)  # 256-column CTA tiles


def _operands(seed: int, t: int, k: int, n: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, k)) * rng.uniform(0.1, 10, (t, 1)), jnp.float32)
    w = fp8.quantize_weights(jnp.asarray(rng.standard_normal((1, n, k)) * rng.uniform(0.01, 1, (1, n, 1))
                                         / np.sqrt(k), jnp.float32))
    return x, fp8.BlockScaled(w.values_GNK[0], w.scales_GRS[0])


def _exact(x_q, x_s, w: fp8.BlockScaled) -> np.ndarray:
    x = np.asarray(fp8.dequantize_rows(x_q, x_s), np.float64)
    return x @ np.asarray(fp8.dequantize_weights(w.values_GNK[None], w.scales_GRS[None])[0], np.float64).T


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("t,k,n,blocks,width", [(300, 256, 192, SMALL, 256), (128, 256, 256, SMALL, 256),
                                                (300, 256, 384, SMALL_COLS, 512), (300, 256, 192, SMALL_COLS, 256)],
                         ids=["partial_block_n", "whole_blocks", "column_halves_padded", "column_halves_partial"])
def test_kernel_matches_the_exact_product(t, k, n, blocks, width):
    """300 rows (3 row tiles, the last cut) x N=192 (a 128 block and a partial one padded with zero rows), and
    whole blocks; on column halves, widths their 256-column CTA tiles do not divide (384: the second tile's upper
    half zero rows; 192); bf16 output against the fp64 product: within bf16 rounding."""
    x, w = _operands(0, t, k, n)
    x_q, x_s = fp8.quantize_rows(x)
    assert dense_fp8.computed_width(n, blocks) == width
    out = dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=blocks, interpret=True)
    assert out.shape == (t, n) and out.dtype == jnp.bfloat16
    assert _rel(out, _exact(x_q, x_s, w)) < 4e-3


def test_linear_off_hopper_is_the_reference_path():
    """On CPU `linear` is `fp8.linear` itself (the kernel is Hopper's), at fp32 and at bf16."""
    x, w = _operands(1, 64, 256, 128)
    assert not dense_fp8.on_kernel(x.astype(jnp.bfloat16), w)
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(np.asarray(dense_fp8.linear(x.astype(dtype), w), np.float32),
                                      np.asarray(fp8.linear(x.astype(dtype), w), np.float32))


def test_stacked_weights_give_each_weights_product(monkeypatch):
    """`linear_stacked` on the kernel path (forced on CPU, the kernel interpreted): q_a-like (256 columns) and
    kv_a-like (200: a partial block padded inside the stack) weights of one input, each output against its own
    fp64 product; off the kernel, `fp8.linear` per weight exactly."""
    x, w_q = _operands(5, 300, 256, 256)
    _, w_kv = _operands(6, 300, 256, 200)
    off = dense_fp8.linear_stacked(x.astype(jnp.bfloat16), (w_q, w_kv))
    for got, w in zip(off, (w_q, w_kv)):
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(fp8.linear(x.astype(jnp.bfloat16), w), np.float32))
    interpreted = dense_fp8.block_scaled_gemm
    monkeypatch.setattr(dense_fp8, "on_kernel", lambda x, w: True)
    monkeypatch.setattr(dense_fp8, "block_scaled_gemm",
                        lambda *a, **kw: interpreted(*a, **kw, blocks=SMALL, interpret=True))
    outs = dense_fp8.linear_stacked(x.astype(jnp.bfloat16), (w_q, w_kv))
    x_q, x_s = fp8.quantize_rows(x.astype(jnp.bfloat16))
    for got, w in zip(outs, (w_q, w_kv)):
        assert got.shape == (300, w.values_GNK.shape[0]) and got.dtype == jnp.bfloat16
        assert _rel(got, _exact(x_q, x_s, w)) < 4e-3


def test_each_weight_its_own_gemm_on_one_quantization(monkeypatch):
    """`linear_each` (MLA's kv_b as k_nope and v): on the kernel path (forced, interpreted) each output against its
    fp64 product, x quantized once; off the kernel `fp8.linear` per weight exactly."""
    x, w_k = _operands(9, 300, 256, 256)
    _, w_v = _operands(10, 300, 256, 128)
    xb = x.astype(jnp.bfloat16)
    for got, w in zip(dense_fp8.linear_each(xb, (w_k, w_v)), (w_k, w_v)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(fp8.linear(xb, w), np.float32))
    interpreted, quantized = dense_fp8.block_scaled_gemm, []
    monkeypatch.setattr(dense_fp8, "on_kernel", lambda x, w: True)
    monkeypatch.setattr(dense_fp8, "block_scaled_gemm", lambda *a, **kw: (
        quantized.append(a[0]), interpreted(*a, **kw, blocks=SMALL, interpret=True))[1])
    outs = dense_fp8.linear_each(xb, (w_k, w_v))
    assert quantized[0] is quantized[1]
    x_q, x_s = fp8.quantize_rows(xb)
    for got, w in zip(outs, (w_k, w_v)):
        assert got.shape == (300, w.values_GNK.shape[0]) and got.dtype == jnp.bfloat16
        assert _rel(got, _exact(x_q, x_s, w)) < 4e-3


def test_spread_output_puts_each_run_where_it_lies():
    """out_spread (128, 200): each 128-column run of the product at the start of a 200-column run (the kernel
    interpreted, its output poisoned by the interpreter or not: only the runs are compared); off the kernel the
    gaps are zeros; spreads a store would cross, or TMA could not address, are refused naming the field."""
    x, w = _operands(11, 300, 256, 384)
    x_q, x_s = fp8.quantize_rows(x)
    out = dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=SMALL, interpret=True, out_spread=(128, 200))
    assert out.shape == (300, 3 * 200)
    assert _rel(out.reshape(300, 3, 200)[..., :128].reshape(300, 384), _exact(x_q, x_s, w)) < 4e-3
    off = dense_fp8.linear_each(x.astype(jnp.bfloat16), (w,), [(128, 200)])[0].reshape(300, 3, 200)
    np.testing.assert_array_equal(np.asarray(off[..., :128].reshape(300, 384), np.float32),
                                  np.asarray(fp8.linear(x.astype(jnp.bfloat16), w), np.float32))
    assert not np.asarray(off[..., 128:], np.float32).any()
    for spread, match in (((96, 200), "part=96 must be a positive multiple of tile_n=128"),
                          ((128, 120), "width=120 must be at least part=128"),
                          ((128, 196), "width=196 .* multiple of 16 bytes")):
        with pytest.raises(ValueError, match=match):
            dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=SMALL, interpret=True, out_spread=spread)
    _, w_200 = _operands(12, 300, 256, 200)
    with pytest.raises(ValueError, match="out_spread needs N=200 in whole 128-row blocks"):
        dense_fp8.block_scaled_gemm(x_q, x_s, w_200, blocks=SMALL, interpret=True, out_spread=(128, 200))
    with pytest.raises(ValueError, match="out_spread needs N=384 in whole CTA column tiles .* compute 512 columns"):
        dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=SMALL_COLS, interpret=True, out_spread=(128, 200))


@pytest.mark.parametrize("k,n", [(1536, 24576), (7168, 576), (512, 32768), (16384, 7168)],
                         ids=["q_b", "kv_a", "kv_b", "o"])
def test_every_benchmarked_candidate_lowers_for_cuda_at_r1_shapes(k, n):
    """Each schedule `bench_fp8_dense --tune` times lowers for CUDA on CPU (Mosaic GPU's layout inference and the
    227 KiB bound) at R1's projections of distinct K and width: 1536, 7168 (576 wide: the column halves over 768),
    512 (the column halves' 4-stage store by row blocks among them) and 16384."""
    from dwdp_jax.measure.kernel_sweeps import dense_fp8_candidates as candidates

    x = jax.ShapeDtypeStruct((4096, k), fp8.E4M3)
    x_s = jax.ShapeDtypeStruct((k // fp8.BLOCK, 4096), jnp.float32)
    w = fp8.BlockScaled(jax.ShapeDtypeStruct((n, k), fp8.E4M3),
                        jax.ShapeDtypeStruct((fp8.blocks(n), k // fp8.BLOCK), jnp.float32))
    blocks = candidates(k)
    assert any(b.out_by_row_block for b in blocks)
    for b in blocks:
        f = jax.jit(lambda x, s, w, b=b: dense_fp8.block_scaled_gemm(x, s, w, blocks=b))
        assert "mosaic_gpu" in f.trace(x, x_s, w).lower(lowering_platforms=("cuda",)).as_text(), b


@pytest.mark.parametrize("d,f", [(7168, 2048), (7168, 18432)], ids=["shared_expert", "dense_mlp"])
def test_swiglu_lowers_for_cuda_at_r1_shapes(d, f, monkeypatch):
    """The FP8 MLP's kernel path (forced on CPU) lowers for CUDA at R1's widths with its default blocks, and the
    fused gate/up with every swept candidate: the fused gate/up and down as Mosaic GPU kernels, the SwiGLU's [T, 2F]
    never an XLA intermediate."""
    monkeypatch.setattr(dense_fp8, "on_kernel", lambda *_, **__: True)
    x = jax.ShapeDtypeStruct((4096, d), jnp.bfloat16)
    w = lambda n, k: fp8.BlockScaled(jax.ShapeDtypeStruct((n, k), fp8.E4M3),  # noqa: E731
                                     jax.ShapeDtypeStruct((fp8.blocks(n), fp8.blocks(k)), jnp.float32))
    text = jax.jit(dense_fp8.swiglu).trace(x, w(f, d), w(f, d), w(d, f)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2
    assert f"4096x{2 * f}x" not in text
    for b in swiglu_fp8_candidates(d):  # what `bench_fp8_dense --tune --mlp` sweeps
        hidden = jax.jit(lambda x, g, u, b=b: dense_fp8.swiglu_hidden(x, g, u, blocks=b))
        text = hidden.trace(x, w(f, d), w(f, d)).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and f"4096x{2 * f}x" not in text, b


def _exact_hidden(x, gate, up) -> jax.Array:
    """The SwiGLU `dense_fp8.swiglu_hidden` defines, in fp64 over the dequantized operands (x quantized per row and
    128 columns), rounded to x's dtype."""
    g, u = (_exact(*fp8.quantize_rows(x), w) for w in (gate, up))
    return jnp.asarray(g / (1 + np.exp(-g)) * u, jnp.float32).astype(x.dtype)


def _check_swiglu(x, gate, up, down, blocks=(None, None), interpret=False, gemm_tol=2e-3):
    """`swiglu` on the kernel in its two stages and whole: the fused gate/up's SwiGLU against the fp64 one, down on
    the kernel's own hidden rows against the fp64 product, each within one GEMM's bf16 bound; the MLP against the
    fp64 MLP within `dense_fp8.SWIGLU_REL_TOL`."""
    hidden = dense_fp8.swiglu_hidden(x, gate, up, blocks=blocks[0], interpret=interpret)
    ours = dense_fp8.swiglu(x, gate, up, down, blocks=blocks, interpret=interpret)
    assert ours.shape == x.shape[:1] + down.values_GNK.shape[:1] and ours.dtype == x.dtype
    exact_hidden = _exact_hidden(x, gate, up)
    assert _rel(hidden, exact_hidden) < gemm_tol
    assert _rel(ours, _exact(*fp8.quantize_rows(hidden), down)) < gemm_tol
    assert _rel(ours, _exact(*fp8.quantize_rows(exact_hidden), down)) < dense_fp8.SWIGLU_REL_TOL


def test_swiglu_on_the_kernel_is_the_exact_mlp_and_off_it_the_reference_path():
    """`swiglu` on the kernel (interpreted): the fused gate/up GEMM, then down, over 300 rows (a cut row tile),
    staged and whole against the fp64 MLP (`_check_swiglu`); off the kernel (CPU), fp8.linear per projection with
    the SwiGLU in fp32, at fp32 against the same fp64 MLP (whose SwiGLU output stays fp32)."""
    x, gate = _operands(5, 300, 256, 256)
    _, up = _operands(6, 300, 256, 256)
    _, down = _operands(7, 300, 256, 384)
    blocks = (dataclasses.replace(dense_fp8.DEFAULT_SWIGLU_BLOCKS, max_concurrent_steps=2, num_sms=1, group_m=2),
              SMALL)
    _check_swiglu(x.astype(jnp.bfloat16), gate, up, down, blocks, interpret=True, gemm_tol=4e-3)
    assert not dense_fp8.on_kernel(x, gate)
    exact = _exact(*fp8.quantize_rows(jnp.asarray(_exact_hidden(x, gate, up))), down)
    assert _rel(dense_fp8.swiglu(x, gate, up, down), exact) < 1e-4


def test_cached_blocks_are_the_cards_entry_under_the_padded_width_else_the_defaults(tmp_path, monkeypatch):
    """The blocks the kernel and `bench_fp8_dense --tune` (its "before" case) take without an override: the entry
    for this card, K, padded width (kv_a's 576 under 640) and fused-ness, nearest in rows; else the defaults."""
    from dwdp_jax.kernels import tuning

    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    kind = jax.devices()[0].device_kind
    assert dense_fp8.cached_blocks(7168, 576, 32768) == dense_fp8.default_blocks(7168)
    assert dense_fp8.cached_blocks(7168, 2048, 32768, fused=True) == dense_fp8.default_blocks(7168, fused=True)
    tuning.record(dense_fp8.NAME_TUNED, kind, 7168, 640, False, 32768, SMALL_COLS, 1.0, "t")
    tuning.record(dense_fp8.NAME_TUNED, kind, 7168, 2048, True, 32768, SMALL, 1.0, "t")
    assert dense_fp8.cached_blocks(7168, 576, 30000) == SMALL_COLS
    assert dense_fp8.cached_blocks(7168, 2048, 32768, fused=True) == SMALL
    assert dense_fp8.cached_blocks(7168, 2048, 32768) == dense_fp8.default_blocks(7168)


def test_swiglu_refuses_weights_that_make_no_mlp():
    """Mismatched weights are refused before any work, on and off the kernel, naming the weight and the shape."""
    x, gate = _operands(11, 128, 256, 256)
    _, down = _operands(12, 128, 256, 256)
    bad_scales = fp8.BlockScaled(gate.values_GNK, gate.scales_GRS[:, :1])
    _, narrow = _operands(13, 128, 128, 256)
    for interpret in (False, True):
        with pytest.raises(ValueError, match="swiglu up: FP8 weight values .* with scales"):
            dense_fp8.swiglu(x.astype(jnp.bfloat16), gate, bad_scales, down, interpret=interpret)
        with pytest.raises(ValueError, match=r"swiglu down: FP8 weight of shape \[256, 128\]; want \[256, 256\]"):
            dense_fp8.swiglu(x.astype(jnp.bfloat16), gate, gate, narrow, interpret=interpret)
        with pytest.raises(ValueError, match=r"swiglu gate: .* want \[256, 384\] for x of width 384"):
            dense_fp8.swiglu(jnp.zeros((4, 384), jnp.bfloat16), gate, gate, down, interpret=interpret)


def test_refusals_name_the_cause():
    x, w = _operands(2, 128, 256, 128)
    x_q, x_s = fp8.quantize_rows(x)
    with pytest.raises(ValueError, match="scales"):
        dense_fp8.block_scaled_gemm(x_q, x_s, fp8.BlockScaled(w.values_GNK, w.scales_GRS[:, :1]), interpret=True)
    with pytest.raises(ValueError, match="one \\[N, K\\] matrix"):
        dense_fp8.block_scaled_gemm(x_q, x_s, fp8.BlockScaled(w.values_GNK[None], w.scales_GRS[None]),
                                    interpret=True)
    with pytest.raises(ValueError, match="x_scale_SM"):
        dense_fp8.block_scaled_gemm(x_q, x_s[:, :64], w, interpret=True)
    _, w_192 = _operands(2, 128, 192, 128)
    with pytest.raises(ValueError, match="K=192 must be a multiple of 128"):
        dense_fp8.block_scaled_gemm(x_q[:, :192], x_s[:1], w_192, interpret=True)


# R1's FP8 projections at 4096 tokens: q_a, q_b, kv_a (576: a partial block), kv_b whole and as its k_nope or v part,
# o, dense MLP down, shared expert
R1_SHAPES = [(7168, 1536), (1536, 24576), (7168, 576), (512, 32768), (512, 16384), (16384, 7168), (18432, 7168),
             (7168, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", R1_SHAPES, ids=[f"{k}x{n}" for k, n in R1_SHAPES])
def test_gpu_kernel_at_r1_shapes(k, n):
    """The compiled kernel (its tuned or default blocks) against the fp64 product: relative error < 2e-3."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    x, w = _operands(3, 4096 + 77, k, n)
    x_q, x_s = fp8.quantize_rows(x)
    out = dense_fp8.block_scaled_gemm(x_q, x_s, w)
    assert _rel(out, _exact(x_q, x_s, w)) < 2e-3


@pytest.mark.gpu
def test_gpu_spread_output_at_kv_b_k_nope():
    """MLA's k on the compiled kernel: kv_b's k_nope part (512 -> 128 heads x 128) written into [T, 128 x 192],
    each head's run against the fp64 product."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    t = 4096 + 77
    x, w = _operands(13, t, 512, 16384)
    x_q, x_s = fp8.quantize_rows(x)
    out = dense_fp8.block_scaled_gemm(x_q, x_s, w, out_spread=(128, 192))
    assert out.shape == (t, 128 * 192)
    assert _rel(out.reshape(t, 128, 192)[..., :128].reshape(t, -1), _exact(x_q, x_s, w)) < 2e-3


@pytest.mark.gpu
def test_gpu_linear_takes_the_kernel(tmp_path, monkeypatch):
    """bf16 activations on Hopper go through the kernel, and agree with the dequantized reference path. An empty
    block cache: a record of cuBLASLt timing faster at this shape on this card routes it to the library
    (`tests/test_cublaslt_fp8.py`)."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    jax.clear_caches()
    x, w = _operands(4, 1000, 7168, 576)
    xb = x.astype(jnp.bfloat16)
    assert dense_fp8.on_kernel(xb, w) and not dense_fp8.library_faster(7168, 576, 1000)
    hlo = jax.jit(dense_fp8.linear).lower(xb, w).as_text()
    assert "mosaic_gpu" in hlo
    assert _rel(dense_fp8.linear(xb, w).astype(jnp.float32), fp8.linear(xb, w).astype(jnp.float32)) < 1e-2


@pytest.mark.gpu
def test_gpu_stacked_q_a_and_kv_a():
    """R1's q_a (1536) and kv_a (576) over one input as one stacked GEMM: each output against its fp64 product."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    x, w_q = _operands(7, 4096 + 77, 7168, 1536)
    _, w_kv = _operands(8, 4096 + 77, 7168, 576)
    xb = x.astype(jnp.bfloat16)
    x_q, x_s = fp8.quantize_rows(xb)
    for got, w in zip(jax.jit(dense_fp8.linear_stacked)(xb, (w_q, w_kv)), (w_q, w_kv)):
        assert _rel(got, _exact(x_q, x_s, w)) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,n", [(4096 + 200, 16384, 7168), (4096 + 77, 7168, 576)], ids=["o", "kv_a"])
def test_gpu_every_benchmarked_candidate(t, k, n):
    """The schedules `bench_fp8_dense --tune` times (the fewest that take every option's every value, and the
    card's cached ones), compiled, against the fp64 product: among them the clusters of two on a pair of row tiles
    (`cluster_m`), which Mosaic GPU's interpreter cannot run on CPU. Row counts leave the last pair of row tiles
    with 72 rows in its second tile (o) or none (kv_a)."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    from dwdp_jax.measure.kernel_sweeps import dense_fp8_candidates
    from test_gpu import covering, run_each  # every candidate compiled at once

    x, w = _operands(9, t, k, n)
    x_q, x_s = fp8.quantize_rows(x)
    exact = _exact(x_q, x_s, w)
    candidates = covering(dense_fp8_candidates(k), dense_fp8.NAME_TUNED, k, dense_fp8.padded_width(n), False)
    assert any(b.cluster_m for b in candidates)
    gemm = jax.jit(dense_fp8.block_scaled_gemm, static_argnames=("blocks",))
    for b, out in zip(candidates, run_each(gemm, candidates, (x_q, x_s, w), {})):
        assert _rel(out, exact) < 2e-3, b


@pytest.mark.gpu
@pytest.mark.parametrize("d,f", [(7168, 2048), (7168, 18432)], ids=["shared_expert", "dense_mlp"])
def test_gpu_swiglu_at_r1_shapes(d, f):
    """The FP8 MLP on the compiled kernels (the fused gate/up, then down) staged and whole against the fp64 MLP."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    x, gate = _operands(8, 4096 + 77, d, f)
    _, up = _operands(9, 8, d, f)
    _, down = _operands(10, 8, f, d)
    x = x.astype(jnp.bfloat16)
    assert dense_fp8.on_kernel(x, gate)
    assert "mosaic_gpu" in jax.jit(dense_fp8.swiglu).lower(x, gate, up, down).as_text()
    _check_swiglu(x, gate, up, down)


@pytest.mark.gpu
def test_gpu_every_swept_swiglu_schedule():
    """The fused gate/up schedules `bench_fp8_dense --tune --mlp` times (the fewest that take every option's every
    value, and the card's cached ones), compiled, against the fp64 SwiGLU at the shared expert's widths: among them
    the clusters of two (`cluster_n`), which Mosaic GPU's interpreter cannot run on CPU."""
    if jax.devices()[0].platform != "gpu":
        pytest.skip("needs a GPU")
    from test_gpu import covering, run_each  # every candidate compiled at once

    x, gate = _operands(14, 4096 + 77, 7168, 2048)
    _, up = _operands(15, 8, 7168, 2048)
    x = x.astype(jnp.bfloat16)
    exact = _exact_hidden(x, gate, up)
    candidates = covering(swiglu_fp8_candidates(7168), dense_fp8.NAME_TUNED, 7168, 2048, True)
    assert any(b.cluster_n for b in candidates)
    hidden = jax.jit(dense_fp8.swiglu_hidden, static_argnames=("blocks",))
    for b, out in zip(candidates, run_each(hidden, candidates, (x, gate, up), {})):
        assert _rel(out, exact) < 2e-3, b
