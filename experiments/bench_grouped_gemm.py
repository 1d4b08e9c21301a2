"""Grouped GEMM on one GPU, side by side: the split-weight Pallas kernel (block-size sweep), the same schedule
on Mosaic GPU, jax's Mosaic GPU ragged_dot, and the dense GEMM of the same FLOPs (issue 6: >= 75% of dense at 256
experts, 131072 rows, skewed). Beside them, in the same rounds: cuBLAS run group by group (a MoE built from dense
calls) and the roofline of the groups (`gpu_bench.grouped_gemm_roofline`).

  python -m experiments.bench_grouped_gemm                 # on a GPU; writes results/bench_grouped_gemm/<run>.json
  python -m experiments.bench_grouped_gemm --tune --rows=262144   # also records each kernel's fastest blocks for
                                                                  # this shape and card (dwdp_jax.kernels.tuning)
  python -m experiments.bench_grouped_gemm --tune --rows=262144 --routing=uniform   # tuned for serving's rows
  python -m experiments.bench_grouped_gemm --problem=down     # one projection only (gate_up, down; default both)
  python -m experiments.bench_grouped_gemm --tune --align=128  # swept and tuned over the model's tile-aligned groups
"""

import dataclasses
import datetime
import functools
import sys

import jax
from absl import app, flags

from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.measure.kernel_sweeps import CANDIDATES, MGPU_CANDIDATES
from dwdp_jax.kernels import tuning
from dwdp_jax.kernels.split_gemm import DEFAULT_BLOCKS, FUSED_BLOCKS, Blocks
from dwdp_jax.kernels.split_gemm_mgpu import (CHAINED_R1, DEFAULT_MGPU_BLOCKS, MgpuBlocks,
                                              split_ragged_dot_mgpu)
from dwdp_jax.results import write_measurements

_ROWS = flags.DEFINE_integer("rows", 131072, "routed rows (tokens x top-k)")
_EXPERTS = flags.DEFINE_integer("experts", 256, "groups")
_SKEW = flags.DEFINE_float("skew", 6.0, "max/mean group size (--routing=skewed)")
_ROUTING = flags.DEFINE_enum("routing", "skewed", ["skewed", "uniform"], "group sizes: skewed (issue 6's shape, many "
                             "tiny groups) or uniform random routing (a DWDP rank's rows in serving)")
_SWEEP = flags.DEFINE_bool("sweep", True, "time every candidate block configuration (--nosweep: the cached "
                            "winners for this card and shape, else the defaults)")
_ALIGN = flags.DEFINE_integer("align", 1, "the sweep's groups padded to a multiple of this many rows (128: the "
                              "model's tile-aligned layout, where every tile is full; FLOPs counted over the real "
                              "rows), so --tune records the blocks serving runs best", lower_bound=1)
_SUSTAINED_ROUNDS = flags.DEFINE_integer(
    "sustained_rounds", 3, "rounds of the dense GEMM and the aligned winners each run for 3 s with the SM clock and "
    "power sampled (`gpu_bench.clocks_under_load`); 0 skips them", lower_bound=0)
_PROBLEMS = flags.DEFINE_multi_enum("problem", ["gate_up", "down"], ["gate_up", "down"], "the projections to time")
_RESULTS = flags.DEFINE_string("results", "results", "results root")
_TUNE = flags.DEFINE_bool("tune", False, "record each kernel's fastest swept blocks in the kernel block cache, which "
                          "the kernels then use at this K, N and about this many rows on this card")

# name, K, N per weight, fused (gate+up: two [K, N] weights, the FLOPs of a K x 2N GEMM)
PROBLEMS = [("gate_up", 7168, 2048, True), ("down", 2048, 7168, False)]


