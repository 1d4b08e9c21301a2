"""MLA prefill attention on one GPU, side by side (issue 28): this project's Mosaic GPU kernel in FlashAttention-3's
schedule (`attention_mgpu`) and tokamax's Mosaic GPU flash attention at q/k 192, v 128 over packed sequences, against
cuDNN with V padded to 192 (the model's `cudnn` path), cuDNN at 192/192, cuDNN's
native 192/128 where the case is one sequence (its only correct use), the dense bf16 GEMM and the datasheet roofline.

Every rate is counted at 192/128 FLOPs, causal: sum over sequences of 2 * L^2/2 * H * (192 + 128). Each backend's
output is checked first against an fp32 reference on sampled query rows of every sequence; a backend that fails
the check gets no rate and the run exits 1. Each backend is timed twice, with the SM clock read after each: in a
burst from idle (`--burst_idle_s`; the clocks short runs and public kernel figures get) and after `--sustain_s` of
load (the clocks serving gets: an H200's power cap lowers them within a second, most for the kernels that keep the
tensor cores busiest). tokamax's rows also carry the share of its tiles' work the count takes (`tile_share`:
a tile of 128 query rows walks every key block from its rows' first sequence start to its diagonal,
`attention_tokamax.visited_pairs`) and its rates over all the pairs its tiles computed (`visited_tflops`,
`burst_visited_tflops`).

  python -m experiments.bench_attention           # on a GPU; writes results/bench_attention/<run>.json
  python -m experiments.bench_attention --tune    # also sweeps both Mosaic GPU kernels' blocks per token count and
                                                  # records the fastest in the kernel block cache (kernels.tuning)
"""

import concurrent.futures
import dataclasses
import datetime
import functools
import importlib.metadata
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dwdp_jax.kernels import attention, attention_mgpu as am, attention_tokamax as tk, tuning
from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.progress import progress_bar
from dwdp_jax.results import write_measurements

_CASES = flags.DEFINE_string(
    "cases", "packed4=9001,7000,10500,6267;packed6=4001,7000,3500,8191,6000,4076;single8k=8192",
    "name=comma list of sequence lengths;... (each case's sequences packed into one batch)")
_HEADS = flags.DEFINE_integer("heads", 128, "attention heads (R1: 128)")
_QK = flags.DEFINE_integer("qk_dim", 192, "q/k head width (R1: 128 nope + 64 rope)")
_V = flags.DEFINE_integer("v_dim", 128, "v head width (R1: 128)")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls per backend (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed calls first")
_SUSTAIN = flags.DEFINE_float("sustain_s", 1.0, "warm-up goes on this long, so every backend is timed at the "
                              "clocks a sustained load gets")
_BURST_IDLE = flags.DEFINE_float("burst_idle_s", 2.0, "each backend is also timed in a burst: this many seconds "
                                 "idle, one untimed call, the median of 3 (the clocks a short run gets before the "
                                 "power cap acts, as public kernel figures are taken); 0 skips it", lower_bound=0.0)
_BURSTS = flags.DEFINE_integer("bursts", 1, "bursts per backend (idle, then timed): the median is the burst rate, "
                               "the lowest and highest beside it", lower_bound=1)
_BACKENDS = flags.DEFINE_list("backends", [], "the backends to time (default: all of the case's; see backends())")
_ROWS_CHECKED = flags.DEFINE_integer("rows_checked", 64, "query rows per sequence checked against fp32")
_TOL = flags.DEFINE_float("rel_tol", 1e-2, "relative norm error allowed on the checked rows (bf16)")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "dense bf16 peak of the card (H200/H100 SXM datasheet)")
_TUNE = flags.DEFINE_bool("tune", False, "sweep the Mosaic GPU kernels' blocks (their candidate_blocks) at each case's "
                          "token count and record each one's fastest in the kernel block cache")
_RESULTS = flags.DEFINE_string("results", "results", "results root")


def parse_cases(text: str) -> dict[str, tuple[int, ...]]:
    cases = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, lengths = part.partition("=")
        cases[name.strip()] = tuple(int(n) for n in lengths.split(","))
        if not cases[name.strip()] or min(cases[name.strip()]) < 1:
            raise ValueError(f"--cases: {part!r} needs name=length,length,... with lengths >= 1")
    return cases


