"""The tokamax MLA prefill backend: its checks and import hygiene on CPU; on a Hopper GPU (`pytest -m gpu`) its
output against the XLA reference on packed variable-length batches, with poisoned neighbours."""

import functools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import attention, attention_tokamax as tk
from dwdp_jax.kernels import tuning

ROOT = Path(__file__).resolve().parent.parent
SCALE = 192 ** -0.5


def _hopper() -> bool:
    d = jax.devices()[0]
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9.")


def _has_tokamax() -> bool:
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return False
    return True


def hopper(fn):
    """A GPU test: run by `pytest -m gpu` on a Hopper GPU with tokamax installed, skipped elsewhere."""
    for mark in (pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs an NVIDIA Hopper GPU"),
                 pytest.mark.skipif(not _has_tokamax(), reason="needs tokamax (the gpu extra)")):
        fn = mark(fn)
    return fn


def qkv(t, h, qk=192, v=128, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (t, h, d), jnp.float32).astype(dtype)
                 for kk, d in zip(keys, (qk, qk, v)))


def packed(lengths, budget):
    from dwdp_jax.packing import pack

    b = pack([list(range(n)) for n in lengths], budget=budget)
    return jnp.asarray(b.segment_ids_T), jnp.asarray(b.positions_T), b


# ---- CPU: registry, import hygiene, checks ----

def test_registered_under_its_name():
    assert attention.get_backend("tokamax") is tk.tokamax_attention


def test_importing_the_model_does_not_import_tokamax():
    code = ("import sys, dwdp_jax.kernels.attention, models.deepseek_v3, dwdp_jax.kernels.attention_tokamax; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'tokamax'], 'tokamax imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("qk,v", [(96, 128), (192, 96), (320, 128), (192, 32), (0, 128)])
def test_unsupported_head_dims_are_refused(qk, v):
    q, k, vv = (jax.ShapeDtypeStruct((64, 2, d), jnp.bfloat16) for d in (qk, qk, v))
    seg = pos = jax.ShapeDtypeStruct((64,), jnp.int32)
    with pytest.raises(ValueError, match=r"head_dim=\d+ is not supported: a multiple of 64 in \[64, 256\]"):
        tk.check_inputs(q, k, vv, seg, pos)
    with pytest.raises(ValueError, match=r"head_dim=\d+ is not supported"):
        tk.check_head_dims(qk, v)


def test_a_rescale_threshold_out_of_range_is_refused():
    seg, pos, b = packed((5, 3), budget=8)
    q, k, v = qkv(b.budget, 2)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"rescale_threshold must be in \(0, 1\], got"):
            tk.tokamax_attention(q, k, v, seg, pos, scale=SCALE, rescale_threshold=bad)


def test_dtype_and_shape_mismatches_are_refused():
    q, k, v = qkv(16, 2, dtype=jnp.float32)
    seg, pos = jnp.zeros((16,), jnp.int32), jnp.arange(16)
    with pytest.raises(ValueError, match="one dtype of"):
        tk.check_inputs(q, k, v, seg, pos)
    q, k, v = qkv(16, 2)
    with pytest.raises(ValueError, match="k must have q's shape"):
        tk.check_inputs(q, k[:, :1], v, seg, pos)
    with pytest.raises(ValueError, match="segment_ids and positions must be"):
        tk.check_inputs(q, k, v, seg[:8], pos)


