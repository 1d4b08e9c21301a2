"""Dense FP8 GEMMs at DeepSeek-R1's projection shapes on one GPU, side by side (issue 26): the block-scaled kernel
the model runs for FP8 projections (`dwdp_jax.kernels.dense_fp8`: e4m3 weights with a scale per 128 x 128 block,
rows in 1 x 128 groups, fp32 promotion per K block) against cuBLAS's FP8 GEMM with one scale per tensor (the
ceiling), cuBLASLt's own block-scaled FP8 GEMM where the card and cuBLAS have it (`cublaslt_fp8`, case `cublaslt`),
the path it replaced (the weight dequantized, then a bf16 GEMM), and the dense bf16 GEMM.

Each shape's kernel output is checked first against the fp32 product of the same quantized operands (sampled
rows); a shape that fails gets no rate, its swept blocks are not recorded, and the run exits 1. Cases run in rounds,
cuBLAS FP8 first in each, so all see the same clocks; ratios are medians over the rounds.

  python -m experiments.bench_fp8_dense                 # on a Hopper GPU; results/bench_fp8_dense/<run>.json
  python -m experiments.bench_fp8_dense --tune          # also sweeps the kernel's schedules per shape and
                                                        # records the fastest in the kernel block cache once it
                                                        # beats the blocks before it in the rounds, side by side,
                                                        # with its rate and cuBLASLt's from those rounds: the
                                                        # model's projections take the faster of the two
  python -m experiments.bench_fp8_dense --record        # records those two rates without the sweep
"""

from __future__ import annotations

import datetime
import functools
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from dwdp_jax.kernels import cublaslt_fp8, dense_fp8, fp8, tuning
from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.measure.kernel_sweeps import dense_fp8_candidates, swept, swiglu_fp8_candidates
from dwdp_jax.progress import progress_bar
from dwdp_jax.results import run_stamp, write_measurements

# R1's FP8 projections [in, out]: attention (q_a, q_b, kv_a with its partial block, kv_b, o), the dense layers'
# MLP (gate and up, down), the shared expert (gate and up, down); and the stacks the model runs
SHAPES = {"q_a": (7168, 1536), "q_b": (1536, 24576), "kv_a": (7168, 576), "kv_b": (512, 32768), "o": (16384, 7168),
          "mlp_gate_up": (7168, 18432), "mlp_down": (18432, 7168), "shared_gate_up": (7168, 2048),
          "shared_down": (2048, 7168),
          # stacked (`dense_fp8.linear_stacked`): q_a with kv_a as the model runs them, gate with up as it ran its
          # MLPs before their fused SwiGLU (`dense_fp8.swiglu`)
          "q_a_kv_a": (7168, 2112), "mlp_gate_up_stacked": (7168, 36864), "shared_gate_up_stacked": (7168, 4096),
          # kv_b as the model runs it (`dense_fp8.linear_each`): k_nope and v, 128 heads x 128 each
          "kv_b_part": (512, 16384)}

# R1's FP8 MLPs [hidden, intermediate]: the shared expert's and the dense layers'
MLPS = {"shared_mlp": (7168, 2048), "dense_mlp": (7168, 18432)}

_TOKENS = flags.DEFINE_integer("tokens", 32768, "rows (tokens of the prefill step)", lower_bound=128)
_SHAPES = flags.DEFINE_multi_enum("shape", list(SHAPES), list(SHAPES), "the projections to time (all unless "
                                  "only --mlp is given)")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "rounds of every case", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls of a case per round (a 32K-row GEMM of a narrow "
                                "projection takes 0.3 ms: three calls from idle spread 0.27-0.74 of cuBLAS)",
                                lower_bound=1)
_MLPS = flags.DEFINE_multi_enum("mlp", [], list(MLPS), "MLPs to time whole: the fused SwiGLU the model runs "
                                 "(`dense_fp8.swiglu`) against gate and up stacked, the SwiGLU in XLA, its "
                                 "quantization, then down (the path before it)")
_TUNE = flags.DEFINE_bool("tune", False, "sweep the kernel's schedules per shape (and the fused gate/up's per MLP) "
                          "and record the fastest in the kernel block cache where it beats, in the rounds, the blocks "
                          "the kernel took before")
_WITH_OPTION = flags.DEFINE_multi_string("with_option", [], "with --tune, sweep only the first candidate and those "
                                         "with any of these blocks options set (e.g. cluster_m)")
_RECORD = flags.DEFINE_bool("record", False, "record each shape's rates in the rounds, the kernel's (on its cached "
                            "blocks, or --tune's) and cuBLASLt's, in the kernel block cache: the model's projections "
                            "take the faster (--tune records them too)")
