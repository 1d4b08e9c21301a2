"""The stretched-V layout of native 192/128 MLA over packed sequences (`kernels.gpu.cudnn_attention_stretched_v`),
on CPU: cuDNN's packed-segment addressing is emulated from what jax hands it (one element offset per sequence,
start token x N x qk_dim, for Q, K, V and the output alike), so the layout math is checked without a GPU. The GPU
test (`tests/test_gpu.py`) runs the real kernel against the XLA reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import attention, gpu
from dwdp_jax.packing import pack


def _packed_cudnn(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale, max_segments, mask_padding=True):
    """cuDNN's packed causal attention as jax 0.11's segment path drives it: every tensor's sequence s starts at
    element start_s * N * qk_dim of its flat buffer, then runs in rows of its own width."""
    del positions_T, mask_padding
    q, k, v = (np.asarray(x, np.float32) for x in (q_THK, k_THK, v_THV))
    t, n, qk = q.shape
    dv = v.shape[-1]
    lengths, offsets = (np.asarray(x)[0] for x in gpu.segments_of(segment_ids_T, max_segments))
    # past the end of a buffer: NaN reads and lost writes (what the real kernel gave on H200: NaN)
    spill = t * n * qk
    out = np.zeros(t * n * dv + spill, np.float32)
    flat_v = np.concatenate([v.reshape(-1), np.full(spill, np.nan, np.float32)])
    for length, start in zip(lengths, offsets):
        if length <= 0:
            continue
        e = start * n * qk
        qs, ks = q[start:start + length], k[start:start + length]
        vs = flat_v[e:e + length * n * dv].reshape(length, n, dv)
        s = np.einsum("thk,shk->hts", qs, ks) * scale
        s = np.where(np.tril(np.ones((length, length), bool))[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[e:e + length * n * dv] = np.einsum("hts,shv->thv", p, vs).reshape(-1)
    return jnp.asarray(out[:t * n * dv].reshape(t, n, dv))


def _inputs(lengths, budget, heads=2):
    batch = pack([list(range(n)) for n in lengths], budget=budget)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k = (jax.random.normal(kk, (budget, heads, 192), jnp.float32) for kk in keys[:2])
    v = jax.random.normal(keys[2], (budget, heads, 128), jnp.float32)
    return q, k, v, jnp.asarray(batch.segment_ids_T), jnp.asarray(batch.positions_T), batch.num_tokens


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("lengths,budget", [((5, 1, 8, 3), 20), ((7, 4), 11), ((1,), 3), ((9,), 9)])
def test_stretched_v_recovers_mla_attention_under_the_packed_addressing(monkeypatch, lengths, budget):
    q, k, v, seg, pos, n = _inputs(lengths, budget)
    ref = attention.xla_attention(q, k, v, seg, pos, scale=0.1)
    monkeypatch.setattr(gpu, "cudnn_attention", _packed_cudnn)
    ours = gpu.cudnn_attention_stretched_v(q, k, v, seg, pos, scale=0.1, max_segments=8)
    assert rel(ours[:n], ref[:n]) < 1e-5
    assert not np.asarray(ours[n:]).any()
    if len(lengths) > 1:  # the emulation has the bug the layout works around: V read at q/k-sized offsets
        plain = _packed_cudnn(q, k, v, seg, pos, scale=0.1, max_segments=8)
        assert not rel(plain[:n], ref[:n]) < 0.1


def test_stretched_rows_place_each_sequence_at_its_qk_offset():
    seg = jnp.asarray([0, 0, 1, 1, 1, 2, -1, -1])
    rows, index = gpu.stretched_rows(seg, 192, 128, max_segments=4)
    assert rows == 12  # ceil(3 * 8 / 2): Q, K, V and the output all get 12 rows
    # two units (of N * 64 elements) per V row; sequence starts 0, 2, 5 sit at units 0, 6, 15
    assert np.asarray(index[:6]).tolist() == [[0, 1], [2, 3], [6, 7], [8, 9], [10, 11], [15, 16]]
    assert (np.asarray(index[6:]) >= rows * 2).all()  # padding tokens scatter nowhere
