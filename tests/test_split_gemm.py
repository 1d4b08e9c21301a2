"""The split-weight grouped GEMM (Pallas Triton) in interpret mode on CPU: its tile schedule, and its output
against `jax.lax.ragged_dot` over the concatenated weights, through the model too. The GPU tests run it compiled."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.measure.gpu_bench import dense_gemm_case, lowered_for_cuda, round_robin_over_dense, time_s
from dwdp_jax.kernels import grouped_gemm
from dwdp_jax.kernels.split_gemm import Blocks, split_ragged_dot, tile_schedule
from dwdp_jax.kernels.split_gemm_mgpu import split_ragged_dot_mgpu
from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
from dwdp_jax.runtime.reference import prefill
from dwdp_jax.measure.kernel_sweeps import CANDIDATES, MGPU_CANDIDATES
from models import config as C
from models import deepseek_v3 as M
from models.deepseek_v3 import Params

SMALL = Blocks(block_m=16, block_n=16, block_k=16)
# 16-row half tiles: in the cases below, tiles with rows in the lower half only, the upper half only, and both
HALVES = Blocks(block_m=32, block_n=16, block_k=16, half_tiles=True)


def brute_force_tiles(sizes, counts, block_m):
    """(slab, group in slab, block, lo, hi) of every row tile, by walking the rows."""
    tiles, start, slab_of = [], 0, np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum((0,) + tuple(counts))[:-1]
    for g, size in enumerate(sizes):
        for row in range(start, start + size):
            block = row // block_m
            if tiles and tiles[-1][:3] == (slab_of[g], g - first[slab_of[g]], block) and tiles[-1][5] == g:
                tiles[-1] = tiles[-1][:4] + (row - block * block_m + 1, g)
            else:
                tiles.append((slab_of[g], g - first[slab_of[g]], block, row - block * block_m,
                              row - block * block_m + 1, g))
        start += size
    return [t[:5] for t in tiles]


@pytest.mark.parametrize("seed", range(6))
def test_tile_schedule_matches_row_walk(seed):
    rng = np.random.default_rng(seed)
    counts = tuple(int(c) for c in rng.integers(1, 5, size=rng.integers(1, 4)))
    sizes = rng.integers(0, 40, size=sum(counts)) * (rng.random(sum(counts)) < 0.7)
    num_rows = int(sizes.sum()) + int(rng.integers(0, 20))
    sched = np.asarray(tile_schedule(jnp.asarray(sizes, jnp.int32), counts, 16, num_rows))
    count = int(sched[5, 0])
    assert sched.shape[1] == -(-num_rows // 16) + len(sizes) - 1 >= count
    assert [tuple(int(v) for v in sched[:5, t]) for t in range(count)] == brute_force_tiles(sizes, counts, 16)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group_m,per_group", [(0, False), (2, True), (0, True)])
def test_pair_schedule_pairs_each_groups_consecutive_tiles(seed, group_m, per_group):
    """Pairs (for two CTAs on one weight tile): a group's tiles 1-2, 3-4, ..., an odd last one with a rowless
    partner on its own block; every tile in exactly one pair, no pair across groups; windows cover the pairs."""
    rng = np.random.default_rng(seed)
    counts = tuple(int(c) for c in rng.integers(1, 5, size=rng.integers(1, 4)))
    sizes = rng.integers(0, 70, size=sum(counts)) * (rng.random(sum(counts)) < 0.7)
    num_rows = int(sizes.sum()) + int(rng.integers(0, 20))
    sched = np.asarray(tile_schedule(jnp.asarray(sizes, jnp.int32), counts, 16, num_rows, group_m, per_group,
                                     pairs=True))
    assert sched.shape[0] == 11
    tiles = brute_force_tiles(sizes, counts, 16)
    expected = []
    for key in dict.fromkeys(t[:2] for t in tiles):  # (slab, group in slab), in order
        own = [t for t in tiles if t[:2] == key]
        for a, b in zip(own[::2], own[1::2] + [None]):
            expected.append(a + ((b[2], b[3], b[4]) if b else (a[2], 0, 0)))
    count = int(sched[5, 0])
    assert count == len(expected)
    assert [tuple(int(v) for v in (*sched[:5, p], *sched[8:, p])) for p in range(count)] == expected
    first, size = sched[6, :count], sched[7, :count]
    assert ((first <= np.arange(count)) & (np.arange(count) < first + size)).all()


def test_tile_schedule_refuses_wrong_slab_counts():
    with pytest.raises(ValueError, match="must sum to the number of groups 4"):
        tile_schedule(jnp.ones((4,), jnp.int32), (2, 1), 16, 8)


@pytest.mark.parametrize("sizes,counts,rows", [
    ([5, 0, 17, 3, 0, 9], (2, 3, 1), 40),  # empty groups, padding rows, three slabs
    ([0, 0, 33], (1, 2), 33),  # all rows in the last group, a partial last block
    ([90, 1, 1, 0], (4,), 96),  # skewed (one hot expert), one slab
    ([0, 0, 0, 0], (2, 2), 16),  # no rows at all
])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("blocks", [SMALL, HALVES], ids=["full_tiles", "half_tiles"])
def test_split_ragged_dot_matches_ragged_dot(sizes, counts, rows, fused, blocks):
    rng = np.random.default_rng(len(sizes) + rows)
    k, n = 32, 48
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((c, k, n)) / np.sqrt(k), jnp.float32) for c in counts]
    us = [jnp.asarray(rng.standard_normal((c, k, n)) / np.sqrt(k), jnp.float32) for c in counts]
    gs = jnp.asarray(sizes, jnp.int32)
    weights = tuple(zip(ws, us)) if fused else tuple(ws)
    ours = np.asarray(split_ragged_dot(jnp.full_like(x, jnp.nan).at[:].set(x), gs, weights, fused=fused,
                                       blocks=blocks, interpret=True))
    ref = jax.lax.ragged_dot(x, jnp.concatenate(ws), gs)
    if fused:
        ref = jax.nn.silu(ref) * jax.lax.ragged_dot(x, jnp.concatenate(us), gs)
    used = int(np.sum(sizes))
    ref = np.asarray(ref)[:used]
    assert np.isfinite(ours[:used]).all()
    assert np.linalg.norm(ours[:used] - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("order", [Blocks(16, 16, 16, group_m=2), Blocks(16, 16, 16, group_m=2, per_group=True),
                                   Blocks(16, 16, 16, per_group=True)])
def test_launch_orders_give_the_same_result(order):
    rng = np.random.default_rng(3)
    sizes, counts = [5, 0, 37, 3, 0, 19], (2, 3, 1)
    x = jnp.asarray(rng.standard_normal((70, 32)), jnp.float32)
    ws = tuple(jnp.asarray(rng.standard_normal((c, 32, 48)), jnp.float32) for c in counts)
    gs = jnp.asarray(sizes, jnp.int32)
    base = np.asarray(split_ragged_dot(x, gs, ws, blocks=SMALL, interpret=True))[:64]
    ours = np.asarray(split_ragged_dot(x, gs, ws, blocks=order, interpret=True))[:64]
    np.testing.assert_array_equal(ours, base)


@pytest.mark.parametrize("kernel", ["triton", "mgpu"])
@pytest.mark.parametrize("fused", [False, True])
def test_every_benchmarked_candidate_lowers_for_cuda_at_r1_sizes(fused, kernel):
    """Each configuration the GPU benchmark times lowers (on CPU: no GPU compile, no run): Mosaic GPU fits Hopper's
    shared memory; Triton passes its lowering's type rules, which interpret mode does not apply (boolean or/not
    failed there only on the GPU)."""
    run, candidates, marker = {"triton": (split_ragged_dot, CANDIDATES, "__gpu$xla.gpu.triton"),
                               "mgpu": (split_ragged_dot_mgpu, MGPU_CANDIDATES, "mosaic_gpu")}[kernel]
    for blocks in candidates[fused]:
        assert marker in lowered_for_cuda(run, fused, blocks), blocks


def test_round_robin_measures_a_known_ratio():
    """A 'kernel' doing the dense GEMM four times but credited with one GEMM's FLOPs runs below the dense rate, timed
    in rounds with it (only the order is asserted: CPU timings on a loaded machine say no more, and a kernel of two
    GEMMs once measured above 1 beside another test worker); no GPU, so no clock readings. The ratio arithmetic
    itself is checked on given readings below."""
    fn, args, flops = dense_gemm_case(384, 384, 384, jnp.float32)
    four = (jax.jit(lambda a, b: tuple((a + i) @ b for i in range(4))), args, flops)
    got = round_robin_over_dense({"four": four}, (fn, args, flops), rounds=5)
    assert 0 < got["four"]["over_dense"] < 1, got
    assert got["four"]["over_dense_min"] <= got["four"]["over_dense"] <= got["four"]["over_dense_max"]
    # the medians of the two rates come from different rounds: on a loaded CPU their order can flip, the ratio's not
    assert got["dense"]["over_dense"] == 1.0 and got["dense"]["tflops"] > 0 and got["four"]["tflops"] > 0


def test_round_robin_takes_each_rounds_dense_reading_and_clocks():
    """With a measurement that reports clocks (as `clocks_under_load` does), each case is divided by its own
    round's dense reading, and the ratio at equal clocks scales by the clocks' ratio."""
    readings = iter([{"tflops": 100.0, "sm_clock_mhz": 1500.0}, {"tflops": 75.0, "sm_clock_mhz": 1200.0},
                     {"tflops": 50.0, "sm_clock_mhz": 1000.0}, {"tflops": 40.0, "sm_clock_mhz": 1000.0}])
    got = round_robin_over_dense({"k": None}, None, rounds=2, measure=lambda case: next(readings))
    assert got["k"]["over_dense_min"] == pytest.approx(0.75) and got["k"]["over_dense_max"] == pytest.approx(0.8)
    assert got["k"]["over_dense_per_clock"] == pytest.approx((0.75 * 1500 / 1200 + 0.8) / 2)
    assert got["dense"]["over_dense"] == 1.0 and got["dense"]["sm_clock_mhz"] == 1250


def test_recorded_rates_rank_two_cases_as_their_per_round_ratios_do():
    """Clocks that move between rounds can order two cases' median rates against their per-round ratios (a faster
    in two rounds of three, b's median rate higher). What a benchmark records (`recorded_tflops`) follows the ratios,
    and `confirmed` keeps a sweep's pick only where its ratio beats the blocks before it."""
    from dwdp_jax.measure.gpu_bench import confirmed, recorded_tflops

    # per round: dense, a, b; a is faster in two of the three rounds
    readings = iter({"tflops": v} for v in (100.0, 90.0, 60.0, 50.0, 40.0, 45.0, 50.0, 40.0, 30.0))
    got = round_robin_over_dense({"a": None, "b": None}, None, rounds=3, measure=lambda case: next(readings))
    assert got["a"]["tflops"] < got["b"]["tflops"]  # median rates 40 against 45 ...
    assert got["a"]["over_dense"] > got["b"]["over_dense"]  # ... median ratios 0.8 against 0.6
    assert recorded_tflops(got, "a") == pytest.approx(40.0) and recorded_tflops(got, "b") == pytest.approx(30.0)
    metrics = {}
    got["b_before"] = got.pop("a")
    assert not confirmed("x", got, "b", metrics) and metrics["x_tuned_over_before"] < 1
    assert confirmed("x", {"b": got["b"]}, "b", {})  # nothing displaced


