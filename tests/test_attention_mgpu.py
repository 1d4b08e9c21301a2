"""The FlashAttention-3-schedule MLA prefill kernel (`attention_mgpu`): on CPU its tile schedule against the packed
causal mask, its lowering for CUDA at every swept schedule, its input checks, and its output in Mosaic GPU's
interpreter against the XLA reference; on a Hopper GPU (`pytest -m gpu`) the compiled kernel's output against the
XLA reference on packed variable-length batches, with poisoned neighbours."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import attention, attention_mgpu as am, attention_tokamax as tk, tuning
from test_attention_tokamax import (LENGTHS, SCALE, _per_sequence_rel, _reference, check_no_leak, check_packed_batch,
                                    check_packed_output, mla_rel_to_xla, packed, packed_inputs, qkv)

HOPPER = SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")


def _hopper() -> bool:
    d = jax.devices()[0]
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9.")


def hopper(fn):
    for mark in (pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs an NVIDIA Hopper GPU")):
        fn = mark(fn)
    return fn


# ---- CPU ----

def test_registered_under_its_name():
    assert attention.get_backend("mgpu") is am.mgpu_attention


@pytest.mark.parametrize("block_kv", [64, 128])
def test_tile_ranges_cover_every_attended_key_and_skip_the_mask_only_where_it_is_all_true(block_kv):
    """Per 128-row query tile: the keys of [first, end) blocks hold every key a row attends; a block the kernel
    leaves unmasked for a warpgroup (at or past its rows' latest sequence start, wholly at or before its first row)
    is attended by all of the warpgroup's rows."""
    lengths = (5, 300, 1, 77, 129, 128, 300)  # 940 tokens, padded to 1024 with its own run
    seg, pos, _ = packed(lengths, budget=1024)
    starts = np.asarray(tk.sequence_starts(seg))
    ranges = np.asarray(am.tile_ranges(jnp.asarray(starts), block_kv))
    assert ranges.shape == (4, 1024 // am.TILE_Q)
    idx = np.arange(1024)
    mask = (idx[None, :] >= starts[:, None]) & (idx[None, :] <= idx[:, None])  # as attention.packed_causal_mask
    for t in range(ranges.shape[1]):
        first, end = ranges[0, t], ranges[1, t]
        rows = slice(t * am.TILE_Q, (t + 1) * am.TILE_Q)
        keys = np.flatnonzero(mask[rows].any(axis=0))
        assert first * block_kv <= keys.min() and keys.max() < end * block_kv
        assert mask[rows, first * block_kv:(first + 1) * block_kv].any()  # the first block is needed
        for wg in range(am.COMPUTE_WGS):
            q_base = t * am.TILE_Q + wg * am.BLOCK_Q
            wg_mask = mask[q_base:q_base + am.BLOCK_Q]
            for j in range(first, end):
                k_base = j * block_kv
                if not (k_base < ranges[2 + wg, t] or k_base + block_kv > q_base):
                    assert wg_mask[:, k_base:k_base + block_kv].all(), (t, wg, j)


@pytest.mark.parametrize("lengths", [LENGTHS, (8192,)], ids=["packed", "one_8k"])
def test_every_candidate_lowers_for_cuda_at_mla_widths(lengths):
    """Mosaic GPU's layout inference and the 227 KiB shared-memory bound run when lowering, on any host."""
    t = sum(lengths)
    q = jax.ShapeDtypeStruct((t, 8, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((t, 8, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((t,), jnp.int32)
    cands = am.candidate_blocks(192, 128)
    assert am.DEFAULT_BLOCKS in cands and len(cands) >= 6
    for b in cands:
        f = jax.jit(functools.partial(am.mgpu_attention, scale=SCALE, blocks=b, device=HOPPER))
        assert "mosaic_gpu" in f.trace(q, q, v, ids, ids).lower(lowering_platforms=("cuda",)).as_text(), b


def test_blocks_shared_memory_and_registers():
    assert am.DEFAULT_BLOCKS.smem_bytes(192, 128) == (128 * 192 + 2 * 128 * 320) * 2  # 208 KiB
    assert am.DEFAULT_BLOCKS.fits(192, 128)
    assert not am.Blocks(block_kv=128, num_stages=3).fits(192, 128)  # 288 KiB
    assert am.Blocks(block_kv=64, num_stages=4).fits(192, 128)
    assert not am.Blocks(block_kv=256, num_stages=2).fits(128, 128)  # 256 + 64 tile registers a thread


def test_blocks_come_from_the_cache_nearest_in_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    assert am.blocks_for(32768, 192, 128, "NVIDIA H200") == am.DEFAULT_BLOCKS
    tuning.record(am.KERNEL, "NVIDIA H200", 192, 128, False, 32768, am.Blocks(64, 4, False), 700.0, "test")
    assert am.blocks_for(30000, 192, 128, "NVIDIA H200") == am.Blocks(64, 4, False)
    assert am.blocks_for(30000, 192, 128, "NVIDIA H100 80GB HBM3") == am.DEFAULT_BLOCKS


def test_hopper_backend_takes_the_kernel_cached_faster(tmp_path, monkeypatch):
    """`hopper` (the GPU presets' attention): tokamax unless both kernels have entries; then the higher cached rate
    (bench_attention --tune times them in one run); tokamax where mgpu cannot take the widths."""
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(tmp_path / "blocks.json"))
    fastest = attention.fastest_hopper_kernel
    assert fastest(32768, 192, 128, "NVIDIA H200") == tk.KERNEL
    tuning.record(am.KERNEL, "NVIDIA H200", 192, 128, False, 32768, am.Blocks(), 457.0, "test")
    assert fastest(32768, 192, 128, "NVIDIA H200") == tk.KERNEL  # a lone mgpu rate was timed against nothing
    tuning.record(tk.KERNEL, "NVIDIA H200", 192, 128, False, 32768, tk.Blocks(), 585.0, "test")
    tuning.record(am.KERNEL, "NVIDIA H200", 192, 128, False, 32768, am.Blocks(), 560.0, "test")
    assert fastest(32768, 192, 128, "NVIDIA H200") == tk.KERNEL
    tuning.record(am.KERNEL, "NVIDIA H200", 192, 128, False, 32768, am.Blocks(64, 4), 640.0, "test")
    assert fastest(30000, 192, 128, "NVIDIA H200") == am.KERNEL
    tuning.record(am.KERNEL, "NVIDIA H200", 128, 192, False, 32768, am.Blocks(), 900.0, "test")
    assert fastest(32768, 128, 192, "NVIDIA H200") == tk.KERNEL  # v wider than q/k: not mgpu's
    q, k, v = qkv(256, 2)
    seg = jnp.zeros((256,), jnp.int32)
    calls = []
    monkeypatch.setitem(attention.HOPPER_KERNELS, am.KERNEL, lambda *a, **kw: calls.append(kw) or am.mgpu_attention(
        *a, **kw))
    out = jax.eval_shape(functools.partial(attention.get_backend("hopper"), scale=SCALE, device=HOPPER), q, k, v, seg,
                         seg)
    assert out.shape == (256, 2, 128) and calls and calls[0]["device"] is HOPPER


def test_bad_inputs_are_refused_before_launch():
    seg = jnp.zeros((256,), jnp.int32)

    def run(qk=192, v=128, dtype=jnp.bfloat16, device=HOPPER, **kw):
        q, k, vv = qkv(256, 2, qk, v, dtype=dtype)
        return jax.eval_shape(functools.partial(am.mgpu_attention, scale=SCALE, device=device, **kw),
                              q, k, vv, seg, seg)

    assert run().shape == (256, 2, 128)
    with pytest.raises(ValueError, match="q/k head_dim=96 is not supported: a multiple of 64"):
        run(qk=96)
    with pytest.raises(ValueError, match="v head_dim=256 must be <= q/k head_dim=192"):
        run(v=256)
    with pytest.raises(ValueError, match="v head_dim=192 must be <= q/k head_dim=256 and divide 64 \\* 256"):
        run(qk=256, v=192)
    with pytest.raises(ValueError, match="needs 294912 bytes of shared memory"):
        run(blocks=am.Blocks(num_stages=3))
    with pytest.raises(ValueError, match="must share one dtype of \\['bfloat16', 'float16'\\]"):
        run(dtype=jnp.float32)
    with pytest.raises(ValueError, match="rescale_threshold must be in \\(0, 1\\]"):
        run(rescale_threshold=0.0)
    with pytest.raises(ValueError, match="attention_impl='mgpu' needs an NVIDIA Hopper GPU"):
        run(device=SimpleNamespace(platform="gpu", device_kind="NVIDIA A100", compute_capability="8.0"))
    with pytest.raises(ValueError, match="block_kv must be 64, 128, 192 or 256"):
        am.Blocks(block_kv=96)
    with pytest.raises(ValueError, match="num_stages must be >= 2"):
        am.Blocks(num_stages=1)


def test_the_config_refuses_head_dims_it_does_not_take(tmp_path):
    """The tiny preset's heads (q/k 48, v 32) are refused when the config is checked, before any model is built."""
    from dwdp_jax import validation
    from test_context_bench_validation import config_with

    c = config_with(tmp_path, attention_impl="mgpu")
    with pytest.raises(ValueError, match="config.attention_impl='mgpu': attention_mgpu: q/k head_dim=.* is not "
                                         "supported"):
        validation.validate(c)


# ---- CPU, Mosaic GPU's interpreter: against the XLA reference ----

INTERPRET_LENGTHS = (100, 1, 70, 60)  # 231 tokens padded to 256: two query tiles, a 1-token sequence


@pytest.mark.parametrize("blocks,budget", [(am.DEFAULT_BLOCKS, 256), (am.Blocks(64, 3, ping_pong=False), 240),
                                           (am.Blocks(64, 2, overlap=False), 256)],
                         ids=["default", "kv64_3stages_padded", "no_overlap"])
def test_interpreted_kernel_matches_xla_on_a_packed_batch(blocks, budget):
    """The kernel's schedule (stages, barriers, the sequence and causal masks, the lazy maximum, the overlapped
    issue order) in Mosaic GPU's interpreter, whose wgmma is synchronous: the fp32 reference per sequence (240
    tokens: padded to whole query tiles inside)."""
    check_packed_batch(functools.partial(am.mgpu_attention, scale=SCALE, blocks=blocks, interpret=True),
                       INTERPRET_LENGTHS, budget, 2, seed=4)


def test_interpreted_kernel_attends_within_sequences_only():
    """240 tokens: the kernel pads them to whole query tiles as one more sequence."""
    check_no_leak(functools.partial(am.mgpu_attention, scale=SCALE, blocks=am.Blocks(64, 2), interpret=True),
                  INTERPRET_LENGTHS, 240, 1, parities=(1,), seed=5)


@pytest.mark.parametrize("threshold", [tk.RESCALE_THRESHOLD, 1.0], ids=["lazy", "eager"])
def test_interpreted_kernel_follows_growing_row_maxima(threshold):
    """Keys grow along the sequence, so rows' maxima rise block after block, past 2^8 and below it."""
    lengths = (256,)
    seg, pos, b = packed(lengths, budget=256)
    q, k, v = qkv(b.budget, 1, seed=3)
    k = (k.astype(jnp.float32) * jnp.linspace(0.5, 12.0, 256)[:, None, None]).astype(jnp.bfloat16)
    ours = am.mgpu_attention(q, k, v, seg, pos, scale=SCALE, blocks=am.Blocks(64, 2), rescale_threshold=threshold,
                             interpret=True)
    assert max(_per_sequence_rel(ours, _reference(q, k, v, seg, pos), lengths)) < 1e-2


# ---- GPU: compiled, against the XLA reference ----

@hopper
def test_packed_batch_matches_xla_with_every_swept_option():
    """The defaults and the fewest candidates that between them take every option the sweep times (and the cached
    blocks), compiled at once, each against the fp32 reference."""
    from test_gpu import covering, run_each

    candidates = list(dict.fromkeys([am.DEFAULT_BLOCKS]
                                    + covering(am.candidate_blocks(192, 128), am.KERNEL, 192, 128, False)))
    inputs = packed_inputs(LENGTHS, 1000, 8)
    kernel = jax.jit(am.mgpu_attention, static_argnames=("scale", "blocks"))
    for blocks, out in zip(candidates, run_each(kernel, candidates, inputs, {"scale": SCALE})):
        try:
            check_packed_output(out, inputs, LENGTHS)
        except AssertionError as e:
            raise AssertionError(f"{blocks}: {e}") from e


@hopper
def test_no_attention_across_sequences():
    check_no_leak(jax.jit(functools.partial(am.mgpu_attention, scale=SCALE)), LENGTHS, 1000, 8)


@hopper
@pytest.mark.parametrize("threshold", [tk.RESCALE_THRESHOLD, 1.0], ids=["lazy", "eager"])
def test_growing_row_maxima_match_xla(threshold):
    """A row's maximum rises block after block, past the lazy threshold's 2^8 and below it."""
    lengths = (700, 300)
    seg, pos, b = packed(lengths, budget=1024)
    q, k, v = qkv(b.budget, 4, seed=3)
    growth = jnp.asarray(np.concatenate([np.linspace(0.5, 6.0, n) for n in lengths] + [np.ones(24)]), jnp.float32)
    k = (k.astype(jnp.float32) * growth[:, None, None]).astype(jnp.bfloat16)
    f = jax.jit(functools.partial(am.mgpu_attention, scale=SCALE, rescale_threshold=threshold))
    assert max(_per_sequence_rel(f(q, k, v, seg, pos), _reference(q, k, v, seg, pos), lengths)) < 1e-2


@hopper
@pytest.mark.parametrize("qk,v,blocks", [(128, 128, None), (192, 64, None), (256, 128, am.Blocks(64, 2))])
def test_other_supported_head_dims_match_xla(qk, v, blocks):
    lengths = (200, 57)
    seg, pos, b = packed(lengths, budget=264)
    q, k, vv = qkv(b.budget, 4, qk, v, seed=2)
    ours = jax.jit(functools.partial(am.mgpu_attention, scale=qk ** -0.5, blocks=blocks))(q, k, vv, seg, pos)
    ref = attention.xla_attention(*(a.astype(jnp.float32) for a in (q, k, vv)), seg, pos, scale=qk ** -0.5)
    assert max(_per_sequence_rel(ours, ref, lengths)) < 1e-2


@hopper
def test_mla_module_with_mgpu_matches_xla():
    assert mla_rel_to_xla("mgpu") < 2e-2
