"""GPU measurements, side by side in one process: kernels against their ceilings, copies against the peer-copy
ceiling, and the rates the simulator's `calibrated` spec needs (dwdp_jax/sim/hardware.py contract).

Every number is a median over repeats after warm-up, with a device sync before reading the host clock.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.kernels import attention as attention_kernels
from dwdp_jax.kernels import cublaslt_fp8, fp8, fp8_rows, gpu
from dwdp_jax.kernels.split_gemm import split_ragged_dot
from dwdp_jax.progress import progress_bar
from dwdp_jax.runtime.dep_dispatch import shard_map


GIB = 1 << 30


def time_s(fn: Callable, *args, repeats: int = 5, warmup: int = 2, before: Callable = lambda: None,
           after: Callable = lambda: None, sustain_s: float = 0.0) -> float:
    """Median seconds of fn(*args) until ready; `before`/`after` run around every call, outside the timed span.
    `sustain_s`: the warm-up calls go on until this long has passed, so the timed calls run at the clocks a
    sustained load gets (an H200's power cap lowers them within seconds)."""
    samples = []
    start = time.perf_counter()
    i = 0
    while len(samples) < repeats:
        before()
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup and t - start >= sustain_s:
            samples.append(time.perf_counter() - t)
        after()
        i += 1
    return statistics.median(samples)


def lowered_for_cuda(split_kernel: Callable, fused: bool, blocks, num_rows: int = 131072,
                     slab_counts: tuple[int, ...] = (64, 64, 128)) -> str:
    """The StableHLO text of a split-weight kernel at R1's K and N (gate/up fused: K 7168, N 2048; down: K 2048,
    N 7168) over skewed groups in slabs of `slab_counts` experts (each within `split_gemm.max_slab_experts`),
    lowered for CUDA on any host: a configuration that cannot lower fails here, before any GPU time (shared
    memory, the lowering's type rules)."""
    k, n = (7168, 2048) if fused else (2048, 7168)
    sizes = jnp.asarray(skewed_group_sizes(num_rows, sum(slab_counts), 6.0))
    x = jax.ShapeDtypeStruct((num_rows, k), jnp.bfloat16)
    slabs = tuple(jax.ShapeDtypeStruct((c, k, n), jnp.bfloat16) for c in slab_counts)
    weights = tuple((w, w) for w in slabs) if fused else slabs
    fn = jax.jit(lambda x, s, w: split_kernel(x, s, w, fused=fused, blocks=blocks))
    return fn.trace(x, sizes, weights).lower(lowering_platforms=("cuda",)).as_text()


def skewed_group_sizes(num_rows: int, num_groups: int, max_over_mean: float, seed: int = 0) -> np.ndarray:
    """Group sizes summing to num_rows whose largest is about max_over_mean times the mean (hot experts)."""
    rng = np.random.default_rng(seed)
    weights = rng.gamma(0.5, size=num_groups)
    weights = weights / weights.sum()
    hot = max_over_mean / num_groups
    weights = np.minimum(weights, hot)
    weights[np.argmax(weights)] = hot
    weights = weights / weights.sum()
    sizes = np.floor(weights * num_rows).astype(np.int32)
    sizes[np.argmax(sizes)] += num_rows - sizes.sum()
    return sizes


def uniform_group_sizes(num_rows: int, num_groups: int, seed: int = 0) -> np.ndarray:
    """Group sizes of rows routed uniformly at random (multinomial): what a rank's experts see in serving with
    balanced routing (max/mean 1.3-1.5 per MoE layer in the R1-width runs on 4x H200)."""
    return np.random.default_rng(seed).multinomial(num_rows, np.full(num_groups, 1.0 / num_groups)).astype(np.int32)


def grouped_gemm_roofline(sizes: np.ndarray, k: int, n: int, out_cols: int, dense_flops_per_s: float,
                          hbm_bytes_per_s: float, tile_rows: int = 1, itemsize: int = 2) -> float:
    """The best fraction of the dense GEMM's rate a grouped GEMM can reach over these groups, with no overlap
    between groups: each group takes max(its FLOPs at the dense rate, its bytes at the HBM bandwidth), its rows
    padded to whole `tile_rows` tiles; the dense GEMM of the real rows at the dense rate. A group of m rows reads
    its [k, n] weights and m x k inputs and writes m x out_cols outputs (fused gate/up: n = 2 * out_cols). Groups
    under dense/HBM FLOP per byte (about 155 rows on H200, 220 on H100) are memory bound; with perfect overlap
    between groups the bound would be the padding's real/padded rows alone."""
    if not (dense_flops_per_s > 0 and hbm_bytes_per_s > 0 and tile_rows >= 1):
        raise ValueError(f"grouped_gemm_roofline: rates must be > 0 and tile_rows >= 1, got {dense_flops_per_s}, "
                         f"{hbm_bytes_per_s}, {tile_rows}")
    sizes = np.asarray(sizes, np.float64)
    padded = np.ceil(sizes / tile_rows) * tile_rows
    compute_s = 2 * padded * k * n / dense_flops_per_s
    memory_s = (k * n + padded * (k + out_cols)) * itemsize / hbm_bytes_per_s
    grouped_s = np.where(sizes > 0, np.maximum(compute_s, memory_s), 0.0).sum()
    return float(2 * sizes.sum() * k * n / dense_flops_per_s / grouped_s)


def dense_gemm_case(m: int, k: int, n: int, dtype=jnp.bfloat16) -> tuple[Callable, tuple, float]:
    """(jitted fn, its args, its FLOPs): one [m, k] x [k, n] GEMM."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(key, (k, n), jnp.float32).astype(dtype)
    return jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), (a, b), 2 * m * k * n


def block_scaled_weight(k: int, n: int, seed: int = 1) -> fp8.BlockScaled:
    """A random FP8 weight [n, k] with its 128 x 128 block scales."""
    w = fp8.quantize_weights(0.02 * jax.random.normal(jax.random.key(seed), (1, n, k), jnp.float32))
    return fp8.BlockScaled(w.values_GNK[0], w.scales_GRS[0])


def block_scaled_product(x_q, x_s, w: fp8.BlockScaled) -> jax.Array:
    """The fp32 product of the dequantized operands (precision HIGHEST: a GPU's default takes fp32 dots in TF32)."""
    w_NK = fp8.dequantize_weights(w.values_GNK[None], w.scales_GRS[None])[0]
    return jnp.dot(fp8.dequantize_rows(x_q, x_s), w_NK.T, precision=jax.lax.Precision.HIGHEST)


def rel_error(out, ref) -> float:
    return float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


_CUBLASLT = jax.jit(cublaslt_fp8.block_scaled_gemm)


def cublaslt_case(x_q, x_s, w: fp8.BlockScaled, rows_checked: int,
                  tol: float) -> tuple[tuple[Callable, tuple, float] | None, float | None, str]:
    """cuBLASLt's block-scaled dense GEMM (`cublaslt_fp8`) on e4m3 rows, their scales and an FP8 weight: (the case
    (jitted fn, args, FLOPs), its relative error on the first rows_checked rows against the fp32 product, "") once
    that error is within tol; else (None, the error or None where the call failed, why)."""
    rows = min(rows_checked, x_q.shape[0])
    try:
        err = rel_error(_CUBLASLT(x_q, x_s, w)[:rows], block_scaled_product(x_q[:rows], x_s[:, :rows], w))
    except (RuntimeError, jax.errors.JaxRuntimeError) as e:
        return None, None, f"cuBLASLt failed: {str(e)[:300]}"
    if not err <= tol:
        return None, err, f"cuBLASLt's relative error {err:.3g} > {tol}"
    return (_CUBLASLT, (x_q, x_s, w), 2 * x_q.shape[0] * x_q.shape[1] * w.values_GNK.shape[0]), err, ""


def group_spans(sizes: np.ndarray) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of every non-empty group of rows sorted by group."""
    ends = np.cumsum(sizes)
    return [(g, int(end - size), int(end)) for g, (size, end) in enumerate(zip(sizes, ends)) if size > 0]


def sampled_group_rows(sizes: np.ndarray, per_group: int = 64) -> np.ndarray:
    """[G, per_group] row indices of rows sorted by group: each group's rows evenly spaced, its first and last
    included (every row of a group with fewer), -1 past them."""
    if per_group < 2:
        raise ValueError(f"sampled_group_rows: per_group must be >= 2 (a group's first and last row), got {per_group}")
    idx_GP = np.full((len(sizes), per_group), -1, np.int64)
    for g, a, b in group_spans(sizes):
        rows = np.unique(np.linspace(a, b - 1, min(per_group, b - a)).round().astype(np.int64))
        idx_GP[g, :len(rows)] = rows
    return idx_GP


def _weight_KN(w) -> jax.Array:
    if isinstance(w, fp8.BlockScaled):
        return fp8.dequantize_weights_kn(w.values_GNK[None], w.scales_GRS[None])[0]
    return w.astype(jnp.float32)


def _group_products(x_MK, w_GKN, idx_GP: np.ndarray) -> jax.Array:
    """fp32 products [G, P, N] of the rows `idx_GP` (-1: none, its product 0) with their group's weights, group by
    group (`lax.map`): fp32 copies are of one group's weights only. x_MK / w_GKN as `grouped_rel_err` takes them."""
    g, p = idx_GP.shape
    rows_GP = jnp.asarray(np.maximum(idx_GP, 0))
    if isinstance(x_MK, tuple):
        rows = rows_GP.reshape(-1)
        x_GPK = fp8.dequantize_rows(x_MK[0][rows], x_MK[1][:, rows]).reshape(g, p, -1)
    else:
        x_GPK = x_MK[rows_GP].astype(jnp.float32)
    ref_GPN = jax.lax.map(lambda a: jnp.dot(a[0], _weight_KN(a[1]), precision=jax.lax.Precision.HIGHEST),
                          (x_GPK, w_GKN))
    return jnp.where(jnp.asarray(idx_GP >= 0)[..., None], ref_GPN, 0.0)


def grouped_rel_err(out_MN: jax.Array, x_MK, w_GKN, sizes: np.ndarray, per_group: int = 64) -> float:
    """Relative norm error of a grouped GEMM's output against fp32 products of each group's rows with its own
    weights (precision HIGHEST: true fp32 on GPU, where DEFAULT may take TF32's 10-bit mantissa) over
    `sampled_group_rows`: every group and column, in one program of one shape (a product per group compiled 256
    shapes and outran a 220 s limit on H200).

    x_MK: rows [M, K], or FP8 rows (e4m3 values [M, K], scales [K/128, M]; `fp8.quantize_rows`) dequantized as
    sampled. w_GKN: weights [G, K, N], or `fp8.BlockScaled` [G, N, K] dequantized one group at a time. The products
    run group by group (`lax.map`), so fp32 copies are of one group's weights only: the serving shape's whole down
    weights in fp32 are 14 GiB, which ran an H100 (80 GB) out of memory beside the benchmark's buffers."""
    idx_GP = sampled_group_rows(sizes, per_group)

    @jax.jit
    def rel_err(out, x, w):
        ref_GPN = _group_products(x, w, idx_GP)
        out_GPN = jnp.where(jnp.asarray(idx_GP >= 0)[..., None], out[np.maximum(idx_GP, 0)].astype(jnp.float32), 0.0)
        return jnp.linalg.norm(out_GPN - ref_GPN) / jnp.linalg.norm(ref_GPN)

    return float(rel_err(out_MN, x_MK, w_GKN))


def exact_ragged_dot(x_MK, w_GKN, sizes: np.ndarray) -> jax.Array:
    """`lax.ragged_dot`'s fp32 product [M, N] (rows past the groups 0) computed group by group: XLA's GPU
    lowering of an fp32 ragged dot takes a [G, M, K] temporary (28 GiB at 16384 rows, 64 groups, K 7168), which
    two test processes sharing one card could not both hold. x_MK / w_GKN as `grouped_rel_err` takes them."""
    idx_GP = sampled_group_rows(sizes, max(2, int(np.max(sizes))))
    valid = idx_GP >= 0
    rows, m = idx_GP[valid], (x_MK[0] if isinstance(x_MK, tuple) else x_MK).shape[0]

    @jax.jit
    def product(x, w):
        ref_GPN = _group_products(x, w, idx_GP)
        return jnp.zeros((m, ref_GPN.shape[-1]), jnp.float32).at[rows].set(ref_GPN[valid])

    return product(x_MK, w_GKN)


def per_group_dense_case(sizes: np.ndarray, k: int, n: int, dtype=jnp.bfloat16) -> tuple[Callable, tuple, float]:
    """(jitted fn, its args, its FLOPs): one dense GEMM per non-empty group in one executable, each group's rows
    times its own [k, n] weights, outputs left apart (no concatenation copy): the vendor's GEMM (cuBLAS on GPU)
    over the same groups, launch gaps included, as a grouped GEMM built from dense calls would run."""
    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (int(sizes.sum()), k), jnp.float32).astype(dtype)
    w = (0.02 * jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32)).astype(dtype)
    spans = group_spans(sizes)

    def fn(x, w):
        return tuple(jnp.dot(x[a:b], w[g], preferred_element_type=dtype) for g, a, b in spans)

    return jax.jit(fn), (x, w), 2 * int(sizes.sum()) * k * n


