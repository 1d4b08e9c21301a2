"""FP8 expert GEMMs on one GPU, side by side: the split-weight kernels' FP8 paths (e4m3 weights in 128 x 128
blocks, rows in 1 x 128 groups, DeepSeek-V3's scheme; `dwdp_jax.kernels.fp8`): the Mosaic GPU kernel
(`split_gemm_fp8_mgpu`, DeepGEMM's structure) and the Triton kernel's scaled path, against the dense FP8 GEMM
(cuBLAS, one scale per tensor: the ceiling), cuBLASLt's block-scaled dense FP8 GEMM of the same rows (the same
scaling as the kernels, DeepGEMM's grouped-over-dense comparison; where the card and cuBLAS have it, its error
checked first), the dense bf16 GEMM and the bf16 split kernel serving runs, in rounds,
over the model's tile-aligned groups (issue 6's "FP8 (e4m3) weight path with per-block scales", issue 26). Each
kernel's fastest blocks are first checked against the fp32 product of the same quantized operands (sampled rows of
every group, `gpu_bench.grouped_rel_err`): past --rel_tol, the projection gets no rate, nothing is recorded and the
run exits 1.

  python -m experiments.bench_fp8_gemm                  # on a GPU; results/bench_fp8_gemm/<run>.json
  python -m experiments.bench_fp8_gemm --tune           # also records each kernel's fastest blocks (kernels.tuning)
                                                        # where the rounds confirm them
  python -m experiments.bench_fp8_gemm --rows=262144 --skew=1.5 --tune   # serving's shape
  python -m experiments.bench_fp8_gemm --kernel=mgpu    # one FP8 kernel only
"""

import dataclasses
import datetime
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.kernels import cublaslt_fp8, fp8, tuning
from dwdp_jax.kernels.split_gemm import FP8_BLOCKS, Blocks, split_ragged_dot
from dwdp_jax.kernels.split_gemm_fp8_mgpu import NAME_TUNED, Fp8Blocks, default_blocks, split_ragged_dot_fp8_mgpu
from dwdp_jax.measure.kernel_sweeps import FP8_CANDIDATES, FP8_MGPU_CANDIDATES, swept
from dwdp_jax import results

_ROWS = flags.DEFINE_integer("rows", 131072, "routed rows (tokens x top-k)", lower_bound=1)
_EXPERTS = flags.DEFINE_integer("experts", 256, "groups", lower_bound=1)
_SKEW = flags.DEFINE_float("skew", 6.0, "max/mean group size of the skewed routing", lower_bound=1.0)
_ALIGN = flags.DEFINE_integer("align", 128, "groups padded to a multiple of this many rows (the model's layout); "
                              "FLOPs counted over the real rows", lower_bound=1)
_SLABS = flags.DEFINE_integer("slabs", 2, "slabs the experts are split into, equal but for the last (a DWDP rank's "
                              "local and pulled experts; the Triton kernels address at most 2^31 weight elements a "
                              "slab: 146 of R1's experts)", lower_bound=1)
_PROBLEMS = flags.DEFINE_multi_enum("problem", ["gate_up", "down"], ["gate_up", "down"], "the projections to time")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "burst rounds of every case against the dense bf16 GEMM", lower_bound=1)
_SUSTAINED_ROUNDS = flags.DEFINE_integer("sustained_rounds", 1, "rounds under sustained load (3 s a case, clocks "
                                         "and power sampled); 0 skips them", lower_bound=0)
_KERNELS = flags.DEFINE_multi_enum("kernel", ["mgpu", "triton"], ["mgpu", "triton"], "the FP8 split kernels to time")
_SWEEP = flags.DEFINE_bool("sweep", True, "time every candidate of each FP8 kernel (--nosweep: the cached winner, "
                           "else the default)")
_WITH_OPTION = flags.DEFINE_multi_string("with_option", [], "sweep only the first candidate (the defaults) and those "
                                         "with any of these blocks options set (e.g. wg_weights)")
_ERROR = flags.DEFINE_bool("error", True, "each FP8 kernel's relative error against per-group fp32 products "
                           "over sampled rows of every group (--noerror skips it)")
_TOL = flags.DEFINE_float("rel_tol", 2e-3, "relative error allowed against the fp32 product of the same quantized "
                          "operands (issue 26); a kernel past it gets no rate and is not recorded, the run exits 1",
                          lower_bound=0.0)
