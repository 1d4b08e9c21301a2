"""Activation quantization for the FP8 GEMMs on one GPU (issue 26: "at HBM speed"): the one-pass Pallas Triton
kernel (`dwdp_jax.kernels.fp8_rows`) against XLA's `fp8.quantize_rows`, with a plain e4m3 cast (XLA, the same
2 bytes read and 1 written per element, no scales) and the HBM floor beside them.

Each shape's kernel output is checked first against `fp8.quantize_rows` (e4m3 bytes and scales); a shape that
fails gets no time and the run exits 1. Cases run in rounds (the cast first in each), medians over the rounds.

  python -m experiments.bench_fp8_rows            # on a GPU with FP8 (compute capability >= 8.9)
  python -m experiments.bench_fp8_rows --sweep    # also times every (block_m, num_warps) of the kernel
  python -m experiments.bench_fp8_rows --shape=hidden --norm   # and RMSNorm with it: unfused, fused (`norm_rows`)

With `--norm`, each norm input shape also times the layer's input RMSNorm followed by the kernel (the
`fp8_fused_norm=False` ablation) against `norm_rows`' fused kernel (the model's default), after checking the fused
one is as accurate.
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from dwdp_jax.kernels import fp8, fp8_rows, norm_rows
from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.progress import progress_bar
from dwdp_jax.results import write_measurements

# Rows x K quantized per prefill step of an R1 layer at 32768 tokens: the routed experts' gate/up input (top-8 rows)
# and down input, the dense projections' inputs (hidden, the attention output)
SHAPES = {"routed_gate_up": (262144, 7168), "routed_down": (262144, 2048), "hidden": (32768, 7168),
          "attention_out": (32768, 16384), "shared_down": (32768, 2048)}
SWEEP = [(bm, w) for bm in (32, 64, 128, 256) for w in (2, 4, 8)]
NORM_SHAPES = ("hidden",)  # the rows an RMSNorm hands an FP8 projection: the layer's input norm
NORM_EPS = 1e-6

_SHAPES = flags.DEFINE_multi_enum("shape", list(SHAPES), list(SHAPES), "the shapes to time")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "rounds of every case", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls per case and round (median)", lower_bound=1)
_SWEEP = flags.DEFINE_bool("sweep", False, "also time every (block_m, num_warps) in SWEEP")
_NORM = flags.DEFINE_bool("norm", False, "also time RMSNorm then the kernel against the fused kernel (`norm_rows`) "
                          f"at {NORM_SHAPES}")
_RESULTS = flags.DEFINE_string("results", "results", "results root")


def activations(m: int, k: int) -> jax.Array:
    """bf16 rows whose magnitudes spread over six orders (so the groups' scales differ), one row all zeros."""
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    x = x * jnp.exp(3 * jax.random.normal(jax.random.key(1), (m, 1), jnp.float32))
    return x.astype(jnp.bfloat16).at[1].set(0)


def check(x: jax.Array) -> dict[str, float]:
    """The kernel against `fp8.quantize_rows`: the share of e4m3 values that differ, their largest distance in
    units of the group's scale, and the scales' largest relative difference."""
    q, s = fp8_rows.quantize_rows_kernel(x)
    rq, rs = jax.jit(fp8.quantize_rows)(x)
    differ = jnp.mean((q.astype(jnp.float32) != rq.astype(jnp.float32)).astype(jnp.float32))
    step = jnp.max(jnp.abs(q.astype(jnp.float32) - rq.astype(jnp.float32)))
    scale_rel = jnp.max(jnp.abs(s - rs) / rs)
    return {"values_differ": float(differ), "max_value_diff": float(step), "scale_max_rel_diff": float(scale_rel)}


def cases(x: jax.Array, sweep: bool) -> dict:
    out = {"cast_e4m3": jax.jit(lambda x: x.astype(fp8.E4M3)), "xla": jax.jit(fp8.quantize_rows),
           "kernel": fp8_rows.quantize_rows_kernel}
    for bm, w in SWEEP if sweep else ():
        out[f"kernel_m{bm}_w{w}"] = lambda x, bm=bm, w=w: fp8_rows.quantize_rows_kernel(x, block_m=bm, num_warps=w)
    return out


def check_norm(x: jax.Array, w: jax.Array) -> dict[str, float]:
    """The fused kernel against the norm then the quantization: each one's error against the normed rows (XLA may
    keep at fp32 a bf16 rounding the kernel makes) and the share of e4m3 values that differ."""
    normed = jax.jit(norm_rows.rms_norm, static_argnums=2)(x, w, NORM_EPS)
    fused = norm_rows.rms_norm_quantized_kernel(x, w, eps=NORM_EPS)
    unfused = fp8_rows.quantize_rows_kernel(normed)
    exact = normed.astype(jnp.float32)

    def rel_err(q, s) -> float:
        return float(jnp.linalg.norm(fp8.dequantize_rows(q, s) - exact) / jnp.linalg.norm(exact))

    differ = jnp.mean((fused[0].astype(jnp.float32) != unfused[0].astype(jnp.float32)).astype(jnp.float32))
    return {"fused_rel_err": rel_err(*fused), "unfused_rel_err": rel_err(*unfused), "values_differ": float(differ)}


def norm_cases(w: jax.Array) -> dict:
    unfused = jax.jit(lambda x: fp8_rows.quantize_rows_kernel(norm_rows.rms_norm(x, w, NORM_EPS)))
    out = {"norm_unfused": unfused}
    for warps in (2, 4, 8):
        out[f"norm_fused_w{warps}"] = jax.jit(
            lambda x, warps=warps: norm_rows.rms_norm_quantized_kernel(x, w, eps=NORM_EPS, num_warps=warps))
    return out


def main(argv):
    del argv
    device = jax.devices()[0]
    if not fp8_rows.on_kernel(jnp.zeros((1, 128), jnp.bfloat16), device):
        print(f"bench_fp8_rows: needs an NVIDIA GPU with FP8 (found {device.device_kind})", file=sys.stderr)
        sys.exit(2)
    hbm = gb.hbm_gbps() * 1e9
    metrics, raw, failed = {"hbm_read_gbps": hbm / 1e9}, {}, []
    for name in progress_bar(list(_SHAPES.value), "shapes", "shape"):
        m, k = SHAPES[name]
        x = activations(m, k)
        got = check(x)
        metrics.update({f"{name}_{key}": v for key, v in got.items()})
        # e4m3 rounding of an fp32 quotient: a division rounded differently may move a value by one e4m3 step
        if not (got["values_differ"] <= 1e-4 and got["scale_max_rel_diff"] == 0.0):
            failed.append(f"{name}: {got}")
            continue
        num_bytes = m * k * 3 + m * (k // fp8.BLOCK) * 4
        fns = cases(x, _SWEEP.value)
        if _NORM.value and name in NORM_SHAPES:
            w = (1 + 0.3 * jax.random.normal(jax.random.key(2), (k,), jnp.float32)).astype(jnp.bfloat16)
            got = check_norm(x, w)
            metrics.update({f"{name}_norm_{key}": v for key, v in got.items()})
            if not (got["fused_rel_err"] <= 1.05 * got["unfused_rel_err"] and got["values_differ"] <= 0.05):
                failed.append(f"{name} norm: {got}")
            else:
                fns.update(norm_cases(w))
        seconds = {c: [] for c in fns}
        for _ in range(_ROUNDS.value):
            for c, fn in fns.items():
                seconds[c].append(gb.time_s(fn, x, repeats=_REPEATS.value, warmup=2))
        raw[name] = seconds
        for c, s in seconds.items():
            med = statistics.median(s)
            metrics[f"{name}_{c}_ms"] = med * 1e3
            # the fused norm's floor is the quantization's (2 bytes read, 1 written per element); unfused, 4 more
            metrics[f"{name}_{c}_over_floor"] = med / (num_bytes / hbm)
        metrics[f"{name}_floor_ms"] = num_bytes / hbm * 1e3
        if f"{name}_norm_unfused_ms" in metrics:
            fused = min(v for c, v in metrics.items() if c.startswith(f"{name}_norm_fused_w") and c.endswith("_ms"))
            metrics[f"{name}_norm_fused_speedup"] = metrics[f"{name}_norm_unfused_ms"] / fused
    print(f"\nmedians of {_ROUNDS.value} rounds; floor: the bytes (2 read + 1 written per element, 4 per scale) at "
          f"{hbm / 1e9:.0f} GB/s (measured read rate)")
    print(f"{'shape':16} {'floor ms':>8} {'cast e4m3':>9} {'xla':>7} {'kernel':>7}   (ms)")
    for name in _SHAPES.value:
        if f"{name}_kernel_ms" in metrics:
            print(f"{name:16} {metrics[f'{name}_floor_ms']:8.3f} " + " ".join(
                f"{metrics[f'{name}_{c}_ms']:{w}.3f}" for c, w in (("cast_e4m3", 9), ("xla", 7), ("kernel", 7))))
    for name in _SHAPES.value:
        if f"{name}_norm_fused_speedup" in metrics:
            fused = {c: v for c, v in metrics.items() if c.startswith(f"{name}_norm_fused_w") and c.endswith("_ms")}
            print(f"{name}: RMSNorm then the kernel {metrics[f'{name}_norm_unfused_ms']:.3f} ms, fused "
                  + ", ".join(f"{c[len(name) + 12:-3]} {v:.3f}" for c, v in fused.items())
                  + f" ms: {metrics[f'{name}_norm_fused_speedup']:.3f}x (floor {metrics[f'{name}_floor_ms']:.3f})")
    if _SWEEP.value:
        for name in _SHAPES.value:
            timed = {c: v for c, v in metrics.items() if c.startswith(f"{name}_kernel") and c.endswith("_ms")}
            if timed:
                best = min(timed, key=timed.get)
                print(f"{name}: fastest {best} {timed[best]:.3f} ms")
    config = {"shapes": {s: SHAPES[s] for s in _SHAPES.value}, "rounds": _ROUNDS.value, "repeats": _REPEATS.value,
              "sweep": _SWEEP.value, "norm": _NORM.value, "device": device.device_kind, "jax": jax.__version__,
              "failed": failed, "kernel_blocks": {"block_m": fp8_rows.BLOCK_M, "num_warps": fp8_rows.NUM_WARPS}}
    write_measurements("bench_fp8_rows", config=config, raw=raw, metrics=metrics, root=_RESULTS.value)
    if failed:
        print("FAILED:", *failed, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