@pytest.mark.parametrize("device,ok", [
    (SimpleNamespace(platform="cpu", device_kind="cpu"), False),
    (SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0"), False),
    (SimpleNamespace(platform="gpu", device_kind="NVIDIA B200", compute_capability="10.0"), False),
    (SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0"), True),
])
def test_only_hopper_is_accepted(device, ok):
    if ok:
        tk.check_device(device)
    else:
        with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
            tk.check_device(device)


@pytest.mark.skipif(_hopper(), reason="the refusal of a non-Hopper device")
def test_the_model_refuses_it_off_hopper_when_traced():
    """Through the MLA module, as the reference, DWDP and DEP runtimes call it: a clear error at trace time, with
    tokamax never imported."""
    from flax import nnx

    from models.config import tiny
    from models.deepseek_v3 import MLA

    cfg = tiny(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype="bfloat16")
    mla = MLA(cfg, nnx.Rngs(0), attention_impl="tokamax")
    x = jnp.ones((16, cfg.hidden_size), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
        mla(x, jnp.zeros((16,), jnp.int32), jnp.arange(16, dtype=jnp.int32))
    assert "tokamax" not in sys.modules


def test_sequence_starts_give_the_packed_causal_mask():
    seg, pos, b = packed((5, 1, 3, 7), budget=20)
    starts = np.asarray(tk.sequence_starts(seg))
    assert starts.tolist() == [0] * 5 + [5] + [6] * 3 + [9] * 7 + [16] * 4
    idx = np.arange(20)
    ours = (idx[None, :] >= starts[:, None]) & (idx[None, :] <= idx[:, None])
    ref = np.asarray(attention.packed_causal_mask(seg, pos))
    n = b.num_tokens
    assert (ours[:n] == ref[:n]).all()


def test_default_and_candidate_blocks_fit_shared_memory():
    for qk, v in ((192, 128), (64, 64), (128, 128), (256, 256), (192, 192)):
        assert tk.fits(tk.default_blocks(qk, v), qk, v)
        cands = tk.candidate_blocks(qk, v)
        assert cands and all(tk.fits(b, qk, v) for b in cands)
    assert tk.default_blocks(192, 128) == tk.Blocks(64, 128, 2, False)  # tokamax's heuristic for MLA's widths
    assert tk.default_blocks(256, 256).block_kv == 64


def test_visited_pairs_follow_the_kernels_tiles():
    """A sequence of whole 128-row tiles visits tile i's (i + 1) key blocks of 128; packed sequences on tile
    boundaries visit what each would alone; a tile straddling two sequences walks the earlier one's keys too; never
    fewer pairs than the causal ones."""
    b = tk.Blocks()  # 64 x 128: 128 query rows a tile
    assert tk.visited_pairs([1024], b) == sum(128 * 128 * (i + 1) for i in range(8))
    aligned = (1024, 384, 2048)
    assert tk.visited_pairs(aligned, b) == sum(tk.visited_pairs([n], b) for n in aligned)
    # 1000 + 24: the tile of rows 896-1023 starts at sequence 0 and also holds sequence 1's 24 rows
    assert tk.visited_pairs([1000, 24], b) == tk.visited_pairs([1024], b)
    assert tk.visited_pairs([1000, 1048], b) > tk.visited_pairs([1024, 1024], b)
    assert tk.visited_pairs([1000, 1048], b) - tk.visited_pairs([1024, 1024], b) == 8 * 128 * 128
    for lengths in ((1,), (7, 300, 1), (4001, 7000, 3500, 8191, 6000, 4076)):
        for blocks in (b, tk.Blocks(128, 64, 2, False)):
            assert tk.visited_pairs(lengths, blocks) >= sum(n * n for n in lengths) / 2
    assert tk.visited_pairs([1], b) == 128 * 128


def test_blocks_come_from_the_cache_nearest_in_tokens(tmp_path, monkeypatch):
    path = tmp_path / "blocks.json"
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(path))
    assert tk.blocks_for(32768, 192, 128, "NVIDIA H200") == tk.default_blocks(192, 128)
    tuning.record(tk.KERNEL, "NVIDIA H200", 192, 128, False, 32768, tk.Blocks(128, 64, 2, True), 700.0, "test")
    tuning.record(tk.KERNEL, "NVIDIA H200", 192, 128, False, 8192, tk.Blocks(64, 64, 3, False), 600.0, "test")
    assert tk.blocks_for(30000, 192, 128, "NVIDIA H200") == tk.Blocks(128, 64, 2, True)
    assert tk.blocks_for(4096, 192, 128, "NVIDIA H200") == tk.Blocks(64, 64, 3, False)
    assert tk.blocks_for(32768, 192, 128, "NVIDIA H100 80GB HBM3") == tk.default_blocks(192, 128)


# ---- GPU: against the XLA reference ----

LENGTHS = (300, 77, 1, 500, 110)  # none a multiple of a block; a 1-token sequence; 988 tokens, padded to 1000


def _reference(q, k, v, seg, pos):
    return attention.xla_attention(*(a.astype(jnp.float32) for a in (q, k, v)), seg, pos, scale=SCALE)


def _per_sequence_rel(ours, ref, lengths):
    out, start = [], 0
    for n in lengths:
        a, b = np.asarray(ours[start:start + n], np.float32), np.asarray(ref[start:start + n], np.float32)
        out.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
        start += n
    return out


def check_packed_batch(f, lengths, budget: int, heads: int, seed: int = 0) -> None:
    """f (q, k, v, segment ids, positions -> out) on a packed batch against the fp32 reference
    (`check_packed_output`)."""
    inputs = packed_inputs(lengths, budget, heads, seed)
    check_packed_output(f(*inputs), inputs, lengths)


def packed_inputs(lengths, budget: int, heads: int, seed: int = 0) -> tuple:
    """q, k, v (192/128, bf16), segment ids and positions of the sequences packed into `budget` tokens."""
    seg, pos, _ = packed(lengths, budget=budget)
    return (*qkv(budget, heads, seed=seed), seg, pos)


def check_packed_output(out, inputs, lengths) -> None:
    """Against the fp32 reference per sequence (bf16 bounds); a 1-token sequence's output is its own value row
    exactly; the padding's rows are finite."""
    q, k, v, seg, pos = inputs
    assert out.shape == v.shape and out.dtype == jnp.bfloat16
    rels = _per_sequence_rel(out, _reference(q, k, v, seg, pos), lengths)
    assert max(rels) < 1e-2, rels
    for i in (i for i, n in enumerate(lengths) if n == 1):  # it sees only itself: softmax 1
        one = sum(lengths[:i])
        np.testing.assert_array_equal(np.asarray(out[one], np.float32), np.asarray(v[one], np.float32))
    assert np.isfinite(np.asarray(out[sum(lengths):], np.float32)).all()


def check_no_leak(f, lengths, budget: int, heads: int, parities=(0, 1), seed: int = 1) -> None:
    """Every other sequence (and the padding) gets keys and values of magnitude 1e3: a key of another sequence in
    any softmax would dominate it. The clean sequences' outputs must not move by one bit; the poisoned ones must
    show the poison."""
    seg, pos, b = packed(lengths, budget=budget)
    q, k, v = qkv(b.budget, heads, seed=seed)
    clean = np.asarray(f(q, k, v, seg, pos), np.float32)
    seg_np = np.asarray(seg)
    for parity in parities:
        poisoned_T = (seg_np < 0) | (seg_np % 2 == parity)
        bad = jnp.asarray(poisoned_T)[:, None, None]
        k2 = jnp.where(bad, 1e3 * jnp.sign(k.astype(jnp.float32)), k).astype(k.dtype)
        v2 = jnp.where(bad, 1e3, v).astype(v.dtype)
        got = np.asarray(f(q, k2, v2, seg, pos), np.float32)
        np.testing.assert_array_equal(got[~poisoned_T], clean[~poisoned_T])
        assert np.abs(got[poisoned_T & (seg_np >= 0)]).max() > 100


@hopper
@pytest.mark.parametrize("blocks", [None, tk.Blocks(128, 64, 2, True), tk.Blocks(64, 64, 3, False)],
                         ids=["cached", "q128_persistent", "kv64_3stages"])
def test_packed_batch_matches_xla(blocks):
    check_packed_batch(jax.jit(functools.partial(tk.tokamax_attention, scale=SCALE, blocks=blocks)), LENGTHS, 1000, 8)


@hopper
def test_no_attention_across_sequences():
    check_no_leak(jax.jit(functools.partial(tk.tokamax_attention, scale=SCALE)), LENGTHS, 1000, 8)


@hopper
@pytest.mark.parametrize("qk,v", [(64, 64), (128, 128), (256, 256)])
def test_other_supported_head_dims_match_xla(qk, v):
    lengths = (200, 57)
    seg, pos, b = packed(lengths, budget=264)
    q, k, vv = qkv(b.budget, 4, qk, v, seed=2)
    ours = jax.jit(lambda *a: tk.tokamax_attention(*a, scale=qk ** -0.5))(q, k, vv, seg, pos)
    ref = attention.xla_attention(*(a.astype(jnp.float32) for a in (q, k, vv)), seg, pos, scale=qk ** -0.5)
    assert max(_per_sequence_rel(ours, ref, lengths)) < 1e-2


@hopper
@pytest.mark.parametrize("threshold", [tk.RESCALE_THRESHOLD, 1.0], ids=["lazy", "eager"])
def test_growing_row_maxima_match_xla(threshold):
    """Keys grow in magnitude along each sequence, so a row's maximum rises block after block, past the lazy
    threshold's factor 2^8 and below it: both rescaling policies against the fp32 reference."""
    lengths = (700, 300)
    seg, pos, b = packed(lengths, budget=1024)
    q, k, v = qkv(b.budget, 4, seed=3)
    growth = jnp.asarray(np.concatenate([np.linspace(0.5, 6.0, n) for n in lengths] + [np.ones(24)]), jnp.float32)
    k = (k.astype(jnp.float32) * growth[:, None, None]).astype(jnp.bfloat16)
    f = jax.jit(lambda *a: tk.tokamax_attention(*a, scale=SCALE, rescale_threshold=threshold))
    ref = attention.xla_attention(*(a.astype(jnp.float32) for a in (q, k, v)), seg, pos, scale=SCALE)
    assert max(_per_sequence_rel(f(q, k, v, seg, pos), ref, lengths)) < 1e-2


def mla_rel_to_xla(impl: str) -> float:
    """The model's attention layer at R1's head widths (few heads) on `impl` against XLA, both in bf16, over a packed
    batch with a 1-token sequence: the relative distance of their outputs."""
    from flax import nnx

    from models.config import tiny
    from models.deepseek_v3 import MLA

    cfg = tiny(hidden_size=256, num_attention_heads=8, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               dtype="bfloat16")
    seg, pos, b = packed((130, 1, 250), budget=384)
    x = jax.random.normal(jax.random.key(5), (b.budget, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16)
    outs = {}
    for name in ("xla", impl):
        mla = MLA(cfg, nnx.Rngs(0), attention_impl=name)
        outs[name] = np.asarray(nnx.jit(lambda m, x: m(x, seg, pos))(mla, x), np.float32)[:b.num_tokens]
    return float(np.linalg.norm(outs[impl] - outs["xla"]) / np.linalg.norm(outs["xla"]))


@hopper
def test_mla_module_with_tokamax_matches_xla():
    assert mla_rel_to_xla("tokamax") < 2e-2