_TUNE = flags.DEFINE_bool("tune", False, "record each FP8 kernel's fastest blocks in the kernel block cache, once "
                          "its error is within --rel_tol (--noerror: unchecked) and where they beat, in the rounds, "
                          "the blocks the kernel took before (else those, at their rounds' rate)")
_RESULTS = flags.DEFINE_string("results", "results", "results root")

PROBLEMS = [("gate_up", 7168, 2048, True), ("down", 2048, 7168, False)]


@dataclasses.dataclass(frozen=True)
class Fp8Kernel:
    """An FP8 split kernel as the benchmark sweeps it: `split_ragged_dot`'s signature, its name in the block cache,
    its blocks type, the candidates per fused, and its blocks without a cached entry (k, n, fused -> blocks)."""

    fn: Callable
    tuned_name: str
    blocks_type: type
    candidates: dict
    defaults: Callable


KERNELS = {
    "mgpu": Fp8Kernel(split_ragged_dot_fp8_mgpu, NAME_TUNED, Fp8Blocks, FP8_MGPU_CANDIDATES, default_blocks),
    "triton": Fp8Kernel(split_ragged_dot, "split_triton_fp8", Blocks, {f: FP8_CANDIDATES for f in (True, False)},
                        lambda k, n, fused: FP8_BLOCKS),
}


def _bf16_split(x, gs, ws, fused, blocks):
    """The bf16 kernel serving runs for this projection (the faster tuned one: `gpu.fastest_split_ragged_dot`)."""
    from dwdp_jax.kernels import gpu

    del blocks
    return gpu.fastest_split_ragged_dot(x, gs, ws, fused=fused)