def tflops(case: tuple[Callable, tuple, float], **timing) -> float:
    fn, args, flops = case
    return flops / time_s(fn, *args, **timing) / 1e12


def dense_gemm_tflops(m: int, k: int, n: int, dtype=jnp.bfloat16, **timing) -> float:
    return tflops(dense_gemm_case(m, k, n, dtype), **timing)


def sm_clock_mhz() -> float | None:
    """GPU 0's current SM clock by nvidia-smi (None where it cannot be read): the dense GEMM's rate follows it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def burst(case: tuple[Callable, tuple, float], repeats: int = 3) -> dict[str, float]:
    """A case's TFLOP/s over a few calls from idle, and the SM clock read right after."""
    rate = tflops(case, repeats=repeats, warmup=1)
    clock = sm_clock_mhz()
    return {"tflops": rate} if clock is None else {"tflops": rate, "sm_clock_mhz": clock}


def round_robin_over_dense(cases: dict[str, tuple[Callable, tuple, float]], dense: tuple[Callable, tuple, float],
                           rounds: int = 7, measure: Callable = burst) -> dict[str, dict[str, float]]:
    """Kernels against the dense GEMM timed in rounds (dense, then each kernel, per round), so all see the same
    clocks: on one H200 the dense rate falls from about 745 TFLOP/s in a short burst to 620-680 under sustained
    load. `measure(case)` gives a dict with "tflops" and whatever else it reads (`burst`:
    the SM clock after it; `clocks_under_load`: clock and power over a sustained run). Per case: medians over the
    rounds of each reading and of the ratio to the round's dense rate (with its extremes); with clocks, also the
    ratio at equal clocks (over_dense_per_clock)."""
    samples: dict[str, dict[str, list]] = {name: {} for name in ("dense", *cases)}
    for _ in progress_bar(list(range(rounds)), f"rounds of {len(cases) + 1} cases", "round"):
        ref = None
        for name, case in (("dense", dense), *cases.items()):
            got = dict(measure(case))
            ref = ref or got  # the round's dense reading: it runs first
            got["over_dense"] = got["tflops"] / ref["tflops"]
            if "sm_clock_mhz" in got and "sm_clock_mhz" in ref:
                got["over_dense_per_clock"] = got["over_dense"] * ref["sm_clock_mhz"] / got["sm_clock_mhz"]
            for key, value in got.items():
                samples[name].setdefault(key, []).append(value)
    out = {}
    for name, got in samples.items():
        out[name] = {key: statistics.median(values) for key, values in got.items()}
        out[name].update(over_dense_min=min(got["over_dense"]), over_dense_max=max(got["over_dense"]))
    return out