_TOL = flags.DEFINE_float("rel_tol", 2e-3, "relative error allowed against the fp32 product (bf16 output)")
_ROWS_CHECKED = flags.DEFINE_integer("rows_checked", 1024, "rows checked against the fp32 product")
_RESULTS = flags.DEFINE_string("results", "results", "results root")


def kernel_error(x_q, x_s, w: fp8.BlockScaled, blocks) -> float:
    """The kernel against the fp32 product of the dequantized operands on the first rows."""
    rows = _ROWS_CHECKED.value
    out = dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=blocks)[:rows]
    return gb.rel_error(out, gb.block_scaled_product(x_q[:rows], x_s[:, :rows], w))


def cublaslt_case(name: str, ops: tuple, metrics: dict, failed: list) -> tuple | None:
    """cuBLASLt's block-scaled GEMM as a case, once its output on the first rows matched the fp32 product; else
    None, the cause in `failed` (the other cases run: it is not the model's)."""
    case, err, why = gb.cublaslt_case(*ops[1:], _ROWS_CHECKED.value, _TOL.value)
    if err is not None:
        metrics[f"{name}_cublaslt_rel_err"] = err
    if why:
        failed.append(f"{name}: {why}")
    return case


def operands(t: int, k: int, n: int) -> tuple:
    """(bf16 activations, their e4m3 rows and scales, the FP8 weight) of one projection."""
    x = jax.random.normal(jax.random.key(0), (t, k), jnp.float32).astype(jnp.bfloat16)
    return (x, *fp8.quantize_rows(x), gb.block_scaled_weight(k, n))


def kernel_case(ops: tuple, blocks) -> tuple:
    x, x_q, x_s, w = ops
    kernel = jax.jit(lambda x_q, x_s, w: dense_fp8.block_scaled_gemm(x_q, x_s, w, blocks=blocks))
    return kernel, (x_q, x_s, w), 2 * x.shape[0] * x.shape[1] * w.values_GNK.shape[0]


def cases(ops: tuple, blocks) -> dict:
    """(fn, args, FLOPs) per path of one projection, all on the same bf16 activations and weights."""
    x, _, _, w = ops
    (t, k), n = x.shape, w.values_GNK.shape[0]
    flops = 2 * t * k * n
    with_quant = jax.jit(lambda x, w: dense_fp8.block_scaled_gemm(*fp8.quantize_rows(x), w, blocks=blocks))
    return {"block_scaled": kernel_case(ops, blocks),
            "block_scaled_with_row_quant": (with_quant, (x, w), flops),
            "dequant_bf16": (jax.jit(fp8.linear), (x, w), flops),
            "bf16": gb.dense_gemm_case(t, k, n)}


def stacked_mlp(x_TD, gate, up, down):
    """The FP8 MLP as the model ran it before `dense_fp8.swiglu`: gate and up as one stacked GEMM, the SwiGLU in
    XLA, then down (quantizing its input)."""
    g_TF, u_TF = dense_fp8.linear_stacked(x_TD, (gate, up))
    return dense_fp8.linear(jax.nn.silu(g_TF) * u_TF, down)


def mlp_operands(t: int, d: int, f: int) -> tuple:
    """(bf16 activations, gate, up, down) of one FP8 MLP."""
    weight = gb.block_scaled_weight
    return operands(t, d, f)[0], weight(d, f, 1), weight(d, f, 2), weight(f, d, 3)


def mlp_errors(x, gate, up, down, blocks) -> tuple[float, float]:
    """The fused gate/up's SwiGLU and the whole MLP against fp32 products of the same quantized operands on the
    first rows_checked rows (the MLP's hidden rows quantized again from the exact SwiGLU)."""
    x_q, x_s = fp8.quantize_rows(x[:_ROWS_CHECKED.value])
    g, u = (gb.block_scaled_product(x_q, x_s, w) for w in (gate, up))
    hidden = (jax.nn.silu(g) * u).astype(jnp.bfloat16)
    ours = dense_fp8.swiglu_hidden(x, gate, up, blocks=blocks[0])[:x_q.shape[0]]
    mlp = dense_fp8.swiglu(x, gate, up, down, blocks=blocks)[:x_q.shape[0]]
    mlp_exact = gb.block_scaled_product(*fp8.quantize_rows(hidden), down)
    return gb.rel_error(ours, hidden.astype(jnp.float32)), gb.rel_error(mlp, mlp_exact)


def hidden_case(ops: tuple, blocks) -> tuple:
    """The fused gate/up alone (`dense_fp8.swiglu_hidden`, its row quantization included)."""
    x, gate, up, _ = ops
    fn = jax.jit(lambda x, gate, up: dense_fp8.swiglu_hidden(x, gate, up, blocks=blocks))
    return fn, (x, gate, up), 2 * 2 * x.shape[0] * x.shape[1] * gate.values_GNK.shape[0]