def test_uniform_routing_group_sizes_are_balanced():
    from dwdp_jax.measure.gpu_bench import skewed_group_sizes, uniform_group_sizes

    sizes = uniform_group_sizes(262144, 256)
    assert sizes.sum() == 262144 and sizes.min() > 0
    assert sizes.max() / sizes.mean() < 1.2 < skewed_group_sizes(262144, 256, 6.0).max() / sizes.mean()


def test_grouped_gemm_roofline_by_hand():
    """The roofline bound beside the grouped GEMM's ratio: compute-bound whole tiles reach the dense rate, padding
    costs real/padded rows, a memory-bound group its bytes at HBM bandwidth, empty groups nothing."""
    from dwdp_jax.measure.gpu_bench import grouped_gemm_roofline

    fast_hbm = 1e30
    assert grouped_gemm_roofline(np.array([256, 0, 512]), 64, 64, 64, 1e12, fast_hbm, tile_rows=128) == pytest.approx(1)
    assert grouped_gemm_roofline(np.array([65]), 64, 64, 64, 1e12, fast_hbm, tile_rows=128) == pytest.approx(65 / 128)
    # one group of 10 rows, k 1000, n 2000 (fused: out 1000): 4e7 FLOPs at 1e12/s = 40 us; bytes (2e6 + 10 x 2000)
    # x 2 at 1e10/s = 404 us
    got = grouped_gemm_roofline(np.array([10]), 1000, 2000, 1000, 1e12, 1e10)
    assert got == pytest.approx(40 / 404)
    # H200's ridge: about 155 rows per group (742 TFLOP/s over 4.8 TB/s); below it the bound drops
    h200 = dict(k=2048, n=7168, out_cols=7168, dense_flops_per_s=742e12, hbm_bytes_per_s=4.8e12)
    assert grouped_gemm_roofline(np.full(4, 1024), **h200) > 0.98 > 0.9 > grouped_gemm_roofline(np.full(4, 64), **h200)
    with pytest.raises(ValueError, match="tile_rows"):
        grouped_gemm_roofline(np.array([1]), 8, 8, 8, 1e12, 1e12, tile_rows=0)
    with pytest.raises(ValueError, match="rates must be > 0"):
        grouped_gemm_roofline(np.array([1]), 8, 8, 8, 1e12, 0.0)