def round_order(names: list[str], i: int) -> list[str]:
    """Round i's order: the variants rotated by i. A step warms the card for the next (clocks at the power cap
    follow the last steps' power), so with a fixed order each variant would always follow the same one."""
    k = i % len(names)
    return names[k:] + names[:k]


def paired_ratios(base_s: list[float], other_s: list[float]) -> list[float]:
    """Each round's speedup of a variant over the base (base seconds / its seconds): the two steps of a round run
    within a second of each other, so a drift of the clocks over the rounds moves both."""
    return [b / o for b, o in zip(base_s, other_s, strict=True)]


def recorded_tflops(got: dict, case: str) -> float:
    """The rate to record for a case of `round_robin_over_dense`'s rounds: its median ratio to each round's dense
    GEMM times the dense GEMM's median rate. Two cases of one run so recorded compare as their per-round ratios do;
    their own median rates can order them otherwise when the clocks move between rounds."""
    return got[case]["over_dense"] * got["dense"]["tflops"]


def confirmed(name: str, got: dict, case: str, metrics: dict) -> bool:
    """Whether a sweep's fastest blocks (`case` in `round_robin_over_dense`'s `got`) beat, in the same rounds, the
    blocks they would replace (`case`_before, timed where they differ): a sweep times each candidate once, in turn,
    so its winner may be the spread between calls. Their ratio goes into `metrics` as `name`_tuned_over_before."""
    if f"{case}_before" not in got:
        return True
    ratio = got[case]["over_dense"] / got[f"{case}_before"]["over_dense"]
    metrics[f"{name}_tuned_over_before"] = ratio
    print(f"{name}: the sweep's fastest blocks at {ratio:.3f}x the blocks before them in the rounds: "
          f"{'recorded' if ratio > 1 else 'not recorded'}")
    return ratio > 1


