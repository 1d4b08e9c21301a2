"""MLA prefill attention on Hopper: tokamax's Pallas Mosaic GPU flash attention over a packed batch.

q/k keep their 192-wide heads and v its 128-wide ones (no padding of V to the q/k width, which gives the cuDNN path
half again as much P @ V work). Packing is expressed as tokamax's per-query key range: token q sees keys in
[start of its sequence, q] (`Mask(k_start=..., is_causal=True)`), so the kernel skips the key blocks before a
query tile's sequences and after its diagonal, and no key of another sequence ever enters a softmax. There is no
per-sequence table, hence no bound on sequences per batch. Padding rows (segment id -1, at the end) attend within
the padding run: finite values that callers discard.

The running maximum is rescaled lazily (`RESCALE_THRESHOLD`): the accumulator and the row sum are rescaled only
when a row's maximum grows by more than a factor 2^8 (FlashAttention-4's threshold), else both keep the stale
maximum, which the final division cancels exactly; the unnormalized probabilities stay below 2^8 in bf16 and fp32.
On H200 (4 packed sequences, 32768 tokens) that ran at 582 TFLOP/s against 566 rescaling at every change, output
within 1.9e-3 of it (bf16 rounding).

tokamax is imported when the backend is traced, so machines without it (the CPU install: tokamax needs Python
>= 3.12 and jax >= 0.11.1) import this module freely. Its block sizes come from the kernel block cache
(`tuning`, kernel "attention_tokamax": k = q/k head width, n = v head width, rows = tokens), tuned per shape and
card by `experiments.bench_attention --tune`; without an entry, tokamax's own SM90 heuristic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.kernels import tuning

KERNEL = "attention_tokamax"
HEAD_DIM_MULTIPLE, MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 64, 256
RESCALE_THRESHOLD = 2.0**-8  # rescale when exp2(old max - new max) falls below this; 1.0: at every change
DTYPES = (jnp.bfloat16, jnp.float16)
# Shared memory one SM90 block may use (tokamax's own bound for this kernel).
MAX_SMEM_BYTES = 227 * 1024
_COMPUTE_WARPGROUPS = 2  # the SM90 kernel: two consumer warpgroups, each on its own q block, one producer
_EPILOGUE_BYTES = _COMPUTE_WARPGROUPS * 2 * 64 * 64 * 2  # output staging: two 64 x 64 bf16 slots per warpgroup


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The SM90 kernel's schedule: q rows per consumer warpgroup, key rows per pipeline stage, stages in flight,
    and whether one persistent grid walks all (head, q tile) pairs."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    persistent: bool = False


def smem_bytes(b: Blocks, qk_dim: int, v_dim: int, itemsize: int = 2) -> int:
    """Shared memory the SM90 kernel allocates for these blocks: the q tiles of both consumers, the k and v stages,
    and the output staging, which reuses the q/k space unless the grid is persistent."""
    q = _COMPUTE_WARPGROUPS * b.block_q * qk_dim * itemsize
    k = b.num_stages * b.block_kv * qk_dim * itemsize
    v = b.num_stages * b.block_kv * v_dim * itemsize
    return (q + k + _EPILOGUE_BYTES if b.persistent else max(q + k, _EPILOGUE_BYTES)) + v


def fits(b: Blocks, qk_dim: int, v_dim: int) -> bool:
    return smem_bytes(b, qk_dim, v_dim) <= MAX_SMEM_BYTES


def default_blocks(qk_dim: int, v_dim: int) -> Blocks:
    """tokamax's SM90 heuristic for causal attention: 64 x 128, two stages, else 64 x 64 where that does not fit."""
    b = Blocks()
    return b if fits(b, qk_dim, v_dim) else dataclasses.replace(b, block_kv=64)


def candidate_blocks(qk_dim: int, v_dim: int) -> list[Blocks]:
    """The schedules `bench_attention --tune` times: every one whose shared memory fits."""
    out = [Blocks(block_q=bq, block_kv=bkv, num_stages=st, persistent=p)
           for bq in (64, 128) for bkv in (64, 128) for st in (2, 3, 4) for p in (False, True)]
    return [b for b in out if fits(b, qk_dim, v_dim)]