def mlp_flops(ops: tuple) -> int:
    x, gate, _, _ = ops
    return 2 * x.shape[0] * x.shape[1] * gate.values_GNK.shape[0] * 3


def fused_mlp_case(ops: tuple, blocks) -> tuple:
    """The fused MLP (`dense_fp8.swiglu`) the model runs."""
    return jax.jit(lambda *ops: dense_fp8.swiglu(*ops, blocks=blocks)), ops, mlp_flops(ops)


def mlp_cases(ops: tuple, blocks) -> tuple[dict, tuple]:
    """(fn, args, FLOPs) of the fused and the stacked MLP, and cuBLAS FP8 at the same FLOPs."""
    x, gate, _, _ = ops
    (t, d), f = x.shape, gate.values_GNK.shape[0]
    return ({"fused_swiglu": fused_mlp_case(ops, blocks), "stacked": (jax.jit(stacked_mlp), ops, mlp_flops(ops))},
            gb.dense_gemm_case(t, d, 3 * f, jnp.float8_e4m3fn))


def tune(name: str, candidates, case) -> tuple:
    """(fastest blocks, their TFLOP/s, the sweep): every candidate's case timed alone."""
    sweep = {}
    for b in candidates:
        try:
            sweep[b] = gb.tflops(case(b))
        except Exception as e:  # a schedule that cannot compile is skipped
            sweep[b] = repr(e)[:200]
        print(name, b, sweep[b], file=sys.stderr, flush=True)
    timed = {b: v for b, v in sweep.items() if isinstance(v, float)}
    best = max(timed, key=timed.get)
    return best, timed[best], sweep


