"""FP8 (e4m3) block quantization and the split-weight grouped GEMM's FP8 path, in Pallas interpret mode on CPU:
the kernel against the fp32 product of the dequantized operands (the same quantized values, so only summation
order differs), and the FP8 expert FFN against the bf16 one within e4m3's rounding. The GPU tests run it compiled."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.measure.gpu_bench import lowered_for_cuda
from dwdp_jax.kernels import fp8
from dwdp_jax.kernels.split_gemm import Blocks, split_grouped_ffn, split_ragged_dot

TILES = Blocks(block_m=32, block_n=32, block_k=32)
HALVES = Blocks(block_m=32, block_n=32, block_k=32, half_tiles=True)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_weight_blocks_round_trip_within_e4m3_rounding():
    rng = np.random.default_rng(0)
    # blocks of very different magnitudes: one scale per 128 x 128 block keeps each block's relative error
    w = rng.standard_normal((2, 256, 384)) * np.repeat(np.repeat(10.0 ** rng.integers(-4, 3, (2, 2, 3)), 128, 1),
                                                        128, 2)
    q, s = fp8.quantize_weights_kn(jnp.asarray(w, jnp.float32))
    assert q.dtype == fp8.E4M3 and q.shape == (2, 384, 256) and s.shape == (2, 3, 2) and s.dtype == jnp.float32
    back = np.asarray(fp8.dequantize_weights_kn(q, s))
    for g in range(2):
        for i in range(2):
            for j in range(3):
                blk = np.s_[g, 128 * i: 128 * (i + 1), 128 * j: 128 * (j + 1)]
                assert rel(back[blk], w[blk]) < 0.04  # e4m3: 3 mantissa bits, at most 2^-4 per value
    assert float(np.abs(q.astype(jnp.float32)).max()) == fp8.E4M3_MAX  # each block's largest maps to 448


def test_rows_round_trip_and_zero_groups():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    x[2, :128] = 0  # a zero group: zeros back, no NaN from a zero scale
    q, s = fp8.quantize_rows(jnp.asarray(x))
    assert s.shape == (2, 5)
    back = np.asarray(fp8.dequantize_rows(q, s))
    assert np.isfinite(back).all() and (back[2, :128] == 0).all()
    assert rel(back, x) < 0.04


def test_rows_for_the_kernels_refuse_dimensions_off_the_scale_block():
    with pytest.raises(ValueError, match="must be a multiple of 128 .*got 96"):
        fp8.quantize_rows(jnp.zeros((4, 96)))


def test_weights_off_the_block_get_partial_edge_blocks_as_the_checkpoint_stores_them():
    """N 100 and K 192: one row of blocks, the second column block 64 wide, each with its own scale."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 100, 192)).astype(np.float32)
    w[:, :, 128:] *= 1e-3  # the partial block's own scale keeps its small values, a shared one would flush them
    q, s = fp8.quantize_weights(jnp.asarray(w)).check("w")
    assert q.shape == (2, 100, 192) and s.shape == (2, 1, 2) == fp8.scale_shape(q.shape)
    back = np.asarray(fp8.dequantize_weights(q, s))
    assert rel(back[:, :, 128:], w[:, :, 128:]) < 0.04 and rel(back[:, :, :128], w[:, :, :128]) < 0.04
    np.testing.assert_allclose(np.abs(back[:, :, 128:]).max(axis=(1, 2)), np.abs(w[:, :, 128:]).max(axis=(1, 2)),
                               rtol=1e-6)  # each block's largest magnitude maps to 448 and back exactly
    with pytest.raises(ValueError, match=r"w: FP8 weight values float8_e4m3fn\[2, 100, 192\] with scales "
                                         r"float32\[2, 2, 2\]; want .* scales \[2, 1, 2\]"):
        fp8.BlockScaled(q, jnp.zeros((2, 2, 2), jnp.float32)).check("w")


def _operands(rng, sizes, counts, k, n, fused):
    rows = int(np.sum(sizes)) + 7  # padding rows past the groups
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    weights = [[fp8.quantize_weights_kn(jnp.asarray(rng.standard_normal((c, k, n)) / np.sqrt(k), jnp.float32))
                for c in counts] for _ in range(2 if fused else 1)]
    return x, weights


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("blocks", [TILES, HALVES], ids=["full_tiles", "half_tiles"])
def test_fp8_split_ragged_dot_matches_dequantized_product(fused, blocks):
    rng = np.random.default_rng(7)
    sizes, counts, k, n = [5, 0, 41, 3, 0, 30], (2, 3, 1), 256, 256
    x, weights = _operands(rng, sizes, counts, k, n, fused)
    x_q, x_s = fp8.quantize_rows(x)
    poisoned = jnp.full_like(x_s, jnp.nan).at[:, :int(np.sum(sizes))].set(x_s[:, :int(np.sum(sizes))])
    gs = jnp.asarray(sizes, jnp.int32)
    arg = tuple(zip(*weights)) if fused else tuple(weights[0])
    ours = np.asarray(split_ragged_dot(x_q, gs, arg, fused=fused, blocks=blocks, interpret=True,
                                       x_scale_SM=poisoned, out_dtype=jnp.float32))
    x_deq = fp8.dequantize_rows(x_q, x_s)
    refs = [jax.lax.ragged_dot(x_deq, jnp.concatenate([fp8.dequantize_weights_kn(*w) for w in ws]), gs,
                               precision=jax.lax.Precision.HIGHEST) for ws in weights]
    ref = jax.nn.silu(refs[0]) * refs[1] if fused else refs[0]
    used = int(np.sum(sizes))
    assert np.isfinite(ours[:used]).all()
    assert rel(ours[:used], np.asarray(ref)[:used]) < 1e-5


