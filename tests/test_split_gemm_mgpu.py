"""The Mosaic GPU split-weight grouped GEMM on CPU: its output in Mosaic GPU interpret mode against
`jax.lax.ragged_dot` over the concatenated weights, and its lowering for CUDA at DeepSeek-R1 sizes (shared memory
and the TMA/wgmma lowering are checked there, before any GPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels.grouped_gemm import xla_grouped_ffn
from dwdp_jax.kernels.split_gemm import split_grouped_ffn
from dwdp_jax.kernels.split_gemm_mgpu import MgpuBlocks, split_ragged_dot_mgpu, store_block
from models.experts import ExpertSlab

# Two CTAs of 64 rows x 2 x 32 columns: several row tiles and column blocks per CTA, interpreted in seconds.
SMALL = MgpuBlocks(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, num_sms=2)
SMALL_FUSED = MgpuBlocks(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, num_sms=3)


def _bf16(key, shape, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)


def _rel(a, b):
    return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))


# empty groups, tiles cut at group boundaries, rows not a multiple of tile_m (padded), a group spanning tiles,
# full tiles (rows 0-63; 384-447 of the last group)
SIZES = np.array([70, 0, 130, 5, 64, 100, 128], np.int32)


# chained tile pipelines: every CTA with several tiles (2 SMs), and (at one 128-column block: 13 tiles on 7 SMs)
# CTAs with two tiles beside one with a lone tile
CHAINED = [dataclasses.replace(SMALL, chain=True, num_sms=sms) for sms in (2, 7)]


# 128-row tiles stored in two halves: the groups above cut tiles in either half, or span both; with the swizzled
# view, full halves (rows 0-63) leave through it and cut ones through the plain view
HALVES = [dataclasses.replace(SMALL, tile_m=128, half_store=True),
          dataclasses.replace(SMALL, tile_m=128, half_store=True, chain=True),
          dataclasses.replace(SMALL, tile_m=128, half_store=True, swizzled_store=True)]


@pytest.mark.parametrize("blocks", [SMALL] + CHAINED + [dataclasses.replace(SMALL, delay_release=1),
                                                         dataclasses.replace(SMALL, swizzled_store=True)] + HALVES,
                         ids=["alone", "chained", "chained_lone_tiles", "wgmma_in_flight", "swizzled_store",
                              "half_store", "chained_half_store", "swizzled_half_store"])
def test_plain_over_two_slabs_matches_ragged_dot(blocks):
    m, k, n = int(SIZES.sum()), 128, 128 if blocks == CHAINED[1] else 256
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = _bf16(kx, (m, k)), _bf16(kw, (len(SIZES), k, n))
    out = split_ragged_dot_mgpu(x, jnp.asarray(SIZES), (w[:2], w[2:]), blocks=blocks, interpret=True)
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(SIZES))
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < 4e-3  # bf16 rounding of the output only


@pytest.mark.parametrize("blocks", [dataclasses.replace(SMALL, swizzled_store=True), HALVES[-1]],
                         ids=["swizzled_store", "swizzled_half_store"])
def test_tile_aligned_groups_leave_through_the_swizzled_view(blocks):
    """The model's layout: every group padded to whole 128-row tiles, so every tile (and half) is full and takes
    the swizzled store; the padding rows are computed like real ones."""
    sizes = -(-SIZES // 128) * 128
    m, k, n = int(sizes.sum()), 128, 256
    kx, kw = jax.random.split(jax.random.key(3))
    x, w = _bf16(kx, (m, k)), _bf16(kw, (len(sizes), k, n))
    out = split_ragged_dot_mgpu(x, jnp.asarray(sizes), (w[:4], w[4:]), blocks=blocks, interpret=True)
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(sizes))
    assert _rel(out, ref) < 4e-3


@pytest.mark.parametrize("blocks", [SMALL_FUSED, dataclasses.replace(SMALL_FUSED, chain=True),
                                    dataclasses.replace(SMALL_FUSED, delay_release=1),
                                    dataclasses.replace(SMALL_FUSED, chain=True, swizzled_store=True)],
                         ids=["alone", "chained", "wgmma_in_flight", "chained_swizzled_store"])
def test_fused_gate_up_matches_swiglu_of_ragged_dots(blocks):
    m, k, n = int(SIZES.sum()), 128, 128
    ks = jax.random.split(jax.random.key(1), 3)
    x, g, u = _bf16(ks[0], (m, k)), _bf16(ks[1], (len(SIZES), k, n)), _bf16(ks[2], (len(SIZES), k, n))
    out = split_ragged_dot_mgpu(x, jnp.asarray(SIZES), ((g[:3], u[:3]), (g[3:], u[3:])), fused=True,
                                blocks=blocks, interpret=True)
    f32, gs = (lambda a: a.astype(jnp.float32)), jnp.asarray(SIZES)
    ref = jax.nn.silu(jax.lax.ragged_dot(f32(x), f32(g), gs)) * jax.lax.ragged_dot(f32(x), f32(u), gs)
    assert _rel(out, ref) < 4e-3


def test_bad_shapes_and_blocks_are_refused():
    x = jnp.zeros((64, 96), jnp.bfloat16)
    w = jnp.zeros((2, 96, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=96 must be a multiple of tile_k=64"):
        split_ragged_dot_mgpu(x, jnp.array([32, 32]), (w,), blocks=SMALL)
    with pytest.raises(ValueError, match="slab 0 weight"):
        split_ragged_dot_mgpu(x, jnp.array([32, 32]), (jnp.zeros((2, 96, 128), jnp.float32),), blocks=SMALL)
    with pytest.raises(ValueError, match=r"K / tile_k = 3 divisible by max_concurrent_steps=2"):
        split_ragged_dot_mgpu(jnp.zeros((64, 192), jnp.bfloat16), jnp.array([32, 32]),
                              (jnp.zeros((2, 192, 128), jnp.bfloat16),), blocks=CHAINED[0])
    with pytest.raises(ValueError, match="tile_m must be a multiple of 64"):
        MgpuBlocks(tile_m=32)
    with pytest.raises(ValueError, match="MgpuBlocks.tile_k must be >= 1"):
        MgpuBlocks(tile_k=0)
    with pytest.raises(ValueError, match=r"delay_release must be in \[0, max_concurrent_steps=2\), got 2"):
        MgpuBlocks(max_concurrent_steps=2, delay_release=2)
    with pytest.raises(ValueError, match="chain and delay_release cannot be combined"):
        MgpuBlocks(chain=True, delay_release=1)


def test_expert_ffn_with_the_mgpu_kernel_matches_xla():
    """The backend `pallas_split_mgpu` composes the fused gate/up and the down kernels (here interpreted)."""
    sizes = np.array([40, 0, 88], np.int32)
    m, d, f = int(sizes.sum()) + 8, 128, 128  # 8 rows past the groups come back zero
    ks = jax.random.split(jax.random.key(2), 4)
    x = _bf16(ks[0], (m, d))
    gate, up, down = _bf16(ks[1], (3, d, f), 0.1), _bf16(ks[2], (3, d, f), 0.1), _bf16(ks[3], (3, f, d), 0.1)
    slabs = (ExpertSlab(gate[:1], up[:1], down[:1], start=0), ExpertSlab(gate[1:], up[1:], down[1:], start=1))

    def mgpu(*args, fused=False, interpret=False):
        return split_ragged_dot_mgpu(*args, fused=fused, interpret=interpret,
                                     blocks=SMALL_FUSED if fused else SMALL)

    out = split_grouped_ffn(x, jnp.asarray(sizes), slabs, interpret=True, ragged_dot=mgpu)
    ref = xla_grouped_ffn(x.astype(jnp.float32), jnp.asarray(sizes), gate.astype(jnp.float32),
                          up.astype(jnp.float32), down.astype(jnp.float32))
    assert _rel(out, ref) < 2e-2  # bf16 intermediate h
    np.testing.assert_array_equal(np.asarray(out[-8:], np.float32), 0)


def test_half_stores_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="half_store needs tile_m a multiple of 128"):
        MgpuBlocks(half_store=True, tile_m=64)


def test_clusters_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="cluster_n and chain cannot be combined"):
        MgpuBlocks(cluster_n=True, chain=True)
    with pytest.raises(ValueError, match="cluster_n needs an even num_sms"):
        MgpuBlocks(cluster_n=True, num_sms=131)
    x, w = jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((2, 128, 384), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"N=384 of 256 \(2 \* tile_n \* 2 CTAs with cluster_n\)"):
        split_ragged_dot_mgpu(x, jnp.array([32, 32]), (w,),
                              blocks=dataclasses.replace(SMALL, num_sms=2, cluster_n=True))


def test_row_blocks_are_stored_through_the_plain_view_only():
    """`store_block` takes a sequence of row blocks through the plain view; a swizzled view with them is refused
    before any store is issued."""
    with pytest.raises(ValueError, match="row blocks go through the plain view"):
        store_block([jnp.zeros((64, 128))], None, object(), None, 0, 64, 0, 0, 128)