def main(argv):
    del argv
    if _WITH_OPTION.value and not _TUNE.value:
        raise app.UsageError("--with_option narrows the sweep: it needs --tune")
    swept(dense_fp8_candidates(fp8.BLOCK), _WITH_OPTION.value)  # a misspelt option fails before any device work
    device = jax.devices()[0]
    if not dense_fp8.on_kernel(jnp.zeros((1, 128), jnp.bfloat16), gb.block_scaled_weight(128, 128), device):
        print(f"bench_fp8_dense: needs a Hopper GPU (found {device.device_kind})", file=sys.stderr)
        sys.exit(2)
    t = _TOKENS.value
    shapes = _SHAPES.value if _SHAPES.present or not _MLPS.value else []
    metrics, raw, failed = {}, {}, []
    hbm = gb.hbm_gbps() * 1e9
    config = {"tokens": t, "shapes": {s: SHAPES[s] for s in shapes},
              "mlps": {m: MLPS[m] for m in _MLPS.value}, "rounds": _ROUNDS.value,
              "repeats": _REPEATS.value,
              "tune": _TUNE.value, "record": _RECORD.value, "rel_tol": _TOL.value, "device": device.device_kind,
              "jax": jax.__version__, "failed": failed, "shapes_done": []}
    # rewritten after each shape: a run cut short keeps the shapes it finished
    save = functools.partial(write_measurements, "bench_fp8_dense", config=config, raw=raw, metrics=metrics,
                             root=_RESULTS.value, run=run_stamp())
    for name in progress_bar(shapes, "shapes", "shape"):
        k, n = SHAPES[name]
        ops = operands(t, k, n)
        blocks = before = dense_fp8.cached_blocks(k, n, t)  # named: the kernel's cases never go to cuBLASLt
        if _TUNE.value:
            blocks, _, sweep = tune(name, swept(dense_fp8_candidates(k), _WITH_OPTION.value),
                                    functools.partial(kernel_case, ops))
            raw[f"{name}_sweep"] = {str(b): v for b, v in sweep.items()}
            raw[f"{name}_smem_ceiling"] = {str(b): b.smem_ceiling(False) for b in sweep}
        shape_cases = cases(ops, blocks)
        if blocks != before:
            shape_cases["block_scaled_before"] = kernel_case(ops, before)
        if cublaslt_fp8.unavailable(device) is None and (lt := cublaslt_case(name, ops, metrics, failed)):
            shape_cases["cublaslt"] = lt
        err = kernel_error(*ops[1:], blocks)
        metrics[f"{name}_rel_err"] = err
        if not err <= _TOL.value:
            failed.append(f"{name}: relative error {err:.3g} > {_TOL.value}")
            save(echo=False)
            continue
        dense = gb.dense_gemm_case(t, k, n, jnp.float8_e4m3fn)
        got = gb.round_robin_over_dense(shape_cases, dense, rounds=_ROUNDS.value,
                                        measure=functools.partial(gb.burst, repeats=_REPEATS.value))
        for case, stats in got.items():
            metrics.update({f"{name}_{case}_{key}": v for key, v in stats.items()})
        if _TUNE.value or _RECORD.value:  # both rates from the same rounds, for `dense_fp8.library_faster`
            kept = blocks if gb.confirmed(name, got, "block_scaled", metrics) else before
            how = f"experiments.bench_fp8_dense {datetime.date.today()}, {t} rows"
            tuning.record(dense_fp8.NAME_TUNED, device.device_kind, k, dense_fp8.padded_width(n), False, t, kept,
                          gb.recorded_tflops(got, "block_scaled" if kept == blocks else "block_scaled_before"), how)
            if "cublaslt" in got:
                tuning.record(cublaslt_fp8.KERNEL, device.device_kind, k, dense_fp8.padded_width(n), False, t,
                              cublaslt_fp8.Blocks(), gb.recorded_tflops(got, "cublaslt"), how)
        # the roofline at FP8: cuBLAS's rate, the bytes of x, the weight and the bf16 output once each
        secs = max(2 * t * k * n / (got["dense"]["tflops"] * 1e12), (t * k + k * n + 2 * t * n) / hbm)
        metrics[f"{name}_roofline_over_cublas_fp8"] = 2 * t * k * n / secs / (got["dense"]["tflops"] * 1e12)
        config["shapes_done"].append(name)
        save(echo=False)
    for name in progress_bar(list(_MLPS.value), "MLPs", "MLP"):
        d, f = MLPS[name]
        blocks, ops = None, mlp_operands(t, d, f)
        if _TUNE.value:
            before = dense_fp8.cached_blocks(d, f, t, fused=True)
            blocks, rate, sweep = tune(name, swept(swiglu_fp8_candidates(d), _WITH_OPTION.value),
                                       functools.partial(hidden_case, ops))
            raw[f"{name}_sweep"] = {str(b): v for b, v in sweep.items()}
        hidden_err, err = mlp_errors(*ops, (blocks, None))
        metrics[f"{name}_hidden_rel_err"], metrics[f"{name}_fused_swiglu_rel_err"] = hidden_err, err
        if not (hidden_err <= _TOL.value and err <= dense_fp8.SWIGLU_REL_TOL):
            failed.append(f"{name}: relative error of the fused SwiGLU {hidden_err:.3g} (allowed {_TOL.value}), "
                          f"of the MLP {err:.3g} (allowed {dense_fp8.SWIGLU_REL_TOL})")
            save(echo=False)
            continue
        cases_, dense = mlp_cases(ops, (blocks, None))
        if _TUNE.value and blocks != before:
            cases_["fused_swiglu_before"] = fused_mlp_case(ops, (before, None))
        got = gb.round_robin_over_dense(cases_, dense, rounds=_ROUNDS.value,
                                        measure=functools.partial(gb.burst, repeats=_REPEATS.value))
        for case, stats in got.items():
            metrics.update({f"{name}_{case}_{key}": v for key, v in stats.items()})
        if _TUNE.value and gb.confirmed(name, got, "fused_swiglu", metrics):
            tuning.record(dense_fp8.NAME_TUNED, device.device_kind, d, f, True, t, blocks, rate,
                          f"experiments.bench_fp8_dense --mlp {datetime.date.today()}, {t} rows")
        metrics[f"{name}_fused_over_stacked"] = got["fused_swiglu"]["over_dense"] / got["stacked"]["over_dense"]
        print(f"{name}: fused SwiGLU {got['fused_swiglu']['over_dense']:.3f} of cuBLAS FP8 at its FLOPs, stacked "
              f"{got['stacked']['over_dense']:.3f}: {metrics[f'{name}_fused_over_stacked']:.3f}x")
        save(echo=False)
    print(f"\n{t} rows; rates over cuBLAS FP8 (per-tensor scale), medians of {_ROUNDS.value} rounds")
    print(f"{'shape':15} {'cuBLAS FP8':>10} {'block-scaled':>12} {'+ row quant':>11} {'dequant+bf16':>12} {'bf16':>6} "
          f"{'cuBLASLt blocks':>15}")
    for name in shapes:
        if f"{name}_dense_tflops" in metrics:
            print(f"{name:15} {metrics[f'{name}_dense_tflops']:10.1f} "
                  + " ".join(f"{metrics.get(f'{name}_{c}_over_dense', float('nan')):{w}.3f}" for c, w in (
                      ("block_scaled", 12), ("block_scaled_with_row_quant", 11), ("dequant_bf16", 12), ("bf16", 6),
                      ("cublaslt", 15))))
    save()
    if failed:
        print("FAILED:", *failed, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