def causal_flops(lengths, heads: int, qk: int, v: int) -> float:
    return float(sum(n * n for n in lengths)) * heads * (qk + v)


def inputs(lengths, heads: int, qk: int, v: int, seed: int = 0):
    """q, k, and a v of width max(v, qk) (its first v columns are the v of the 192/128 backends: one reference
    serves both widths), segment ids and positions."""
    t = sum(lengths)
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k = (jax.random.normal(kk, (t, heads, qk), jnp.float32).astype(jnp.bfloat16) for kk in keys[:2])
    v_wide = jax.random.normal(keys[2], (t, heads, max(v, qk)), jnp.float32).astype(jnp.bfloat16)
    seg = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return q, k, v_wide, jnp.asarray(seg), jnp.asarray(pos)


def checked_rows(lengths, per_seq: int, seed: int = 0) -> list[np.ndarray]:
    """Per sequence: its first and last rows and a random sample between (indices within the sequence)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        rows = {0, n - 1} | set(rng.integers(0, n, size=min(per_seq, n)).tolist())
        out.append(np.asarray(sorted(rows)))
    return out


def reference_rows(q, k, v_wide, lengths, rows, scale: float) -> list[jax.Array]:
    """fp32 attention of the checked rows of each sequence over that sequence's keys alone."""
    out, start = [], 0
    for n, r in zip(lengths, rows):
        q_r = q[start + r].astype(jnp.float32)
        k_s, v_s = (a[start:start + n].astype(jnp.float32) for a in (k, v_wide))
        # precision HIGHEST: JAX's default lets GPUs take fp32 dots in TF32
        s = jnp.einsum("rhk,lhk->hrl", q_r, k_s, precision=jax.lax.Precision.HIGHEST) * scale
        s = jnp.where(jnp.arange(n)[None, None, :] <= jnp.asarray(r)[None, :, None], s, -jnp.inf)
        out.append(jnp.einsum("hrl,lhv->rhv", jax.nn.softmax(s, axis=-1), v_s, precision=jax.lax.Precision.HIGHEST))
        start += n
    return out


