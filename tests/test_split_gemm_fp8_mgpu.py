"""The block-scaled FP8 split-weight grouped GEMM on Mosaic GPU: on CPU, its output in Mosaic GPU interpret mode
against the fp32 product of the same quantized operands (numpy, per group), its refusals before launch, and its
lowering for CUDA at DeepSeek-R1 sizes (shared memory and the TMA/wgmma lowering); on a GPU (`-m gpu`), the
compiled kernel against the same reference at R1's K and N."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import fp8
from dwdp_jax.kernels.split_gemm import split_grouped_ffn
from dwdp_jax.kernels.split_gemm_fp8_mgpu import (BY_ROW_BLOCK_FP8_BLOCKS, DEFAULT_FP8_BLOCKS, FUSED_FP8_BLOCKS,
                                                  NAME_TUNED, ONE_PARTIAL_FP8_BLOCKS, WG_COLS_FP8_BLOCKS,
                                                  WG_COLS_FUSED_FP8_BLOCKS, Fp8Blocks, chained_steps, default_blocks,
                                                  split_ragged_dot_fp8_mgpu)
from models.experts import ExpertSlab

# One CTA (the interpreter's time grows with the threads): several row tiles, column blocks and K steps in it.
SMALL = Fp8Blocks(tile_m=128, tile_n=128, max_concurrent_steps=2, num_sms=1)
SMALL_FUSED = Fp8Blocks(tile_m=128, tile_n=64, max_concurrent_steps=2, num_sms=1)
# the warpgroups on column halves: one CTA computes 128 rows x 2 x 64 columns, two 64-row blocks per warpgroup
SMALL_COLS = Fp8Blocks(tile_m=128, tile_n=64, max_concurrent_steps=2, num_sms=1, wg_cols=True)
# an empty group, a tile cut at a group boundary (rows 0-69 span both warpgroups' halves, 70-127 the second's
# only), a group spanning two tiles, full tiles (rows 128-255, 256-383), rows not a multiple of tile_m (padded)
SIZES = np.array([70, 0, 186, 128], np.int32)
SLAB_CUTS = (1, 3)  # three slabs: [0], [1, 2], [3]
POISONED_ROWS = 9  # rows past the groups: NaN values and scales, whose outputs nobody reads


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _operands(seed: int, k: int, n: int, fused: bool):
    """(x e4m3 [M, K] with NaN rows past the groups, its scales [K/128, M] (NaN there too), per weight the
    quantized [G, N, K] pair); values spread over magnitudes so the scales matter."""
    rng = np.random.default_rng(seed)
    used = int(SIZES.sum())
    x = rng.standard_normal((used, k)) * rng.uniform(0.1, 10, (used, 1))
    x_q, x_s = fp8.quantize_rows(jnp.asarray(x, jnp.float32))
    x_q = jnp.concatenate([x_q, jnp.full((POISONED_ROWS, k), jnp.nan, fp8.E4M3)])
    x_s = jnp.concatenate([x_s, jnp.full((k // fp8.BLOCK, POISONED_ROWS), jnp.nan, jnp.float32)], axis=1)
    weights = [fp8.quantize_weights(jnp.asarray(rng.standard_normal((len(SIZES), n, k))
                                                * rng.uniform(0.01, 1, (len(SIZES), n, 1)) / np.sqrt(k),
                                                jnp.float32)) for _ in range(2 if fused else 1)]
    return x_q, x_s, weights


def _exact(x_q, x_s, weights, fused: bool) -> np.ndarray:
    """The fp64 product of the dequantized operands, group by group (the rows with groups only)."""
    x = np.asarray(fp8.dequantize_rows(x_q[:int(SIZES.sum())], x_s[:, :int(SIZES.sum())]), np.float64)
    ends = np.cumsum(SIZES)
    out = []
    for w in weights:
        w_GNK = np.asarray(fp8.dequantize_weights(*w), np.float64)
        out.append(np.concatenate([x[e - s:e] @ w_GNK[g].T for g, (s, e) in enumerate(zip(SIZES, ends))]))
    if not fused:
        return out[0]
    return out[0] / (1 + np.exp(-out[0])) * out[1]


def _slabs(weights, fused: bool, cuts: tuple[int, ...]):
    """The weights as slabs of the groups between `cuts`."""
    edges = (0, *cuts, len(SIZES))
    per_slab = [tuple(fp8.BlockScaled(w[0][a:b], w[1][a:b]) for w in weights) for a, b in zip(edges, edges[1:])]
    return tuple(per_slab) if fused else tuple(ws[0] for ws in per_slab)


def _run(blocks, fused: bool, out_dtype=jnp.bfloat16, seed: int = 0, k: int = 256, n: int = 128):
    x_q, x_s, weights = _operands(seed, k, n, fused)
    out = split_ragged_dot_fp8_mgpu(x_q, jnp.asarray(SIZES), _slabs(weights, fused, SLAB_CUTS), x_scale_SM=x_s,
                                    fused=fused, blocks=blocks, interpret=True, out_dtype=out_dtype)
    used = int(SIZES.sum())
    assert out.shape == (used + POISONED_ROWS, n) and out.dtype == out_dtype
    return np.asarray(out[:used], np.float32), _exact(x_q, x_s, weights, fused)


@pytest.mark.parametrize("blocks", [SMALL, dataclasses.replace(SMALL, chain=True, per_group=True, num_sms=2)],
                         ids=["alone", "chained_per_group_windows"])
def test_three_slabs_match_the_exact_product(blocks):
    """Each CTA's tiles one pipeline each, or chained into one (4 tiles on 2 CTAs: chains of two; a CTA's lone
    tile runs the unchained pipeline) in per-group windows; the bf16 output's rounding is the error (the issue's
    bound: 2e-3)."""
    ours, exact = _run(blocks, fused=False)
    assert np.isfinite(ours).all()
    assert _rel(ours, exact) < 2e-3


@pytest.mark.parametrize("blocks", [dataclasses.replace(SMALL, swizzled_store=True),
                                    dataclasses.replace(SMALL_COLS, out_by_row_block=True, swizzled_store=True)],
                         ids=["row_halves", "column_halves_by_row_block"])
def test_full_tiles_stored_through_the_swizzled_view(blocks):
    """Full tiles (rows 128-383) leave through the swizzled view, cut ones (rows 0-127) through the plain one."""
    ours, exact = _run(blocks, fused=False, out_dtype=jnp.float32, seed=1, n=256 if blocks.wg_cols else 128)
    assert _rel(ours, exact) < 1e-5


def test_fp32_output_is_the_exact_product_up_to_summation_order():
    """With an fp32 output, what is left is fp32 summation: the scales are applied to the right rows, columns
    and K blocks (two column blocks, swept per group: row tiles fastest)."""
    ours, exact = _run(dataclasses.replace(SMALL, tile_n=64, per_group=True), fused=False, out_dtype=jnp.float32,
                       seed=1)
    assert _rel(ours, exact) < 1e-5


def test_fused_gate_up_matches_the_exact_swiglu():
    """Windows of one row tile: each sweeps both column blocks before the next."""
    ours, exact = _run(dataclasses.replace(SMALL_FUSED, group_m=1, per_group=True), fused=True, seed=2)
    assert np.isfinite(ours).all()
    assert _rel(ours, exact) < 2e-3


@pytest.mark.parametrize("by_block", [False, True], ids=["tile_at_once", "out_by_row_block"])
def test_column_halves_are_the_exact_product_up_to_summation_order(by_block):
    """`wg_cols`: each warpgroup promotes its two 64-row blocks one at a time into running sums of all 128 rows;
    every row block gets its own rows' scales and every warpgroup its column block's weight scales. The output
    leaves in one store or a row block at a time (a tile cut at row 70 splits the second block)."""
    blocks = dataclasses.replace(SMALL_COLS, out_by_row_block=by_block)
    ours, exact = _run(blocks, fused=False, out_dtype=jnp.float32, seed=1)
    assert _rel(ours, exact) < 1e-5


def test_column_halves_fused_and_chained_match_the_exact_swiglu():
    """Two CTAs chaining per-group windows over two 128-column blocks of gate and up."""
    ours, exact = _run(dataclasses.replace(SMALL_COLS, chain=True, per_group=True, num_sms=2), fused=True, seed=2,
                       n=256)
    assert np.isfinite(ours).all()
    assert _rel(ours, exact) < 2e-3


def test_one_partial_at_a_time_is_the_exact_swiglu_up_to_summation_order():
    """`one_partial`: the gate's wgmma promoted before the up's is issued, 128 columns of each, chained."""
    blocks = Fp8Blocks(tile_m=128, tile_n=128, max_concurrent_steps=2, num_sms=2, chain=True, per_group=True,
                       one_partial=True)
    assert blocks.acc_registers(fused=True) == 192
    ours, exact = _run(blocks, fused=True, out_dtype=jnp.float32, seed=2, n=256)
    assert _rel(ours, exact) < 1e-5


@pytest.mark.parametrize("blocks", [
    Fp8Blocks(tile_m=128, tile_n=128, max_concurrent_steps=2, num_sms=2, chain=True, per_group=True,
              one_partial=True, x_in_registers=True),
    dataclasses.replace(SMALL_COLS, x_in_registers=True), dataclasses.replace(SMALL_FUSED, x_in_registers=True)],
    ids=["one_partial", "column_halves", "row_halves"])
def test_x_fragments_in_registers_give_the_exact_swiglu_up_to_summation_order(blocks):
    """`x_in_registers`: each 64-row x block read once per K step into registers (wgmma's A from registers) for
    both the gate's and the up's wgmma."""
    ours, exact = _run(blocks, fused=True, out_dtype=jnp.float32, seed=2, n=256)
    assert _rel(ours, exact) < 1e-5


@pytest.mark.parametrize("blocks", [
    Fp8Blocks(tile_m=128, tile_n=128, max_concurrent_steps=2, num_sms=2, chain=True, per_group=True, wg_weights=True),
    Fp8Blocks(tile_m=256, tile_n=64, max_concurrent_steps=2, num_sms=1, wg_weights=True)],
    ids=["chained_128x128", "two_row_blocks_a_half"])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_a_warpgroup_per_weight_gives_the_exact_swiglu(blocks, out_dtype):
    """`wg_weights`: warpgroup 0 computes the gate, 1 the up, over all rows; the epilogue swaps half of the rows
    through shared memory. Tiles cut at a group boundary (row 70: inside the gate's half) and rows past the groups
    (NaN) check that each warpgroup stores its own half; chained tiles reuse the swap buffer and its barrier."""
    assert blocks.acc_registers(fused=True) <= 192
    ours, exact = _run(blocks, fused=True, out_dtype=out_dtype, seed=2, n=256 if blocks.tile_n == 128 else 128)
    assert np.isfinite(ours).all()
    assert _rel(ours, exact) < (1e-5 if out_dtype == jnp.float32 else 2e-3)


def test_expert_ffn_with_the_fp8_kernel_matches_the_reference():
    """`split_grouped_ffn` on FP8 slabs with this kernel for both projections (quantizing x and the SwiGLU output
    on the way in) against `fp8.reference_ffn`; rows past the groups come back zero."""
    rng = np.random.default_rng(3)
    sizes, d, f = np.array([40, 0, 88], np.int32), 256, 128
    m = int(sizes.sum()) + 8
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    gate, up, down = (fp8.quantize_weights(jnp.asarray(rng.standard_normal((3, a, b)) / np.sqrt(b), jnp.float32))
                      for a, b in ((f, d), (f, d), (d, f)))
    cut = lambda w, a, b: fp8.BlockScaled(w[0][a:b], w[1][a:b])  # noqa: E731
    slabs = tuple(ExpertSlab(cut(gate, a, b), cut(up, a, b), cut(down, a, b), start=a) for a, b in ((0, 1), (1, 3)))

    def kernel(*args, fused=False, interpret=False, **kw):
        return split_ragged_dot_fp8_mgpu(*args, fused=fused, interpret=interpret,
                                         blocks=SMALL_FUSED if fused else SMALL,
                                         **kw)

    out = split_grouped_ffn(x, jnp.asarray(sizes), slabs, interpret=True, fp8_ragged_dot=kernel)
    ref = fp8.reference_ffn(x, jnp.asarray(sizes), gate, up, down)
    used = int(sizes.sum())
    assert _rel(out[:used].astype(jnp.float32), ref[:used].astype(jnp.float32)) < 1e-2  # bf16 h and output
    np.testing.assert_array_equal(np.asarray(out[used:], np.float32), 0)


def test_bad_inputs_are_refused_before_launch():
    x_q, x_s = fp8.quantize_rows(jnp.ones((64, 256)))
    w = fp8.quantize_weights(jnp.ones((2, 128, 256)))
    gs = jnp.asarray([32, 32], jnp.int32)
    run = lambda x, ws, xs=x_s, **kw: split_ragged_dot_fp8_mgpu(  # noqa: E731
        x, gs, ws, x_scale_SM=xs, blocks=kw.pop("blocks", SMALL), interpret=True, **kw)
    with pytest.raises(ValueError, match=r"x_scale_SM \(64, 2\) float32 must be float32 \(2, 64\)"):
        run(x_q, (w,), x_s.T)
    with pytest.raises(ValueError, match=r"x_scale_SM \(2, 64\) bfloat16 must be float32"):
        run(x_q, (w,), x_s.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"slab 0 weight scales \(2, 2, 1\) float32 must be float32 \(2, 1, 2\)"):
        run(x_q, ((w[0], jnp.ones((2, 2, 1), jnp.float32)),))
    with pytest.raises(ValueError, match=r"slab 0 weight .* does not match x"):
        run(x_q, ((w[0].astype(jnp.bfloat16), w[1]),))
    w_192 = fp8.quantize_weights(jnp.ones((2, 128, 192)))
    with pytest.raises(ValueError, match=r"K=192 and N=128 must be multiples of 128"):
        run(x_q[:, :192], (w_192,), x_s[:1])
    with pytest.raises(ValueError, match="chained tiles need K / 128 = 2 divisible by max_concurrent_steps=4"):
        run(x_q, (w,), blocks=Fp8Blocks(chain=True, max_concurrent_steps=4))
    with pytest.raises(ValueError, match="needs 256 accumulator registers per thread"):
        run(x_q, (w,), blocks=Fp8Blocks(tile_m=256, tile_n=128))
    # a slab past TMA's int32 coordinates: traced only (no memory behind it)
    huge = (jax.ShapeDtypeStruct((2**31, 128, 256), fp8.E4M3),
            jax.ShapeDtypeStruct((2**31, 1, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"slab 0 weight \(2147483648, 128, 256\) is past what TMA addresses"):
        jax.eval_shape(lambda x, xs, ws: split_ragged_dot_fp8_mgpu(x, gs, (ws,), x_scale_SM=xs, blocks=SMALL),
                       x_q, x_s, huge)
    with pytest.raises(ValueError, match="tile_m must be a multiple of 128"):
        Fp8Blocks(tile_m=64)
    with pytest.raises(ValueError, match="tile_n must divide 128"):
        Fp8Blocks(tile_n=256)
    with pytest.raises(ValueError, match="group_m must be >= 0 and needs per_group"):
        Fp8Blocks(group_m=-1, per_group=True)
    with pytest.raises(ValueError, match="group_m must be >= 0 and needs per_group"):
        Fp8Blocks(group_m=4)
    with pytest.raises(ValueError, match="cluster_n needs an even num_sms"):
        Fp8Blocks(cluster_n=True, num_sms=131)
    with pytest.raises(ValueError, match="cluster_m needs an even num_sms"):
        Fp8Blocks(cluster_m=True, num_sms=131)
    with pytest.raises(ValueError, match="cluster_m and cluster_n cannot be combined"):
        Fp8Blocks(cluster_m=True, cluster_n=True)
    with pytest.raises(ValueError, match=r"N=128 must be a multiple of 256 \(tile_n \* 2 CTAs with cluster_n\)"):
        run(x_q, (w,), blocks=Fp8Blocks(cluster_n=True, num_sms=2))
    with pytest.raises(ValueError, match=r"N=128 must be a multiple of 256 \(tile_n \* 2 warpgroups with wg_cols\)"):
        run(x_q, (w,), blocks=Fp8Blocks(wg_cols=True, num_sms=2))
    with pytest.raises(ValueError, match="needs 320 accumulator registers per thread"):
        run(x_q, (w,), blocks=Fp8Blocks(tile_m=256, tile_n=128, wg_cols=True))
    with pytest.raises(ValueError, match=r"tile_m must be a multiple of 64 \(64 wgmma rows per compute warpgroup\)"):
        Fp8Blocks(tile_m=96, wg_cols=True)
    with pytest.raises(ValueError, match="out_by_row_block needs wg_cols"):
        Fp8Blocks(out_by_row_block=True)
    with pytest.raises(ValueError, match="swizzled_store with wg_cols needs out_by_row_block"):
        Fp8Blocks(wg_cols=True, swizzled_store=True)
    with pytest.raises(ValueError, match="x_in_registers is for the fused gate/up"):
        run(x_q, (w,), blocks=Fp8Blocks(x_in_registers=True, num_sms=2))
    with pytest.raises(ValueError, match="wg_weights is for the fused gate/up"):
        run(x_q, (w,), blocks=Fp8Blocks(wg_weights=True, num_sms=2))
    for other in ("wg_cols", "one_partial", "x_in_registers", "swizzled_store"):
        with pytest.raises(ValueError, match="wg_weights takes none of wg_cols"):
            Fp8Blocks(wg_weights=True, **{other: True})
    with pytest.raises(ValueError, match="tile_m must be a multiple of 128"):
        Fp8Blocks(tile_m=64, wg_weights=True)


def test_non_hopper_gpus_are_refused(monkeypatch):
    class Ampere:
        platform, device_kind, compute_capability = "gpu", "NVIDIA A100-SXM4-80GB", "8.0"

    monkeypatch.setattr(jax, "devices", lambda *_: [Ampere()])
    x_q, x_s = fp8.quantize_rows(jnp.ones((64, 128)))
    w = fp8.quantize_weights(jnp.ones((1, 128, 128)))
    with pytest.raises(ValueError, match=r"needs a Hopper GPU .* NVIDIA A100-SXM4-80GB has 8.0"):
        split_ragged_dot_fp8_mgpu(x_q, jnp.asarray([64], jnp.int32), (w,), x_scale_SM=x_s, blocks=SMALL)


@pytest.mark.parametrize("fused", [False, True])
def test_every_benchmarked_candidate_lowers_for_cuda_at_r1_sizes(fused):
    """Each configuration the GPU benchmark times lowers for CUDA on CPU at R1's K and N over two slabs of all 256
    experts (no GPU compile, no run): Mosaic GPU's layout inference and Hopper's shared memory are checked here."""
    from dwdp_jax.measure.gpu_bench import lowered_for_cuda
    from dwdp_jax.measure.kernel_sweeps import FP8_MGPU_CANDIDATES

    def run(x, gs, ws, fused, blocks):
        x_q, x_scale = fp8.quantize_rows(x)
        return split_ragged_dot_fp8_mgpu(x_q, gs, jax.tree.map(fp8.quantize_weights_kn, ws), x_scale_SM=x_scale,
                                         fused=fused, blocks=blocks)

    for blocks in FP8_MGPU_CANDIDATES[fused]:
        assert "mosaic_gpu" in lowered_for_cuda(run, fused, blocks, num_rows=8192, slab_counts=(128, 128)), blocks


def test_default_blocks_chain_any_whole_number_of_k_blocks():
    """The defaults' pipeline depth divides K's scale blocks (chaining needs it): R1's 4 stages, fewer for a narrow
    model's down projection (K 256: 2 blocks), and a K of 256 lowers for CUDA with blocks=None."""
    for k, steps in ((2048, 4), (7168, 4), (256, 2), (384, 1)):
        assert chained_steps(DEFAULT_FP8_BLOCKS, k).max_concurrent_steps == steps
    # without a tuned entry: fused, one partial at a time at 128 columns (any N); down, column halves where N takes
    # their CTA tiles (256 columns), else rows
    assert default_blocks(2048, 7168, False) == BY_ROW_BLOCK_FP8_BLOCKS
    assert default_blocks(7168, 2048, True) == ONE_PARTIAL_FP8_BLOCKS
    assert default_blocks(384, 128, True) == dataclasses.replace(ONE_PARTIAL_FP8_BLOCKS, max_concurrent_steps=1)
    assert default_blocks(256, 384, False) == dataclasses.replace(DEFAULT_FP8_BLOCKS, max_concurrent_steps=2)
    assert chained_steps(dataclasses.replace(DEFAULT_FP8_BLOCKS, chain=False), 384).max_concurrent_steps == 4
    x_q, x_scale = fp8.quantize_rows(jnp.ones((256, 256), jnp.float32))
    w = fp8.quantize_weights_kn(jnp.ones((2, 256, 128), jnp.float32))
    f = jax.jit(lambda x, s, gs, w: split_ragged_dot_fp8_mgpu(x, gs, (w,), x_scale_SM=s))
    text = f.trace(x_q, x_scale, jnp.asarray([128, 128], jnp.int32), w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_kernel_matches_the_exact_product_on_gpu(fused):
    """The compiled kernel at R1's K and N, skewed groups over two slabs, against the fp32 product of the same
    quantized operands: the fewest benchmarked candidates that between them take every option's every value, and
    the card's cached ones (`covering`; the CPU suite lowers every candidate for CUDA). All 15-16 a projection took
    64-70 s of the GPU suite on H100."""
    from dwdp_jax.measure.gpu_bench import exact_ragged_dot, skewed_group_sizes
    from dwdp_jax.measure.kernel_sweeps import FP8_MGPU_CANDIDATES
    from test_gpu import covering, run_each  # every candidate compiled at once

    k, n = (7168, 2048) if fused else (2048, 7168)
    sizes = skewed_group_sizes(8192, 32, 6.0)
    keys = jax.random.split(jax.random.key(5), 3)
    x_q, x_s = fp8.quantize_rows(jax.random.normal(keys[0], (int(sizes.sum()), k), jnp.float32))
    ws = [fp8.quantize_weights(0.02 * jax.random.normal(key, (32, n, k), jnp.float32)) for key in keys[1:]]
    gs = jnp.asarray(sizes)
    refs = [exact_ragged_dot((x_q, x_s), w, sizes) for w in ws[:2 if fused else 1]]
    ref = np.asarray(jax.nn.silu(refs[0]) * refs[1] if fused else refs[0])
    cut = lambda w, a, b: fp8.BlockScaled(w[0][a:b], w[1][a:b])  # noqa: E731
    slabs = tuple(tuple(cut(w, a, b) for w in ws) if fused else cut(ws[0], a, b) for a, b in ((0, 8), (8, 32)))
    candidates = covering(FP8_MGPU_CANDIDATES[fused], NAME_TUNED, k, n, fused)
    outs = run_each(split_ragged_dot_fp8_mgpu, candidates, (x_q, gs, slabs), {"fused": fused}, {"x_scale_SM": x_s})
    for blocks, out in zip(candidates, outs):
        assert _rel(np.asarray(out, np.float32), ref) < 2e-3, blocks


def test_split_backends_take_this_kernel_for_fp8_and_keep_triton_as_the_ablation(tmp_path, monkeypatch):
    """`pallas_split_mgpu` runs FP8 slabs on this kernel, `pallas_split_triton` on Triton's scaled path, and
    `pallas_split` on whichever timed faster for the projection on this card, this kernel without entries."""
    from dwdp_jax.kernels import gpu, grouped_gemm, split_gemm, tuning

    assert grouped_gemm.get_split_backend("pallas_split_mgpu").keywords["fp8_ragged_dot"] is split_ragged_dot_fp8_mgpu
    assert "fp8_ragged_dot" not in getattr(grouped_gemm.get_split_backend("pallas_split_triton"), "keywords", {})
    assert split_gemm.split_grouped_ffn.__kwdefaults__["fp8_ragged_dot"] is split_gemm.split_ragged_dot
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    assert gpu.fastest_fp8_split_kernel(2048, 7168, False, 131072) == "split_mgpu_fp8"
    kind = jax.devices()[0].device_kind
    tuning.record("split_triton_fp8", kind, 2048, 7168, False, 131072, split_gemm.FP8_BLOCKS, 900.0, "t")
    tuning.record("split_mgpu_fp8", kind, 2048, 7168, False, 131072, SMALL, 800.0, "t")
    assert gpu.fastest_fp8_split_kernel(2048, 7168, False, 131072) == "split_triton_fp8"


def test_shared_memory_ceiling_counts_tma_writes_and_wgmma_reads():
    """Per CTA K step (128): down's row halves (128 x 128) write 32 KiB and read 2 x (64 + 128) x 128 bytes for
    4.2 MFLOP; the fused column halves at 64 columns read every x row once per 64 weight columns, which caps them at
    0.727 of the FP8 peak; one partial at a time at 128 columns, 0.889 (Hopper: 128 bytes and 8192 FLOPs an SM and
    clock)."""
    row_halves = Fp8Blocks()
    assert row_halves.smem_bytes_per_flop(False) == (2 * 128 * 128 + 2 * 192 * 128) / (2 * 128 * 128 * 128)
    assert row_halves.smem_ceiling(False) == pytest.approx(0.8)
    assert WG_COLS_FP8_BLOCKS.smem_ceiling(False) == pytest.approx(128 / (8192 * 147456 / 8388608))
    assert WG_COLS_FUSED_FP8_BLOCKS.smem_ceiling(True) == pytest.approx(128 / (8192 * (49152 + 131072) / 8388608))
    assert round(WG_COLS_FUSED_FP8_BLOCKS.smem_ceiling(True), 3) == 0.727
    one_partial = Fp8Blocks(tile_n=128, one_partial=True)
    assert round(one_partial.smem_ceiling(True), 3) == 0.889 > round(FUSED_FP8_BLOCKS.smem_ceiling(True), 3) == 0.667
    # x fragments read once for both weights: no longer the bound at 128 columns, 0.889 at 64
    assert dataclasses.replace(one_partial, x_in_registers=True).smem_ceiling(True) == 1.0
    assert dataclasses.replace(WG_COLS_FUSED_FP8_BLOCKS, x_in_registers=True).smem_ceiling(True) == pytest.approx(
        128 / (8192 * (49152 + 2 * 2 * 128 * (64 + 2 * 64)) / 8388608))
    # a warpgroup per weight at 128 x 128: each reads its x row blocks once per K step, as down's column halves
    wg_weights = Fp8Blocks(tile_n=128, max_concurrent_steps=2, wg_weights=True)
    assert wg_weights.smem_ceiling(True) == WG_COLS_FP8_BLOCKS.smem_ceiling(False) == pytest.approx(0.889, abs=1e-3)
    assert wg_weights.acc_registers(True) == 192
    # 256 x 128 on row halves reads and writes what 128 x 256 on column halves does
    assert Fp8Blocks(tile_m=256).smem_ceiling(False) == WG_COLS_FP8_BLOCKS.smem_ceiling(False)


def test_a_sweep_narrowed_to_options_keeps_the_defaults_first():
    """`bench_fp8_gemm --with_option=...`: the defaults and the candidates with any named option set; a name that is
    not a field of the blocks is refused."""
    from dwdp_jax.measure.kernel_sweeps import FP8_CANDIDATES, FP8_MGPU_CANDIDATES, swept

    fused = FP8_MGPU_CANDIDATES[True]
    assert swept(fused, []) == fused and swept(FP8_CANDIDATES, []) == list(FP8_CANDIDATES)
    narrowed = swept(fused, ["wg_weights", "one_partial"])
    assert narrowed[0] == fused[0] and len(narrowed) == 1 + sum(b.wg_weights or b.one_partial for b in fused[1:])
    assert any(b.wg_weights for b in narrowed) and any(b.one_partial for b in narrowed)
    with pytest.raises(ValueError, match=r"with_option \['wg_weights'\]: not fields of Blocks"):
        swept(FP8_CANDIDATES, ["wg_weights"])