def test_per_group_dense_case_multiplies_each_group_by_its_weights():
    """cuBLAS-per-group reference of the grouped GEMM benchmark: one output per non-empty group, equal to
    jax.lax.ragged_dot over the same rows and weights; FLOPs of the real rows."""
    from dwdp_jax.measure.gpu_bench import group_spans, per_group_dense_case

    sizes = np.array([3, 0, 5, 1])
    fn, (x, w), flops = per_group_dense_case(sizes, 16, 8, jnp.float32)
    outs = fn(x, w)
    assert len(outs) == 3 and flops == 2 * 9 * 16 * 8
    assert group_spans(sizes) == [(0, 0, 3), (2, 3, 8), (3, 8, 9)]
    ref = jax.lax.ragged_dot(x, w, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(np.concatenate(outs), ref, rtol=1e-5, atol=1e-5)


def test_sustained_timing_warms_up_for_the_given_seconds():
    """With sustain_s the warm-up calls go on until that long has passed; only the calls after it are timed."""
    calls = []

    def work():
        calls.append(time.perf_counter())
        time.sleep(0.01)
        return jnp.zeros(())

    seconds = time_s(work, repeats=3, warmup=1, sustain_s=0.2)
    # the warm-up spans 0.2 s, so more calls than warmup + repeats (how many more depends on the host's load)
    assert calls[-3] - calls[0] >= 0.2 and len(calls) > 1 + 3
    assert seconds >= 0.01  # each timed call sleeps 10 ms; no upper bound: a loaded machine sleeps longer
    calls.clear()
    time_s(work, repeats=3, warmup=1)
    assert len(calls) == 4


def test_split_ragged_dot_refuses_mismatched_slabs():
    x = jnp.zeros((16, 32), jnp.float32)
    with pytest.raises(ValueError, match="slab 1 weight"):
        split_ragged_dot(x, jnp.ones((2,), jnp.int32), (jnp.zeros((1, 32, 16)), jnp.zeros((1, 16, 16))),
                         blocks=SMALL, interpret=True)


def test_dwdp_with_split_kernel_matches_reference():
    """The model's MoE through the split kernel, on DWDP's unmerged slabs: the reference's logits (fp32)."""
    cfg = C.tiny(num_hidden_layers=3, first_k_dense_replace=1)
    params = Params(*M.init_model(cfg, seed=5))
    batch = pack([[1, 2, 3], [4, 5, 6, 7, 8, 9]], budget=32)
    ref = prefill(params, batch)
    engine = DwdpEngine(params, Placement.for_group(cfg.n_routed_experts, 4),
                        options=DwdpOptions(gemm_backend="pallas_split_interpret", poison=True))
    assert grouped_gemm.get_split_backend("pallas_split_interpret") is not None
    for rank in (0, 2):
        out = engine.step(rank, batch).output
        assert np.linalg.norm(out.logits_TV - ref.logits_TV) <= 1e-5 * np.linalg.norm(ref.logits_TV)


def _visits(sizes, block_m, num_rows, cols, group_m, per_group, pairs=False):
    from dwdp_jax.kernels.split_gemm import launch_order

    sched = np.asarray(tile_schedule(jnp.asarray(sizes, jnp.int32), (len(sizes),), block_m, num_rows, group_m,
                                     per_group, pairs=pairs))
    pairs = [tuple(int(v) for v in launch_order(p, sched, cols)) for p in range(sched.shape[1] * cols)]
    return sched, pairs


@pytest.mark.parametrize("group_m,per_group", [(0, False), (2, False), (3, False), (1, False), (0, True), (2, True),
                                               (3, True)])
@pytest.mark.parametrize("sizes", [[5, 0, 17, 3, 0, 9], [40, 1, 1, 0], [0, 0, 0, 0], [7]])
@pytest.mark.parametrize("tile_pairs", [False, True], ids=["tiles", "pairs"])
def test_launch_order_visits_every_tile_and_block_once(sizes, group_m, per_group, tile_pairs):
    """Over tiles, and over pairs of a group's tiles (`tile_schedule(pairs=True)`, two CTAs on one weight tile)."""
    sched, pairs = _visits(sizes, 4, sum(sizes) + 3, 3, group_m, per_group, tile_pairs)
    num_tiles, count = sched.shape[1], int(sched[5, 0])
    assert sorted(pairs) == [(t, n) for t in range(num_tiles) for n in range(3)]
    # programs come window by window; inside a window the row tiles change fastest (rows reused across blocks)
    windows = [(int(sched[6, t]), int(sched[7, t])) for t in range(num_tiles)]
    pos = 0
    for first, size in sorted(set(windows)):
        assert pairs[pos:pos + size] == [(first + i, 0) for i in range(size)]
        pos += size * 3
    if group_m:
        assert all(size <= group_m for first, size in windows[:count])
    if per_group:  # no real window mixes two expert groups
        assert all(len({int(sched[1, t]) for t in range(first, first + size)}) == 1
                   for first, size in windows[:count])


def test_default_launch_order_is_column_block_major():
    """group_m 0 (the measured default) is one window of all row tiles: every tile of column block 0 comes first."""
    sched, pairs = _visits([3, 9, 4], 4, 16, 3, 0, False)
    num_tiles = sched.shape[1]
    assert pairs == [(t, n) for n in range(3) for t in range(num_tiles)]


@pytest.mark.parametrize("align", [1, 4, 128])
def test_align_groups_starts_every_group_on_a_tile(align):
    """Each expert's rows keep their order and start at a multiple of `align`; rows past the real ones (padding
    tokens) follow the last padded group; no two rows share a place."""
    from models.experts import align_groups

    sizes = np.array([5, 0, 8, 1, 13, 0, 4], np.int32)
    num_rows = int(sizes.sum()) + 3  # three rows of padding tokens
    aligned, padded, total = align_groups(jnp.asarray(sizes), num_rows, align)
    aligned, padded = np.asarray(aligned), np.asarray(padded)
    assert total == num_rows + len(sizes) * (align - 1)
    np.testing.assert_array_equal(padded, -(-sizes // align) * align)
    starts, padded_starts = np.cumsum(sizes) - sizes, np.cumsum(padded) - padded
    for e, n in enumerate(sizes):
        np.testing.assert_array_equal(aligned[starts[e]:starts[e] + n], padded_starts[e] + np.arange(n))
        assert padded_starts[e] % align == 0
    np.testing.assert_array_equal(aligned[sizes.sum():], padded.sum() + np.arange(3))
    assert len(set(aligned.tolist())) == num_rows and aligned.max() < total


def test_tile_aligned_moe_equals_the_unaligned_one():
    """A backend that asks for aligned groups (here XLA's ragged_dot registered with row_align 16) computes the
    same MoE output bit for bit: padding rows are zeros no one reads, real rows see the same weights."""
    from models.experts import ExpertSlab, ExpertView, grouped_ffn_over_slabs

    grouped_gemm.register_split_backend("xla_aligned_for_test", lambda x, sizes, slabs: grouped_ffn_over_slabs(
        x, sizes, slabs, "xla"), row_align=16)
    assert grouped_gemm.row_alignment("xla_aligned_for_test") == 16 and grouped_gemm.row_alignment("xla") == 1
    assert grouped_gemm.row_alignment("pallas_split") == 128
    assert grouped_gemm.row_alignment("pallas_split_unaligned") == 1
    t, k, d, f, e = 40, 4, 32, 16, 8
    keys = jax.random.split(jax.random.key(3), 6)
    x = jax.random.normal(keys[0], (t, d), jnp.float32)
    ids = jax.vmap(lambda kk: jax.random.choice(kk, e, (k,), replace=False))(jax.random.split(keys[1], t))
    weights = jax.random.uniform(keys[2], (t, k))
    slabs = tuple(ExpertSlab(*(0.1 * jax.random.normal(kk, shape) for kk, shape in zip(
        jax.random.split(keys[3 + i], 3), ((c, d, f), (c, d, f), (c, f, d)))), start=s)
        for i, (s, c) in enumerate(((0, 3), (3, 5))))
    valid = jnp.arange(t) < t - 5  # padding tokens sort last
    plain = ExpertView(slabs, e, "xla")(x, ids, weights, valid)
    aligned = ExpertView(slabs, e, "xla_aligned_for_test")(x, ids, weights, valid)
    np.testing.assert_array_equal(np.asarray(aligned)[:t - 5], np.asarray(plain)[:t - 5])


def test_combine_gathers_rows_instead_of_scattering_them():
    """The unsort is a gather through an int32 inverse (no [M, D] scatter buffer) and sums in fp32: equal to the
    scatter-based unsort it replaced."""
    import re

    from models.experts import combine, sort_by_expert

    t, k, d, e = 64, 4, 32, 8
    ids = jax.random.randint(jax.random.key(0), (t, k), 0, e)
    w = jax.random.uniform(jax.random.key(1), (t, k))
    y = jax.random.normal(jax.random.key(2), (t * k, d), jnp.float32).astype(jnp.bfloat16)
    order, _ = sort_by_expert(ids, e)
    expected = jnp.einsum("tkd,tk->td", jnp.zeros_like(y).at[order].set(y).reshape(t, k, d).astype(jnp.float32), w)
    np.testing.assert_allclose(np.asarray(combine(y, order, w), np.float32),
                               np.asarray(expected.astype(jnp.bfloat16), np.float32), rtol=1e-2, atol=1e-2)
    hlo = jax.jit(combine).lower(y, order, w).compile().as_text()
    scatters = re.findall(r"= (\w+)\[([\d,]*)\][^=]*? scatter\(", hlo)
    assert scatters and all(dtype == "s32" and dims == str(t * k) for dtype, dims in scatters), scatters


def test_blocks_refuse_impossible_sizes():
    with pytest.raises(ValueError, match=r"Blocks.group_m must be >= 0"):
        Blocks(group_m=-1)
    with pytest.raises(ValueError, match=r"Blocks.block_k must be >= 1, got 0"):
        Blocks(block_k=0)
    with pytest.raises(ValueError, match="half_tiles needs block_m a multiple of 32"):
        Blocks(block_m=16, half_tiles=True)


def test_hbm_rate_counts_every_pass_and_refuses_empty_buffers(monkeypatch):
    """The rate counts the buffer's bytes once per in-program pass (timed at a given 0.5 s), a real run gives a
    positive rate, and nonsense sizes are refused before any work."""
    from dwdp_jax.measure import gpu_bench
    from dwdp_jax.measure.gpu_bench import hbm_gbps

    assert hbm_gbps(1 << 20, 4) > 0
    monkeypatch.setattr(gpu_bench, "time_s", lambda fn, *args, **kw: 0.5)
    assert hbm_gbps(1 << 24, 16) == pytest.approx(16 * (1 << 24) / 0.5 / 1e9)
    assert hbm_gbps(1 << 24, 4) == pytest.approx(4 * (1 << 24) / 0.5 / 1e9)
    with pytest.raises(ValueError, match="num_bytes must be >= 4 and passes >= 1"):
        hbm_gbps(2)
    with pytest.raises(ValueError, match="got 1024, 0"):
        hbm_gbps(1024, 0)


def test_clocks_under_load_reads_the_second_half_of_nvidia_smis_samples(tmp_path, monkeypatch):
    """A stand-in nvidia-smi prints 1400 MHz / 300 W then 1700 MHz / 650 W (and one unreadable line): the medians
    come from the later samples, the span the rate is timed over; no samples at all is an error, not a zero."""
    from dwdp_jax.measure.gpu_bench import clocks_under_load

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '1400, 300.0\\n1400, 300.0\\n[N/A], [N/A]\\n1700, 650.0\\n1700, 650.0\\n'\n"
                   "exec sleep 5\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    got = clocks_under_load(dense_gemm_case(256, 256, 256, jnp.float32), seconds=0.5)
    assert got["sm_clock_mhz"] == 1700 and got["power_w"] == 650 and got["tflops"] > 0
    fn, args, flops = dense_gemm_case(256, 256, 256, jnp.float32)
    slow = (lambda *a: (time.sleep(0.3), fn(*a))[1], args, flops)  # one call outlasts all the seconds
    assert clocks_under_load(slow, seconds=0.1)["tflops"] > 0
    smi.write_text("#!/bin/sh\nexec sleep 5\n")
    with pytest.raises(RuntimeError, match="no clock and power samples"):
        clocks_under_load(dense_gemm_case(64, 64, 64, jnp.float32), seconds=0.2)


@pytest.mark.parametrize("dtype,d,words", [(jnp.float8_e4m3fn, 256, True), (jnp.bfloat16, 64, True),
                                           (jnp.float32, 32, False), (jnp.float8_e4m3fn, 6, False)])
def test_take_rows_moves_narrow_rows_as_words_bit_for_bit(dtype, d, words):
    """The permute's gather: bit for bit `jnp.take` (NaN and -0 bytes included, out-of-range rows zero), and for
    e4m3 / bf16 rows whose bytes divide into 32-bit words, a gather of u32 words in the compiled HLO."""
    import re

    from models.experts import take_rows

    raw = jax.random.randint(jax.random.key(0), (9, d * jnp.dtype(dtype).itemsize), 0, 256, jnp.int32)
    x = jax.lax.bitcast_convert_type(raw.astype(jnp.uint8).reshape(9, d, -1), dtype).reshape(9, d)
    rows = jnp.array([3, 8, 0, 9, 100, 2, 2, -20], jnp.int32)  # 9, 100: past the rows; -20: negative
    got, want = take_rows(x, rows), jnp.take(x, rows, axis=0, mode="fill", fill_value=0)
    assert got.dtype == x.dtype and got.shape == (8, d)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    hlo = jax.jit(take_rows).lower(x, rows).compile().as_text()
    assert bool(re.search(r"u32\[[\d,]+\][^=]*? gather\(", hlo)) == words, hlo
