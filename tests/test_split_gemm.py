"""The split-weight grouped GEMM (Pallas Triton) in interpret mode on CPU: its tile schedule, and its output
against `jax.lax.ragged_dot` over the concatenated weights, through the model too. The GPU tests run it compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import grouped_gemm
from dwdp_jax.kernels.split_gemm import Blocks, split_ragged_dot, tile_schedule
from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
from dwdp_jax.runtime.reference import Params, prefill
from models import config as C
from models import deepseek_v3 as M

SMALL = Blocks(block_m=16, block_n=16, block_k=16)


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
def test_split_ragged_dot_matches_ragged_dot(sizes, counts, rows, fused):
    rng = np.random.default_rng(len(sizes) + rows)
    k, n = 32, 48
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((c, k, n)) / np.sqrt(k), jnp.float32) for c in counts]
    us = [jnp.asarray(rng.standard_normal((c, k, n)) / np.sqrt(k), jnp.float32) for c in counts]
    gs = jnp.asarray(sizes, jnp.int32)
    weights = tuple(zip(ws, us)) if fused else tuple(ws)
    ours = np.asarray(split_ragged_dot(jnp.full_like(x, jnp.nan).at[:].set(x), gs, weights, fused=fused,
                                       blocks=SMALL, interpret=True))
    ref = jax.lax.ragged_dot(x, jnp.concatenate(ws), gs)
    if fused:
        ref = jax.nn.silu(ref) * jax.lax.ragged_dot(x, jnp.concatenate(us), gs)
    used = int(np.sum(sizes))
    ref = np.asarray(ref)[:used]
    assert np.isfinite(ours[:used]).all()
    assert np.linalg.norm(ours[:used] - ref) <= 1e-5 * max(np.linalg.norm(ref), 1e-30)


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


@pytest.mark.parametrize("tiles,blocks,group", [(10, 3, 4), (7, 5, 8), (9, 1, 2), (4, 6, 1)])
def test_launch_order_visits_every_tile_and_block_once(tiles, blocks, group):
    from dwdp_jax.kernels.split_gemm import launch_order

    pairs = [tuple(int(v) for v in launch_order(jnp.int32(p), tiles, blocks, group)) for p in range(tiles * blocks)]
    assert sorted(pairs) == [(t, n) for t in range(tiles) for n in range(blocks)]
    # within a group the row tiles change fastest, so a group's rows are reused across column blocks
    assert [t for t, _ in pairs[:min(group, tiles)]] == list(range(min(group, tiles)))


def test_default_launch_order_is_column_block_major():
    """group_m 0 (the measured default) is one group of all row tiles: every tile of column block 0 comes first."""
    from dwdp_jax.kernels.split_gemm import launch_order

    pairs = [tuple(int(v) for v in launch_order(jnp.int32(p), 5, 3, 5)) for p in range(15)]
    assert pairs == [(t, n) for n in range(3) for t in range(5)]