def grouped_gemm_tflops(sizes: np.ndarray, k: int, n: int, backend: str = "pallas_mgpu") -> float:
    """One ragged GEMM (the backend's building block) over groups of the given sizes."""
    m, g = int(sizes.sum()), len(sizes)
    key = jax.random.key(1)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (0.02 * jax.random.normal(key, (g, k, n), jnp.float32)).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    fn = gpu._mgpu_ragged_dot if backend == "pallas_mgpu" else (
        lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.bfloat16))
    return 2 * m * k * n / time_s(jax.jit(fn), x, w, gs) / 1e12


def _split_kernel(kernel: Callable | None) -> Callable:
    return kernel or split_ragged_dot


@functools.lru_cache(maxsize=1)
def _slab_weights(g: int, k: int, n: int, counts: tuple[int, ...], fused: bool) -> tuple:
    """The split cases' expert weights, one buffer set shared by the cases of a problem (a benchmark round holds
    five cases: separate copies of gate/up's 15 GB would not fit an 80 GB card)."""
    keys = jax.random.split(jax.random.key(1), 2)

    def weights(key):
        w = (0.02 * jax.random.normal(key, (g, k, n), jnp.float32)).astype(jnp.bfloat16)
        edges = np.cumsum((0,) + counts)
        return tuple(w[a:b] for a, b in zip(edges[:-1], edges[1:]))

    return tuple(zip(weights(keys[0]), weights(keys[1]))) if fused else weights(keys[0])