def blocks_for(tokens: int, qk_dim: int, v_dim: int, device_kind: str) -> Blocks:
    """The cached blocks of this card and head widths nearest in tokens, else the heuristic."""
    cached = tuning.lookup(KERNEL, Blocks, device_kind, qk_dim, v_dim, False, tokens)
    return cached if cached is not None and fits(cached, qk_dim, v_dim) else default_blocks(qk_dim, v_dim)


def visited_pairs(lengths, b: Blocks) -> int:
    """Query-key pairs a head's tiles compute for sequences of these lengths packed in order: each CTA takes
    `_COMPUTE_WARPGROUPS * block_q` query rows and walks the key blocks from its rows' lowest sequence start
    (rounded down to block_kv) to its last row's diagonal (rounded up), masking the rest. A tile that straddles
    two sequences walks the earlier one's keys for all its rows; the tiles along each diagonal compute their upper
    triangle. Against the causal pairs (n^2 / 2 a sequence, as the FLOP count takes them): the share of the
    tensor cores' work that counts."""
    lengths = np.asarray(lengths, np.int64)
    t, rows = int(lengths.sum()), _COMPUTE_WARPGROUPS * b.block_q
    starts_T = np.repeat(np.cumsum(lengths) - lengths, lengths)
    first_Q = np.minimum.reduceat(starts_T, np.arange(0, t, rows)) // b.block_kv
    last_Q = -(-np.minimum(np.arange(rows, t + rows, rows), t) // b.block_kv)
    return int((last_Q - first_Q).sum()) * rows * b.block_kv


def check_head_dims(qk_dim: int, v_dim: int) -> None:
    """ValueError naming the head width the kernel does not take (config checks call this with the model's widths)."""
    for name, dim in (("q/k head_dim", qk_dim), ("v head_dim", v_dim)):
        if dim % HEAD_DIM_MULTIPLE or not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"tokamax attention: {name}={dim} is not supported: a multiple of {HEAD_DIM_MULTIPLE} "
                             f"in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (MLA: q/k 192, v 128)")
    if not fits(default_blocks(qk_dim, v_dim), qk_dim, v_dim):
        raise ValueError(f"tokamax attention: head dims q/k {qk_dim}, v {v_dim} need more than the "
                         f"{MAX_SMEM_BYTES} bytes of shared memory an SM90 block has")


def check_inputs(q_THK, k_THK, v_THV, segment_ids_T, positions_T, name: str = "tokamax attention",
                 check_dims=check_head_dims) -> None:
    """ValueError naming the argument and what is allowed, for shapes and dtypes a Hopper attention kernel does not
    take (`name` in the message; `check_dims(qk, v)` the kernel's head widths, this one's by default)."""
    if q_THK.ndim != 3 or k_THK.ndim != 3 or v_THV.ndim != 3:
        raise ValueError(f"{name}: q, k, v must be [tokens, heads, head_dim], got q {q_THK.shape}, "
                         f"k {k_THK.shape}, v {v_THV.shape}")
    t, h, qk = q_THK.shape
    if k_THK.shape != q_THK.shape:
        raise ValueError(f"{name}: k must have q's shape {q_THK.shape}, got {k_THK.shape}")
    if v_THV.shape[:2] != (t, h):
        raise ValueError(f"{name}: v must be [{t}, {h}, v_head_dim], got {v_THV.shape}")
    check_dims(qk, v_THV.shape[2])
    dtypes = {jnp.dtype(a.dtype) for a in (q_THK, k_THK, v_THV)}
    if len(dtypes) != 1 or dtypes.pop() not in {jnp.dtype(d) for d in DTYPES}:
        raise ValueError(f"{name}: q, k, v must share one dtype of {[jnp.dtype(d).name for d in DTYPES]}, "
                         f"got {q_THK.dtype}, {k_THK.dtype}, {v_THV.dtype}")
    if segment_ids_T.shape != (t,) or positions_T.shape != (t,):
        raise ValueError(f"{name}: segment_ids and positions must be [{t}], got {segment_ids_T.shape} and "
                         f"{positions_T.shape}")