def rel_error(out, refs, lengths, rows) -> float:
    """Relative norm error over all checked rows (the reference cut to the output's width)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    got = np.concatenate([np.asarray(out[s + r], np.float32) for s, r in zip(starts, rows)])
    ref = np.concatenate([np.asarray(x[..., :out.shape[-1]], np.float32) for x in refs])
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def backends(lengths, qk: int, v: int):
    """name -> (attention fn, whether it takes the wide v, FLOPs counted at its own widths over 192/128's)."""
    out = {"mgpu": (attention.get_backend("mgpu"), False, 1.0),
           "tokamax": (attention.get_backend("tokamax"), False, 1.0),
           "tokamax_eager_rescale": (attention.get_backend("tokamax_eager_rescale"), False, 1.0),
           "cudnn_padded_v": (attention.get_backend("cudnn"), False, 1.0),
           "cudnn_192_192": (attention.cudnn_attention, True, 2 * qk / (qk + v))}
    if len(lengths) == 1:  # the single-sequence-only variants: native cuDNN, tokamax without the packed key range
        out["cudnn_native_1seq"] = (attention.get_backend("cudnn_mla_1seq"), False, 1.0)
        out["tokamax_1seq"] = (attention.get_backend("tokamax_1seq"), False, 1.0)
    return out


def check_backends(cases: dict, qk: int, v: int) -> None:
    """ValueError naming any `--backends` entry no case has."""
    known = {n for lengths in cases.values() for n in backends(lengths, qk, v)}
    if unknown := set(_BACKENDS.value) - known:
        raise ValueError(f"--backends: unknown {sorted(unknown)}; the cases have {sorted(known)}")


def selected(available: dict) -> list:
    """The (name, backend) pairs of a case that `--backends` names (all by default)."""
    return [(n, b) for n, b in available.items() if not _BACKENDS.value or n in _BACKENDS.value]


def bursts(f, args, flops: float, key: str) -> dict:
    """`--bursts` times: `--burst_idle_s` idle, one untimed call, the median of 3 timed; their median rate (and its
    SM clock), lowest and highest."""
    rates, clocks = [], []
    for _ in range(_BURSTS.value):
        time.sleep(_BURST_IDLE.value)
        rates.append(flops / gb.time_s(f, *args, repeats=3, warmup=1) / 1e12)
        clocks.append(gb.sm_clock_mhz())
    mid = int(np.argsort(rates)[len(rates) // 2])
    out = {f"{key}_tflops": float(np.median(rates)), f"{key}_min_tflops": min(rates),
           f"{key}_max_tflops": max(rates)}
    if clocks[mid] is not None:
        out[f"{key}_sm_clock_mhz"] = clocks[mid]
    return out


# The kernels --tune sweeps: backend -> (the attention fn taking blocks=, candidates per head widths, cache name,
# cached-or-default blocks per (tokens, qk, v, device kind)).
SWEPT = {"mgpu": (am.mgpu_attention, am.candidate_blocks, am.KERNEL, am.blocks_for),
         "tokamax": (tk.tokamax_attention, tk.candidate_blocks, tk.KERNEL, tk.blocks_for)}


def tune(name, kernel, lengths, q, k, v, seg, pos, refs, rows, flops, kind, timing) -> dict:
    """Every candidate schedule of `kernel` (a SWEPT key) compiled (concurrently), checked, timed; the fastest
    correct one recorded."""
    fn, candidates, cache_name, _ = SWEPT[kernel]
    qk, vd = q.shape[-1], v.shape[-1]
    jitted = {b: jax.jit(functools.partial(fn, scale=qk ** -0.5, blocks=b)) for b in candidates(qk, vd)}

    def compile_one(b):
        try:
            return jitted[b].lower(q, k, v, seg, pos).compile()
        except Exception as e:  # a schedule that cannot compile (registers, shared memory) is skipped
            return repr(e)[:300]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        compiled = dict(zip(jitted, pool.map(compile_one, jitted)))
    sweep = {}
    for b in progress_bar(list(compiled), f"{name}: {kernel} blocks", "config"):
        c = compiled[b]
        if isinstance(c, str):
            sweep[b] = {"error": c}
            continue
        err = rel_error(c(q, k, v, seg, pos), refs, lengths, rows)
        sweep[b] = {"rel_err": err}
        if err <= _TOL.value:
            sweep[b]["tflops"] = flops / gb.time_s(c, q, k, v, seg, pos, **timing) / 1e12
        print(name, b, sweep[b], flush=True)
    ok = {b: r["tflops"] for b, r in sweep.items() if "tflops" in r}
    if ok:
        best = max(ok, key=ok.get)
        how = f"experiments.bench_attention {datetime.date.today()}, {len(lengths)} sequences, {q.shape[1]} heads"
        tuning.record(cache_name, kind, qk, vd, False, sum(lengths), best, ok[best], how)
    return {str(dataclasses.astuple(b)): r for b, r in sweep.items()}


def versions() -> dict:
    out = {"jax": jax.__version__, "device_kind": jax.devices()[0].device_kind, "argv": sys.argv,
           "date": datetime.date.today().isoformat()}
    for pkg in ("tokamax", "jaxlib", "jax-cuda13-plugin", "nvidia-cudnn-cu13"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        from jax._src.lib import cuda_versions

        out["cudnn_runtime"] = cuda_versions.cudnn_get_version()
    except Exception:  # the version probe is informational only
        out["cudnn_runtime"] = None
    return out


def main(argv):
    del argv
    cases, heads, qk, vd = parse_cases(_CASES.value), _HEADS.value, _QK.value, _V.value
    check_backends(cases, qk, vd)
    device = jax.devices()[0]
    if device.platform != "gpu":
        print("bench_attention: needs a GPU", file=sys.stderr)
        sys.exit(2)
    tk.check_device(device)
    timing = dict(repeats=_REPEATS.value, warmup=_WARMUP.value, sustain_s=_SUSTAIN.value)
    # the dense GEMM under the same timing, before and after: the card's clocks in this run
    metrics = {"roofline_tflops": _PEAK.value, "dense_gemm_tflops_before": gb.dense_gemm_tflops(8192, 8192, 8192,
                                                                                                **timing)}
    raw, failed, tuned_tokens = {"lengths": cases, "versions": versions()}, [], set()
    for name, lengths in cases.items():
        q, k, v_wide, seg, pos = inputs(lengths, heads, qk, vd)
        v = v_wide[..., :vd]
        rows = checked_rows(lengths, _ROWS_CHECKED.value)
        refs = reference_rows(q, k, v_wide, lengths, rows, qk ** -0.5)
        flops = causal_flops(lengths, heads, qk, vd)
        if _TUNE.value and sum(lengths) not in tuned_tokens:  # the cache keys on the token count
            tuned_tokens.add(sum(lengths))
            for kernel in SWEPT:
                raw[f"{name}_{kernel}_sweep"] = tune(name, kernel, lengths, q, k, v, seg, pos, refs, rows, flops,
                                                     device.device_kind, timing)
        blocks = {kernel: blocks_for(sum(lengths), qk, vd, device.device_kind)
                  for kernel, (*_, blocks_for) in SWEPT.items()}
        raw.update({f"{name}_{kernel}_blocks": dataclasses.astuple(b) for kernel, b in blocks.items()})
        # the share of tokamax's tiles' work the FLOP count takes
        tile_share = sum(n * n for n in lengths) / 2 / tk.visited_pairs(lengths, blocks["tokamax"])
        for backend, (fn, wide, own) in progress_bar(selected(backends(lengths, qk, vd)), name, "backend"):
            f = jax.jit(functools.partial(fn, scale=qk ** -0.5))
            args = (q, k, v_wide if wide else v, seg, pos)
            err = rel_error(f(*args), refs, lengths, rows)
            metrics[f"{name}_{backend}_rel_err"] = err
            if not err <= _TOL.value:
                failed.append(f"{name}/{backend}: rel err {err:.3g} > {_TOL.value}")
                continue
            if _BURST_IDLE.value:  # first, so that no earlier load holds the clocks down
                metrics.update(bursts(f, args, flops, f"{name}_{backend}_burst"))
            seconds = gb.time_s(f, *args, **timing)
            if (clock := gb.sm_clock_mhz()) is not None:
                metrics[f"{name}_{backend}_sm_clock_mhz"] = clock
            metrics[f"{name}_{backend}_ms"] = seconds * 1e3
            metrics[f"{name}_{backend}_tflops"] = flops / seconds / 1e12
            metrics[f"{name}_{backend}_over_roofline"] = flops / seconds / 1e12 / _PEAK.value
            if own != 1.0:
                metrics[f"{name}_{backend}_tflops_own_widths"] = own * flops / seconds / 1e12
            b = f"{name}_{backend}_burst"
            if backend.startswith("tokamax"):
                metrics[f"{name}_{backend}_tile_share"] = tile_share
                metrics[f"{name}_{backend}_visited_tflops"] = flops / seconds / 1e12 / tile_share
                if b + "_tflops" in metrics:
                    metrics[b + "_visited_tflops"] = metrics[b + "_tflops"] / tile_share
            burst = "" if b + "_tflops" not in metrics else (
                f"  burst {metrics[b + '_tflops']:.1f} [{metrics[b + '_min_tflops']:.1f}, "
                f"{metrics[b + '_max_tflops']:.1f}] TFLOP/s")
            print(f"{name:<10}{backend:<20}{flops / seconds / 1e12:8.1f} TFLOP/s {seconds * 1e3:8.2f} ms  "
                  f"rel err {err:.2e}{burst}", flush=True)
        for a, b in (("tokamax", "cudnn_padded_v"), ("mgpu", "tokamax")):
            if f"{name}_{a}_tflops" in metrics and f"{name}_{b}_tflops" in metrics:
                metrics[f"{name}_{a}_over_{b}"] = metrics[f"{name}_{a}_tflops"] / metrics[f"{name}_{b}_tflops"]
    metrics["dense_gemm_tflops_after"] = gb.dense_gemm_tflops(8192, 8192, 8192, **timing)
    config = {"cases": cases, "heads": heads, "qk_dim": qk, "v_dim": vd, "repeats": _REPEATS.value,
              "warmup": _WARMUP.value, "sustain_s": _SUSTAIN.value, "burst_idle_s": _BURST_IDLE.value,
              "bursts": _BURSTS.value, "backends": _BACKENDS.value,
              "rows_checked": _ROWS_CHECKED.value, "rel_tol": _TOL.value,
              "tuned_into": str(tuning.cache_path()) if _TUNE.value else ""}
    raw["failed"] = failed
    write_measurements("bench_attention", config=config, raw=raw, metrics=metrics, root=_RESULTS.value)
    if failed:
        print("bench_attention: failed the correctness check (no rate reported): " + "; ".join(failed),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