def test_fp8_expert_ffn_tracks_bf16_within_e4m3_rounding():
    """The FP8 FFN (weights and activations in e4m3 blocks) against the same FFN on the unquantized weights: the
    gap is e4m3's rounding (a few percent), and the FP8 path quantizes rather than drops rows."""
    rng = np.random.default_rng(3)
    sizes, counts, d, f = [9, 0, 37, 14], (1, 3), 256, 128
    m = int(np.sum(sizes)) + 5
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    full = [jnp.asarray(rng.standard_normal((4, a, b)) / np.sqrt(a), jnp.float32) for a, b in ((d, f), (d, f), (f, d))]

    def slabs(quantize):
        edges = np.cumsum((0,) + counts)
        return tuple(types.SimpleNamespace(**{name: (fp8.quantize_weights_kn(w[a:b]) if quantize else w[a:b])
                                              for name, w in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), full)})
                     for a, b in zip(edges[:-1], edges[1:]))

    gs = jnp.asarray(sizes, jnp.int32)
    ours = np.asarray(split_grouped_ffn(x, gs, slabs(True), interpret=True))
    ref = np.asarray(split_grouped_ffn(x, gs, slabs(False), interpret=True))
    used = int(np.sum(sizes))
    assert (ours[used:] == 0).all()
    assert 1e-3 < rel(ours[:used], ref[:used]) < 0.08  # quantized (not bit-equal), within e4m3's rounding


def test_fp8_split_ragged_dot_refuses_bad_scales():
    x_q, x_s = fp8.quantize_rows(jnp.ones((8, 256)))
    w = fp8.quantize_weights_kn(jnp.ones((2, 256, 128)))
    gs = jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"x_scale_SM \(8, 2\) float32 must be float32 \(2, 8\)"):
        split_ragged_dot(x_q, gs, (w,), x_scale_SM=x_s.T, blocks=TILES, interpret=True)
    with pytest.raises(ValueError, match=r"slab 0 weight scales \(2, 2, 1\) float32 must be float32 \(2, 1, 2\)"):
        split_ragged_dot(x_q, gs, ((w[0], jnp.ones((2, 2, 1))),), x_scale_SM=x_s, blocks=TILES, interpret=True)
    with pytest.raises(ValueError, match=r"FP8 weights are \[G, N, K\]"):
        split_ragged_dot(x_q, gs, ((jnp.swapaxes(w[0], 1, 2), w[1]),), x_scale_SM=x_s, blocks=TILES,
                         interpret=True)
    with pytest.raises(ValueError, match="slab 0 weight .* does not match x"):
        split_ragged_dot(x_q, gs, ((w[0].astype(jnp.bfloat16), w[1]),), x_scale_SM=x_s, blocks=TILES,
                         interpret=True)


@pytest.mark.parametrize("fused", [False, True])
def test_every_fp8_candidate_lowers_for_cuda_at_r1_sizes(fused):
    """Each FP8 configuration the GPU benchmark times passes Triton's lowering at R1's shapes (on CPU, before any
    GPU time: e4m3 takes no integer cast, which interpret mode does not check)."""
    from dwdp_jax.measure.kernel_sweeps import FP8_CANDIDATES as CANDIDATES

    def run(x, gs, ws, fused, blocks):
        x_q, x_scale = fp8.quantize_rows(x)
        return split_ragged_dot(x_q, gs, jax.tree.map(fp8.quantize_weights_kn, ws), fused=fused, blocks=blocks,
                                x_scale_SM=x_scale)

    for blocks in CANDIDATES:
        assert "__gpu$xla.gpu.triton" in lowered_for_cuda(run, fused, blocks, num_rows=8192), blocks


def test_attention_inputs_round_per_128_tokens_of_one_head():
    """`as_fp8_token_blocks`: within e4m3's half step of each (128 tokens, head) block's scale; a block's scale is
    its own (a head of magnitude 1e4 leaves the other head's rounding alone); the partial last block included."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2, 64)).astype(np.float32)
    x[:, 1] *= 1e4
    got = np.asarray(fp8.as_fp8_token_blocks(jnp.asarray(x)))
    assert got.shape == x.shape and got.dtype == np.float32
    for b in range(3):
        for h in range(2):
            blk, out = x[128 * b:128 * (b + 1), h], got[128 * b:128 * (b + 1), h]
            scale = np.abs(blk).max() / 448.0
            # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative, and 2^-10 of the scale near zero
            assert (np.abs(out - blk) <= np.maximum(np.abs(blk) * 2.0**-4, scale * 2.0**-9) + 1e-30).all()
    np.testing.assert_array_equal(np.asarray(fp8.as_fp8_token_blocks(jnp.asarray(x[:, :1]))), got[:, :1])