def check_device(device: jax.Device, impl: str = "tokamax") -> None:
    """ValueError unless `device` is a Hopper GPU (compute capability 9.x): the kernel is SM90's (wgmma, TMA)."""
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or cc is None or not str(cc).startswith("9."):
        found = f"{device.device_kind} (compute capability {cc})" if cc else f"{device.platform} ({device.device_kind})"
        raise ValueError(f"attention_impl={impl!r} needs an NVIDIA Hopper GPU (compute capability 9.0: H100, H200), "
                         f"found {found}; use attention_impl 'xla' (any device) or 'cudnn' (other NVIDIA GPUs)")


def sequence_starts(segment_ids_T: jax.Array) -> jax.Array:
    """Each token's index of the first token of its sequence (sequences are contiguous; the padding run counts as
    one more)."""
    idx_T = jnp.arange(segment_ids_T.shape[0], dtype=jnp.int32)
    first_T = jnp.concatenate([jnp.ones((1,), bool), segment_ids_T[1:] != segment_ids_T[:-1]])
    return jax.lax.cummax(jnp.where(first_T, idx_T, 0))


def _import_tokamax():
    try:
        from tokamax._src.ops.attention.base import Mask
        # tokamax.ops.gpu (the public name of the same class) also loads its Triton ops, which need jax_triton
        from tokamax._src.ops.attention.pallas_mosaic_gpu import ConfigSM90, PallasMosaicGpuFlashAttention
    except ImportError as e:
        raise ImportError("attention_impl='tokamax' needs tokamax 0.0.17 (Python >= 3.12, jax >= 0.11.1): "
                          "pip install 'dwdp-jax[gpu]'") from e
    return Mask, ConfigSM90, PallasMosaicGpuFlashAttention


def tokamax_attention(q_THK, k_THK, v_THV, segment_ids_T, positions_T, *, scale: float,
                      blocks: Blocks | None = None, device: jax.Device | None = None,
                      packed: bool = True, rescale_threshold: float = RESCALE_THRESHOLD) -> jax.Array:
    """Causal attention within each packed sequence (see the module docstring); [T, H, V] in v's dtype.

    Shapes, dtypes and the device are checked when traced, before anything launches. `blocks` overrides the cached
    schedule (the benchmark's sweep); `rescale_threshold` 1.0 rescales at every change of a row's maximum.
    `packed=False` drops the per-query key range: plain causal attention over the
    whole axis, correct for one sequence per batch only (the measure of what the packing costs)."""
    check_inputs(q_THK, k_THK, v_THV, segment_ids_T, positions_T)
    if not 0.0 < rescale_threshold <= 1.0:
        raise ValueError(f"tokamax attention: rescale_threshold must be in (0, 1], got {rescale_threshold}")
    del positions_T  # contiguous sequences: index order is position order within each
    device = device or jax.devices()[0]
    check_device(device)
    t, _, qk = q_THK.shape
    v_dim = v_THV.shape[2]
    b = blocks or blocks_for(t, qk, v_dim, device.device_kind)
    if not fits(b, qk, v_dim):
        raise ValueError(f"tokamax attention: blocks {b} need {smem_bytes(b, qk, v_dim)} bytes of shared memory at "
                         f"q/k {qk}, v {v_dim}; at most {MAX_SMEM_BYTES}")
    Mask, ConfigSM90, FlashAttention = _import_tokamax()
    config = ConfigSM90(block_q=b.block_q, block_kv=b.block_kv, num_stages=b.num_stages, persistent=b.persistent)
    mask = Mask(k_start=sequence_starts(segment_ids_T), is_causal=True) if packed else Mask(is_causal=True)
    return FlashAttention(config=config, rescale_threshold=rescale_threshold)(q_THK, k_THK, v_THV, mask=mask,
                                                                              logits_scale=scale)