def split_gemm_case(sizes: np.ndarray, k: int, n: int, fused: bool, blocks=None,
                    slab_counts: tuple[int, ...] | None = None, kernel: Callable | None = None,
                    counted_rows: int | None = None) -> tuple[Callable, tuple, float]:
    """The split-weight kernel (default the Triton one; `kernel`: another with its signature, e.g. the Mosaic GPU
    one) over groups of the given sizes, the experts spread over `slab_counts` slabs (default one). Fused: gate
    and up ([G, K, n] each, FLOPs of a K x 2n GEMM) with the SwiGLU epilogue. FLOPs are counted over
    `counted_rows` (default all rows; fewer when the sizes include padding rows)."""
    split_ragged_dot = _split_kernel(kernel)
    m, g = int(sizes.sum()), len(sizes)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    ws = _slab_weights(g, k, n, tuple(slab_counts or (g,)), fused)
    f = jax.jit(lambda x, gs, ws: split_ragged_dot(x, gs, ws, fused=fused, blocks=blocks))
    rows = m if counted_rows is None else counted_rows
    return f, (x, jnp.asarray(sizes, jnp.int32), ws), 2 * rows * k * n * (2 if fused else 1)


@functools.lru_cache(maxsize=1)
def _fp8_slab_weights(g: int, k: int, n: int, counts: tuple[int, ...], fused: bool) -> tuple:
    """`_slab_weights` quantized to e4m3 in 128 x 128 blocks ((values, scales) per weight), cached likewise."""
    return jax.tree.map(fp8.quantize_weights_kn, _slab_weights(g, k, n, counts, fused))


def fp8_split_case(sizes: np.ndarray, k: int, n: int, fused: bool, blocks=None, counted_rows: int | None = None,
                   quantize_rows: bool = False, kernel: Callable | None = None,
                   slab_counts: tuple[int, ...] | None = None) -> tuple[Callable, tuple, float]:
    """The split-weight kernel's FP8 path over these groups (over `slab_counts` slabs, default one):
    `split_gemm_case`'s weights quantized in 128 x 128 blocks, the rows in 1 x 128 groups; `quantize_rows`: bf16
    rows in, their quantization (`fp8_rows`, the model's) timed with the kernel (the pass the FFN adds before the
    down projection; the MoE quantizes gate/up's input per token before dispatch). `kernel`: an FP8 split kernel with
    `split_ragged_dot`'s signature (default the Triton one's scaled path)."""
    split_ragged_dot = _split_kernel(kernel)
    m, g = int(sizes.sum()), len(sizes)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    ws = _fp8_slab_weights(g, k, n, tuple(slab_counts or (g,)), fused)

    def run(x, gs, ws):
        x_q, x_scale = fp8_rows.quantize_rows(x) if quantize_rows else x
        return split_ragged_dot(x_q, gs, ws, fused=fused, blocks=blocks, x_scale_SM=x_scale)

    rows = m if counted_rows is None else counted_rows
    return (jax.jit(run), (x if quantize_rows else fp8.quantize_rows(x), jnp.asarray(sizes, jnp.int32), ws),
            2 * rows * k * n * (2 if fused else 1))