def slab_counts(experts: int, slabs: int) -> tuple[int, ...]:
    """Experts per slab: `slabs` equal slabs, the last one short when they do not divide."""
    each = -(-experts // slabs)
    return tuple(min(each, experts - i * each) for i in range(slabs) if experts > i * each)


def _sweep(name: str, kernel: str, padded, real: int, k: int, n: int, fused: bool,
           slabs: tuple[int, ...]) -> tuple[dict, object, object]:
    """(TFLOP/s or the error of every candidate of one FP8 kernel, the fastest candidate, the blocks the kernel
    takes today: its cached entry or its defaults)."""
    spec = KERNELS[kernel]
    tuned = tuning.lookup(spec.tuned_name, spec.blocks_type, jax.devices()[0].device_kind, k, n, fused, real)
    before = tuned or spec.defaults(k, n, fused)
    sweep = {}
    candidates = swept(spec.candidates[fused], _WITH_OPTION.value)
    candidates += [before] if before not in candidates else []  # what --tune would replace
    for b in candidates if _SWEEP.value else [before]:
        try:
            sweep[b] = gb.tflops(gb.fp8_split_case(padded, k, n, fused, b, counted_rows=real, kernel=spec.fn,
                                                   slab_counts=slabs))
        except Exception as e:  # a configuration that cannot compile (shared memory, registers) is skipped
            sweep[b] = repr(e)[:200]
        ceiling = getattr(b, "smem_ceiling", None)
        print(name, kernel, b, sweep[b], "" if ceiling is None else f"shared-memory ceiling {ceiling(fused):.3f} of "
              f"the FP8 peak", flush=True)
    timed = {b: v for b, v in sweep.items() if isinstance(v, float)}
    return sweep, max(timed, key=timed.get), before


def _padded(sizes):
    """Each group's rows padded to --align, as the model lays them out."""
    return -(-sizes // _ALIGN.value) * _ALIGN.value


def _problem(name: str, sizes, k: int, n: int, fused: bool, failed: list[str]) -> tuple[dict, dict]:
    """(metrics, raw) of one projection; a kernel whose error is past --rel_tol is appended to `failed`, and the
    projection then gets no rounds."""
    kind = jax.devices()[0].device_kind
    real, cols = int(sizes.sum()), 2 * n if fused else n
    padded = _padded(sizes)
    metrics, raw, best, before = {}, {}, {}, {}
    slabs = slab_counts(len(padded), _SLABS.value)
    failed_before = len(failed)
    for kernel in _KERNELS.value:
        sweep, best[kernel], before[kernel] = _sweep(name, kernel, padded, real, k, n, fused, slabs)
        metrics[f"{name}_fp8_{kernel}_best_tflops"] = sweep[best[kernel]]
        raw.update({f"{name}_{kernel}_sweep": {str(b): v for b, v in sweep.items()},
                    f"{name}_{kernel}_best_blocks": str(best[kernel])})
        if hasattr(best[kernel], "smem_ceiling"):
            raw[f"{name}_{kernel}_smem_ceiling"] = {str(b): b.smem_ceiling(fused) for b in sweep}
        if _ERROR.value:
            errors = gb.fp8_grouped_gemm_error(sizes, k, n, best[kernel], kernel=KERNELS[kernel].fn)
            metrics.update({f"{name}_fp8_{kernel}_rel_err_{what}": v for what, v in errors.items()})
            if not errors["kernel"] <= _TOL.value:
                failed.append(f"{name} {kernel} {best[kernel]}: relative error {errors['kernel']:.3g} > "
                              f"{_TOL.value}")
                continue
    if len(failed) > failed_before:
        return metrics, raw

    def case(kernel, b):
        return functools.partial(gb.fp8_split_case, padded, k, n, fused, b, counted_rows=real,
                                 kernel=KERNELS[kernel].fn, slab_counts=slabs)

    fastest = max(best, key=lambda kernel: metrics[f"{name}_fp8_{kernel}_best_tflops"])
    split = {f"fp8_split_{kernel}": case(kernel, best[kernel])() for kernel in _KERNELS.value}
    # the blocks a sweep would displace, in the same rounds: the sweep's one-off timings rank, the rounds decide
    replaced = {f"fp8_split_{kernel}_before": case(kernel, before[kernel])() for kernel in _KERNELS.value
                if before[kernel] != best[kernel]}
    cases = {"dense_fp8": gb.dense_gemm_case(real, k, cols, jnp.float8_e4m3fn), **split,
             f"fp8_split_{fastest}_with_row_quant": case(fastest, best[fastest])(quantize_rows=True), **replaced,
             "bf16_split": gb.split_gemm_case(padded, k, n, fused, kernel=_bf16_split, counted_rows=real,
                                              slab_counts=slabs)}
    if cublaslt_fp8.unavailable() is None and (block_scaled := _block_scaled_dense(name, real, k, cols, metrics,
                                                                                 failed)):
        cases["dense_fp8_block_scaled"] = block_scaled
    dense = gb.dense_gemm_case(real, k, cols)
    runs = {"rounds": gb.round_robin_over_dense(cases, dense, rounds=_ROUNDS.value)}
    if _SUSTAINED_ROUNDS.value:
        loaded = {c: cases[c] for c in ("dense_fp8", *split, "bf16_split")}
        runs["sustained"] = gb.round_robin_over_dense(loaded, dense, rounds=_SUSTAINED_ROUNDS.value,
                                                      measure=gb.clocks_under_load)
    for run, got in runs.items():
        for c, stats in got.items():
            metrics.update({f"{name}_{run}_{c}_{key}": v for key, v in stats.items()})
        # ratios within the run: each FP8 kernel over the FP8 ceiling and over the bf16 kernel it would replace
        for c in split:
            metrics[f"{name}_{run}_{c}_over_dense_fp8"] = got[c]["over_dense"] / got["dense_fp8"]["over_dense"]
            metrics[f"{name}_{run}_{c}_over_bf16_split"] = got[c]["over_dense"] / got["bf16_split"]["over_dense"]
            if "dense_fp8_block_scaled" in got:
                metrics[f"{name}_{run}_{c}_over_dense_fp8_block_scaled"] = (
                    got[c]["over_dense"] / got["dense_fp8_block_scaled"]["over_dense"])
    how = (f"experiments.bench_fp8_gemm {datetime.date.today()}, {_EXPERTS.value} groups, skew {_SKEW.value}, "
           f"groups aligned to {_ALIGN.value} rows")
    for kernel in _KERNELS.value if _TUNE.value and _SWEEP.value else ():
        c = f"fp8_split_{kernel}"
        kept = best[kernel] if gb.confirmed(f"{name}_{kernel}", runs["rounds"], c, metrics) else before[kernel]
        tuning.record(KERNELS[kernel].tuned_name, kind, k, n, fused, real, kept,
                      gb.recorded_tflops(runs["rounds"], c if kept == best[kernel] else f"{c}_before"), how)
    # the roofline at FP8: the rounds' dense FP8 rate, every operand one byte (the bf16 output aside)
    metrics[f"{name}_fp8_roofline_over_dense_fp8"] = gb.grouped_gemm_roofline(
        sizes, k, cols, n, runs["rounds"]["dense_fp8"]["tflops"] * 1e12, gb.hbm_gbps() * 1e9,
        tile_rows=_ALIGN.value, itemsize=1)
    return metrics, raw


def _block_scaled_dense(name: str, rows: int, k: int, n: int, metrics: dict, failed: list) -> tuple | None:
    """cuBLASLt's block-scaled dense GEMM over all the routed rows at once (cut to a multiple of
    `cublaslt_fp8.T_MULTIPLE`, as it takes them), as a case, once its error on the first rows is within --rel_tol;
    else None, the cause in `failed`."""
    rows -= rows % cublaslt_fp8.T_MULTIPLE
    x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32).astype(jnp.bfloat16)
    case, err, why = gb.cublaslt_case(*fp8.quantize_rows(x), gb.block_scaled_weight(k, n), 1024, _TOL.value)
    if err is not None:
        metrics[f"{name}_dense_fp8_block_scaled_rel_err"] = err
    if why:
        failed.append(f"{name} (the block-scaled dense reference): {why}")
    return case


def main(argv):
    del argv
    for kernel in _KERNELS.value:  # a misspelt option fails before any device work
        swept(KERNELS[kernel].candidates[True], _WITH_OPTION.value)
    if jax.devices()[0].platform != "gpu":
        print("bench_fp8_gemm: needs a GPU", file=sys.stderr)
        sys.exit(2)
    sizes = gb.skewed_group_sizes(_ROWS.value, _EXPERTS.value, _SKEW.value)
    metrics = {"group_max_over_mean": float(sizes.max() / sizes.mean()),  # the kernels compute the padding too
               "computed_rows_over_real": int(_padded(sizes).sum()) / int(sizes.sum())}
    raw, failed = {}, []
    config = {"rows": _ROWS.value, "experts": _EXPERTS.value, "slabs": _SLABS.value, "skew": _SKEW.value,
              "align": _ALIGN.value,
              "kernels": list(_KERNELS.value), "sweep": _SWEEP.value, "with_option": list(_WITH_OPTION.value),
              "error": _ERROR.value, "rel_tol": _TOL.value, "failed": failed,
              "rounds": _ROUNDS.value, "sustained_rounds": _SUSTAINED_ROUNDS.value,
              "tuned_into": str(tuning.cache_path()) if _TUNE.value else "", "problems_done": []}
    # rewritten after each problem: a run cut short keeps the problems it finished
    save = functools.partial(results.write_measurements, "bench_fp8_gemm", config=config, raw=raw, metrics=metrics,
                             root=_RESULTS.value, run=results.run_stamp())
    for name, k, n, fused in (p for p in PROBLEMS if p[0] in _PROBLEMS.value):
        got, got_raw = _problem(name, sizes, k, n, fused, failed)
        metrics.update(got)
        raw.update(got_raw)
        config["problems_done"].append(name)
        save(echo=False)
    print(f"{'':18} {'TFLOP/s':>8} {'/ dense FP8':>11} {'/ block-scaled':>14} {'/ bf16 kernel':>13} "
          f"{'roofline':>9}")
    for name, *_ in (p for p in PROBLEMS if p[0] in _PROBLEMS.value):
        for kernel in _KERNELS.value:
            c = f"{name}_rounds_fp8_split_{kernel}"
            if c + "_tflops" not in metrics:  # failed its error check: no rate
                continue
            print(f"{name + ' ' + kernel:18} {metrics[c + '_tflops']:8.1f} {metrics[c + '_over_dense_fp8']:11.3f} "
                  f"{metrics.get(c + '_over_dense_fp8_block_scaled', float('nan')):14.3f} "
                  f"{metrics[c + '_over_bf16_split']:13.3f} {metrics[f'{name}_fp8_roofline_over_dense_fp8']:9.3f}")
    print(f"rates over the {int(sizes.sum())} real rows; the grouped kernels compute "
          f"{metrics['computed_rows_over_real']:.3f}x as many (groups padded to {_ALIGN.value})")
    save()
    if failed:
        print("FAILED:", *failed, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