def _padded(sizes, rows: int):
    """Group sizes rounded up to a multiple of `rows` (each group starts on a tile; padding rows are computed)."""
    return -(-sizes // rows) * rows


def _round_robin(name, sizes, k, n, fused, best: Blocks, best_mgpu: MgpuBlocks, hbm_gbps: float) -> dict[str, float]:
    """Each winner over the dense GEMM timed in rounds with it (`gpu_bench.round_robin_over_dense`), on the skewed
    rows and on the same rows with every group padded to a whole number of tiles (DeepGEMM's contiguous layout:
    no tile is shared by two groups; the padding rows are computed, only the real rows' FLOPs are counted). With
    half tiles a group padded to half a tile ends on a half-tile boundary, so no half is computed twice either."""
    real, cols = int(sizes.sum()), 2 * n if fused else n
    padded = functools.partial(_padded, sizes)
    half = dataclasses.replace(best, half_tiles=True)
    cases = {"split": gb.split_gemm_case(sizes, k, n, fused, best),
             "split_aligned": gb.split_gemm_case(padded(best.block_m), k, n, fused, best, counted_rows=real),
             "split_aligned_half": gb.split_gemm_case(padded(best.block_m // 2), k, n, fused, half, counted_rows=real),
             "split_mgpu": gb.split_gemm_case(sizes, k, n, fused, best_mgpu, kernel=split_ragged_dot_mgpu),
             "split_mgpu_aligned": gb.split_gemm_case(padded(best_mgpu.tile_m), k, n, fused, best_mgpu,
                                                      kernel=split_ragged_dot_mgpu, counted_rows=real),
             "cublas_per_group": gb.per_group_dense_case(sizes, k, cols)}
    dense = gb.dense_gemm_case(real, k, cols)
    got = gb.round_robin_over_dense(cases, dense)
    metrics = {f"{name}_rounds_{case}_{key}": value for case, stats in got.items() for key, value in stats.items()}
    for case, stats in got.items():
        print(name, case, "rounds:", {key: round(value, 3) for key, value in stats.items()}, flush=True)
    # the same under sustained load, where the card's power cap sets every case's clock (serving's condition; the
    # rounds above start each case from the idle gap of the clock reading before it)
    if _SUSTAINED_ROUNDS.value:
        aligned = {case: cases[case] for case in ("split_aligned_half", "split_mgpu_aligned")}
        sustained = gb.round_robin_over_dense(aligned, dense, rounds=_SUSTAINED_ROUNDS.value,
                                              measure=gb.clocks_under_load)
        for case, stats in sustained.items():
            metrics.update({f"{name}_sustained_{case}_{key}": value for key, value in stats.items()})
            print(name, case, "sustained:", {key: round(value, 3) for key, value in stats.items()}, flush=True)
    # the roofline beside them: the rounds' dense rate and this card's HBM bandwidth, per tile padding
    for tile in (1, best.block_m // 2, best.block_m):
        bound = gb.grouped_gemm_roofline(sizes, k, cols, n, got["dense"]["tflops"] * 1e12, hbm_gbps * 1e9,
                                         tile_rows=tile)
        metrics[f"{name}_roofline_over_dense_rows{tile}"] = bound
        print(name, f"roofline, groups alone and padded to {tile} rows: {bound:.3f} of dense", flush=True)
    return metrics


def main(argv):
    del argv
    if _TUNE.value and not _SWEEP.value:
        print("bench_grouped_gemm: --tune records the fastest swept blocks; it needs --sweep", file=sys.stderr)
        sys.exit(2)
    if jax.devices()[0].platform != "gpu":
        print("bench_grouped_gemm: needs a GPU", file=sys.stderr)
        sys.exit(2)
    sizes = (gb.skewed_group_sizes(_ROWS.value, _EXPERTS.value, _SKEW.value) if _ROUTING.value == "skewed"
             else gb.uniform_group_sizes(_ROWS.value, _EXPERTS.value))
    metrics, raw = {"group_max_over_mean": float(sizes.max() / sizes.mean()), "hbm_gbps": gb.hbm_gbps()}, {}
    for name, k, n, fused in (p for p in PROBLEMS if p[0] in _PROBLEMS.value):
        # the dense GEMM before and after the sweep: its rate drifts between runs on one card (717-764 TFLOP/s)
        dense_before = gb.dense_gemm_tflops(_ROWS.value, k, 2 * n if fused else n)
        # without the sweep: the cached winners for this card and shape (the kernels' own choice), else the defaults
        kind = jax.devices()[0].device_kind
        tuned = tuning.lookup("split_triton", Blocks, kind, k, n, fused, _ROWS.value)
        tuned_mgpu = tuning.lookup("split_mgpu", MgpuBlocks, kind, k, n, fused, _ROWS.value)
        configs = CANDIDATES[fused] if _SWEEP.value else [tuned or (FUSED_BLOCKS if fused else DEFAULT_BLOCKS)]
        mgpu_configs = MGPU_CANDIDATES[fused] if _SWEEP.value else [tuned_mgpu] if tuned_mgpu else \
            MGPU_CANDIDATES[fused][:5]
        sweep, mgpu_sweep = {}, {}
        real, swept = int(sizes.sum()), _padded(sizes, _ALIGN.value)
        for table, kernel, candidates in ((sweep, None, configs), (mgpu_sweep, split_ragged_dot_mgpu, mgpu_configs)):
            for b in candidates:
                try:
                    table[b] = gb.split_gemm_tflops(swept, k, n, fused, b, kernel=kernel, counted_rows=real)
                except Exception as e:  # a configuration that cannot compile (shared memory, registers) is skipped
                    table[b] = repr(e)[:200]
                print(name, b, table[b], flush=True)
        dense_after = gb.dense_gemm_tflops(_ROWS.value, k, 2 * n if fused else n)
        dense = (dense_before + dense_after) / 2
        metrics[f"{name}_dense_spread"] = abs(dense_after - dense_before) / dense
        timed = {b: v for b, v in sweep.items() if isinstance(v, float)}
        best_blocks = max(timed, key=timed.get)
        third = _EXPERTS.value // 4
        # the winning order's output against fp32 (unfused at the problem's K and N; the kernel's epilogue aside,
        # launch order and tiles are what the sweep changes)
        metrics[f"{name}_split_rel_err"] = gb.grouped_gemm_error(sizes, k, n, best_blocks)
        split3 = gb.split_gemm_tflops(sizes, k, n, fused, best_blocks,
                                      slab_counts=(third, third, _EXPERTS.value - 2 * third))
        mgpu = gb.grouped_gemm_tflops(sizes, k, 2 * n if fused else n)
        # the same schedule on Mosaic GPU (TMA, warp-specialized wgmma), its best configuration and that one's error
        mgpu_timed = {b: v for b, v in mgpu_sweep.items() if isinstance(v, float)}
        best_mgpu = max(mgpu_timed, key=mgpu_timed.get)
        split_mgpu = mgpu_timed[best_mgpu]
        # the error check is unfused: down's winner itself, or the down kernel's variant of gate/up's pipeline
        unfused = best_mgpu if not fused else dataclasses.replace(
            CHAINED_R1[False] if best_mgpu.chain else DEFAULT_MGPU_BLOCKS, delay_release=best_mgpu.delay_release,
            swizzled_store=best_mgpu.swizzled_store, cluster_n=best_mgpu.cluster_n)
        metrics[f"{name}_split_mgpu_rel_err"] = gb.grouped_gemm_error(sizes, k, n, unfused,
                                                                     kernel=split_ragged_dot_mgpu)
        metrics.update(_round_robin(name, sizes, k, n, fused, best_blocks, best_mgpu, metrics["hbm_gbps"]))
        raw[f"{name}_mgpu_sweep"] = {str(dataclasses.astuple(b)): v for b, v in mgpu_sweep.items()}
        raw[f"{name}_mgpu_best_blocks"] = dataclasses.astuple(best_mgpu)
        metrics.update({f"{name}_dense_tflops": dense, f"{name}_split_tflops": timed[best_blocks],
                        f"{name}_split_3slabs_tflops": split3, f"{name}_mgpu_tflops": mgpu,
                        f"{name}_split_mgpu_tflops": split_mgpu, f"{name}_split_mgpu_over_dense": split_mgpu / dense,
                        f"{name}_split_over_dense": timed[best_blocks] / dense,
                        f"{name}_mgpu_over_dense": mgpu / dense})
        raw[f"{name}_sweep"] = {str(dataclasses.astuple(b)): v for b, v in sweep.items()}
        raw[f"{name}_best_blocks"] = dataclasses.astuple(best_blocks)
        if _TUNE.value:
            shape = f"skew {_SKEW.value}" if _ROUTING.value == "skewed" else "uniform routing"
            shape += f", groups aligned to {_ALIGN.value} rows" if _ALIGN.value > 1 else ""
            how = f"experiments.bench_grouped_gemm {datetime.date.today()}, {_EXPERTS.value} groups, {shape}"
            tuning.record("split_triton", kind, k, n, fused, real, best_blocks, timed[best_blocks], how)
            tuning.record("split_mgpu", kind, k, n, fused, real, best_mgpu, split_mgpu, how)
    config = {"rows": _ROWS.value, "experts": _EXPERTS.value, "routing": _ROUTING.value, "skew": _SKEW.value,
              "align": _ALIGN.value,
              "tuned_into": str(tuning.cache_path()) if _TUNE.value else ""}
    write_measurements("bench_grouped_gemm", config=config, raw=raw, metrics=metrics, root=_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