def fp8_grouped_gemm_error(sizes: np.ndarray, k: int, n: int, blocks=None,
                           kernel: Callable | None = None) -> dict[str, float]:
    """The FP8 kernel (two slabs, unfused; `kernel` as in `fp8_split_case`) against fp32 per-group products
    (`grouped_rel_err`): `kernel` of the dequantized operands (the kernel's own error: summation order, bf16
    output) and `quantization` of the bf16 ones (e4m3's rounding)."""
    split_ragged_dot = _split_kernel(kernel)
    key = jax.random.key(2)
    m, g = int(sizes.sum()), len(sizes)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(key, (g, k, n), jnp.float32)).astype(jnp.bfloat16)
    x_q, x_scale = fp8.quantize_rows(x)
    w_q = fp8.quantize_weights_kn(w)
    halves = tuple(fp8.BlockScaled(*(a[part] for a in w_q)) for part in (slice(g // 2), slice(g // 2, g)))
    ours = split_ragged_dot(x_q, jnp.asarray(sizes, jnp.int32), halves, blocks=blocks, x_scale_SM=x_scale)
    return {"kernel": grouped_rel_err(ours, (x_q, x_scale), w_q, sizes),
            "quantization": grouped_rel_err(ours, x, w, sizes)}


def split_gemm_tflops(sizes: np.ndarray, k: int, n: int, fused: bool, blocks=None,
                      slab_counts: tuple[int, ...] | None = None, kernel: Callable | None = None,
                      counted_rows: int | None = None, **timing) -> float:
    return tflops(split_gemm_case(sizes, k, n, fused, blocks, slab_counts, kernel, counted_rows), **timing)


def grouped_gemm_error(sizes: np.ndarray, k: int, n: int, blocks=None, kernel: Callable | None = None) -> float:
    """Relative error of the split-weight kernel (two slabs) against an fp32 per-group reference (bf16 inputs)."""
    split_ragged_dot = _split_kernel(kernel)
    key = jax.random.key(2)
    m, g = int(sizes.sum()), len(sizes)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(key, (g, k, n), jnp.float32)).astype(jnp.bfloat16)
    ours = split_ragged_dot(x, jnp.asarray(sizes, jnp.int32), (w[:g // 2], w[g // 2:]), blocks=blocks)
    return grouped_rel_err(ours, x, w, sizes)


def hbm_gbps(num_bytes: int = 4 * GIB, passes: int = 16) -> float:
    """HBM read GB/s: `passes` reductions over an f32 buffer inside one program, so the host's dispatch and sync
    are paid once (what the grouped GEMM's weight stream and the roofline need). On one H200: 4.41 TB/s at 4 GiB,
    against 3.91 for read + write passes and 2.92 for the single bf16 x * 2 per call this replaced, which read
    0.31-0.62 of the 4.8 TB/s datasheet rising with the size."""
    if num_bytes < 4 or passes < 1:
        raise ValueError(f"hbm_gbps: num_bytes must be >= 4 and passes >= 1, got {num_bytes}, {passes}")
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    # the pass index in the sum keeps every pass a read of x (no pass is a copy of the last's result)
    read = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda i, acc: acc + jnp.sum(x * i), 0.0))
    return passes * x.nbytes / time_s(read, x) / 1e9


@contextlib.contextmanager
def sampled_clocks(sample_ms: int = 100):
    """nvidia-smi samples GPU 0's SM clock and power while the block runs: yields a list that holds the (MHz, W)
    samples once the block ends, in order; empty where nvidia-smi is missing or reports neither ("[N/A]")."""
    samples: list[tuple[float, float]] = []
    try:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-i", "0", f"--loop-ms={sample_ms}"], stdout=subprocess.PIPE, text=True)
    except OSError:  # no nvidia-smi (CPU machines)
        smi = None
    try:
        yield samples
    finally:
        if smi is not None:
            smi.terminate()
            for line in smi.communicate()[0].splitlines():
                try:
                    samples.append(tuple(float(v) for v in line.split(",")))
                except ValueError:  # "[N/A]" where the card does not report one
                    continue


def clocks_under_load(case: tuple[Callable, tuple, float], seconds: float = 3.0,
                      sample_ms: int = 100) -> dict[str, float]:
    """A case run back to back for `seconds` while nvidia-smi samples GPU 0's SM clock and power: TFLOP/s over
    the second half (past the power cap's reaction), the median clock and power over the same span. Kernels that
    stream more bytes draw more power at the same tensor-core load, so under the cap they run at lower clocks."""
    fn, args, flops = case
    jax.block_until_ready(fn(*args))
    with sampled_clocks(sample_ms) as samples:
        start = time.perf_counter()
        calls, half = 0, None
        while True:  # until `seconds` have passed and at least one call ran in the second half
            now = time.perf_counter()
            if half is None and now - start >= seconds / 2:
                half, calls = now, 0
            if half is not None and calls and now - start >= seconds:
                break
            jax.block_until_ready(fn(*args))  # one call in flight: queued outputs would pile up in memory
            calls += 1
        rate = calls * flops / (time.perf_counter() - half) / 1e12
    samples = samples[len(samples) // 2:]
    if not samples:
        raise RuntimeError("clocks_under_load: nvidia-smi reported no clock and power samples")
    return {"tflops": rate, "sm_clock_mhz": statistics.median(c for c, _ in samples),
            "power_w": statistics.median(p for _, p in samples)}


def p2p_gbps(src: jax.Device, dsts: list[jax.Device], num_bytes: int = GIB, fan_in: bool = False) -> float:
    """Aggregate GB/s of device_put copies: src -> each of dsts, or (fan_in) each of dsts -> src."""
    n = num_bytes // 2
    if fan_in:
        arrays = [jax.device_put(jnp.ones((n,), jnp.bfloat16), d) for d in dsts]
        return len(dsts) * num_bytes / time_s(lambda: [jax.device_put(a, src) for a in arrays]) / 1e9
    a = jax.device_put(jnp.ones((n,), jnp.bfloat16), src)
    return len(dsts) * num_bytes / time_s(lambda: [jax.device_put(a, d) for d in dsts]) / 1e9


def pull_overlap(dst: jax.Device, srcs: list[jax.Device], num_bytes: int, gemm: int = 8192) -> dict[str, float]:
    """Compute slowdown while a pull is in flight: a GEMM chain on dst alone, the pull alone, and both, the pull
    issued before the compute (DESIGN.md: device_put waits for work already queued on its destination)."""
    n = num_bytes // 2 // len(srcs)
    remote = [jax.device_put(jnp.ones((n,), jnp.bfloat16), s) for s in srcs]
    a = jax.device_put(jnp.ones((gemm, gemm), jnp.bfloat16), dst)
    chain = jax.jit(lambda a: jax.lax.fori_loop(0, 20, lambda i, x: (x @ a) * 1e-3, a))

    def pull():
        return [jax.device_put(r, dst) for r in remote]

    t_compute = time_s(chain, a)
    t_pull = time_s(pull)
    t_both = time_s(lambda: (pull(), chain(a)))
    return {"compute_s": t_compute, "pull_s": t_pull, "both_s": t_both, "pull_gbps": num_bytes / t_pull / 1e9,
            "overlap_fraction": (t_compute + t_pull - t_both) / min(t_compute, t_pull)}


def attention_tflops(impl: str, t: int, heads: int, qk_dim: int, v_dim: int, **timing) -> float:
    """One causal sequence of t tokens; FLOPs counted for the causal half: 2 * t^2/2 * H * (qk + v)."""
    key = jax.random.key(3)
    q = jax.random.normal(key, (t, heads, qk_dim), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(key, (t, heads, qk_dim), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(key, (t, heads, v_dim), jnp.float32).astype(jnp.bfloat16)
    seg, pos = jnp.zeros((t,), jnp.int32), jnp.arange(t, dtype=jnp.int32)
    fn = attention_kernels.get_backend(impl)
    f = jax.jit(lambda q, k, v: fn(q, k, v, seg, pos, scale=qk_dim ** -0.5))
    return t * t * heads * (qk_dim + v_dim) / time_s(f, q, k, v, **timing) / 1e12


def all2all_gbps(devices: list[jax.Device], bytes_per_peer: int = 64 << 20) -> float:
    """Per-rank bytes sent to peers per second by jax.lax.all_to_all under shard_map (the DEP dispatch)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = len(devices)
    mesh = Mesh(np.asarray(devices), ("x",))
    rows = bytes_per_peer // (7168 * 2)
    x = jax.device_put(jnp.ones((n * n, rows, 7168), jnp.bfloat16), NamedSharding(mesh, P("x")))
    f = jax.jit(shard_map(lambda b: jax.lax.all_to_all(b, "x", 0, 0, tiled=True), mesh, P("x"), P("x")))
    return (n - 1) * bytes_per_peer / time_s(f, x) / 1e9



def copy_engine_overlap(dst: jax.Device, srcs: list[jax.Device], num_bytes: int, t: int = 8192) -> dict[str, float]:
    """The copy-engine pull against the peer-copy ceiling, and compute slowdown while it runs, all on `dst`.

    Pull: cudaMemcpyAsync over unified addresses of num_bytes split over the peers, back to back on one side stream
    (what the transport does) and, as the ceiling, one stream per peer at once. Compute: a bf16 GEMM chain and MLA
    attention (cuDNN, 128 heads, q/k 192, v 128, t tokens causal), alone and with the pull issued on the side stream
    first.
    """
    import cupy

    rt = cupy.cuda.runtime
    ordinal = dst.local_hardware_id
    per_peer = num_bytes // len(srcs) // 2
    remote = [jax.device_put(jnp.ones((per_peer,), jnp.bfloat16), s) for s in srcs]
    local = [jax.device_put(jnp.zeros((per_peer,), jnp.bfloat16), dst) for _ in srcs]
    jax.block_until_ready(remote + local)
    with cupy.cuda.Device(ordinal):
        streams = [rt.streamCreateWithFlags(rt.streamNonBlocking) for _ in srcs]

    def pull(concurrent: bool):
        with cupy.cuda.Device(ordinal):
            for i, (r, l_) in enumerate(zip(remote, local)):
                # the transport's call (`CudaCopier.issue`), so the ceiling and the pulls share a copy path
                rt.memcpyAsync(l_.unsafe_buffer_pointer(), r.unsafe_buffer_pointer(), r.nbytes, rt.memcpyDefault,
                               streams[i if concurrent else 0])

    def sync():
        with cupy.cuda.Device(ordinal):
            for s in streams:
                rt.streamSynchronize(s)

    a = jax.device_put(jnp.ones((8192, 8192), jnp.bfloat16), dst)
    chain = jax.jit(lambda a: jax.lax.fori_loop(0, 20, lambda i, x: (x @ a) * 1e-3, a))
    key = jax.random.key(4)
    q, k = (jax.device_put(jax.random.normal(key, (t, 128, 192), jnp.float32).astype(jnp.bfloat16), dst) for _ in "qk")
    v = jax.device_put(jax.random.normal(key, (t, 128, 128), jnp.float32).astype(jnp.bfloat16), dst)
    seg = jax.device_put(jnp.zeros((t,), jnp.int32), dst)
    pos = jax.device_put(jnp.arange(t, dtype=jnp.int32), dst)
    attn_fn = attention_kernels.get_backend("cudnn_mla_1seq")
    attn = jax.jit(lambda q, k, v: attn_fn(q, k, v, seg, pos, scale=192 ** -0.5))
    out = {}
    out["pull_one_stream_s"] = time_s(lambda: (pull(False), sync()))
    out["pull_ceiling_s"] = time_s(lambda: (pull(True), sync()))
    for name, fn, args in (("gemm", chain, (a,)), ("attention", attn, (q, k, v))):
        out[f"{name}_s"] = time_s(fn, *args)
        # the pull is issued (host-asynchronous) first and outlasts the compute: the compute runs with it in flight
        out[f"{name}_while_pulling_s"] = time_s(fn, *args, before=lambda: pull(False), after=sync)
        out[f"{name}_slowdown"] = out[f"{name}_while_pulling_s"] / out[f"{name}_s"]
    with cupy.cuda.Device(ordinal):
        for s in streams:
            rt.streamDestroy(s)
    out["pull_gbps"] = num_bytes / out["pull_one_stream_s"] / 1e9
    out["pull_ceiling_gbps"] = num_bytes / out["pull_ceiling_s"] / 1e9
    return out
