"""GPU kernel and copy measurements, side by side in one run (issue 6 acceptance ratios + simulator calibration).

  python -m experiments.gpu_calibration            # on a GPU machine; writes results/gpu_calibration/<run>.json
"""

import sys

import jax
import numpy as np
from absl import app, flags

from dwdp_jax.measure import gpu_bench as gb
from dwdp_jax.kernels import gpu
from dwdp_jax.results import write_measurements

_QUICK = flags.DEFINE_bool("quick", False, "smaller shapes (a smoke run)")
_RESULTS = flags.DEFINE_string("results", "results", "results root")
_SUSTAIN = flags.DEFINE_float("sustain_s", 2.0, "each compute rate is timed after this many seconds of the same "
                              "kernel, at the clocks serving runs at (0: a burst from idle)",
                              lower_bound=0.0)


def main(argv):
    del argv
    devices = jax.devices()
    if devices[0].platform != "gpu":
        print("gpu_calibration: needs GPUs, found " + devices[0].platform, file=sys.stderr)
        sys.exit(2)
    rows = 16384 if _QUICK.value else 131072
    m = {}
    raw = {"sm_clock_mhz": {}}
    timing = {"sustain_s": _SUSTAIN.value}

    def clock(name):  # the SM clock right after a sustained measurement: the evidence of the power state
        raw["sm_clock_mhz"][name] = gb.sm_clock_mhz()

    m["gemm_tflops"] = gb.dense_gemm_tflops(rows, 7168, 4096, **timing)
    clock("gemm")
    m["gemm_down_tflops"] = gb.dense_gemm_tflops(rows, 2048, 7168, **timing)
    m["hbm_gbps"] = gb.hbm_gbps()
    sizes = gb.skewed_group_sizes(rows, 256, 6.0)
    raw["group_sizes_max_over_mean"] = float(sizes.max() / sizes.mean())
    # The project's MoE kernels (split-weight Pallas, the faster tuned kernel of each projection, as the model's
    # default backend runs them): fused gate/up (the FLOPs of K=7168, N=4096) and down.
    problems = (("gate_up", 7168, 2048, True), ("down", 2048, 7168, False))
    raw["grouped_gemm_kernels"] = {name: gpu.fastest_split_kernel(k, n, fused, rows) for name, k, n, fused in problems}
    kernel = {name: gpu.SPLIT_KERNELS[choice] for name, choice in raw["grouped_gemm_kernels"].items()}
    m["grouped_gemm_tflops"] = gb.split_gemm_tflops(sizes, 7168, 2048, fused=True, kernel=kernel["gate_up"], **timing)
    clock("grouped_gemm")
    m["grouped_gemm_down_tflops"] = gb.split_gemm_tflops(sizes, 2048, 7168, fused=False, kernel=kernel["down"],
                                                         **timing)
    m["grouped_gemm_over_dense"] = m["grouped_gemm_tflops"] / m["gemm_tflops"]
    m["grouped_gemm_down_over_dense"] = m["grouped_gemm_down_tflops"] / m["gemm_down_tflops"]
    skewed = gb.skewed_group_sizes(4096, 16, 6.0)
    with_empty = skewed * (np.arange(16) % 2 == 0)  # every other expert gets no rows
    m["grouped_gemm_rel_err"] = max(gb.grouped_gemm_error(s, 512, 256) for s in (
        skewed, gb.skewed_group_sizes(4096, 16, 1.0), with_empty))
    try:
        m["fp8_gemm_tflops"] = gb.dense_gemm_tflops(rows, 7168, 4096, jax.numpy.float8_e4m3fn, **timing)
    except Exception as e:  # recorded, not fatal: FP8 dot support differs across XLA versions
        raw["fp8_error"] = repr(e)[:300]
    t = 4096 if _QUICK.value else 8192
    # FLOPs counted at MLA's real sizes (q/k 192, v 128) for both, so the padded-V path pays for its padding.
    m["attention_tflops"] = gb.attention_tflops("cudnn", t, 128, 192, 128, **timing)
    clock("attention")
    m["attention_mla_native_tflops"] = gb.attention_tflops("cudnn_mla_1seq", t, 128, 192, 128, **timing)
    m["attention_192_tflops"] = gb.attention_tflops("cudnn_mla_1seq", t, 128, 192, 192, **timing)
    m["attention_mla_over_192"] = m["attention_mla_native_tflops"] / m["attention_192_tflops"]
    m["attention_padded_v_over_192"] = m["attention_tflops"] / m["attention_192_tflops"]
    # the same ratios per sequence (8K causal tokens per second): 192/128 does 320/384 of 192/192's FLOPs
    for name in ("mla", "padded_v"):
        m[f"attention_{name}_sequences_over_192"] = m[f"attention_{name}_over_192"] * (192 + 192) / (192 + 128)
    if len(devices) > 1:
        m["p2p_gbps"] = gb.p2p_gbps(devices[1], [devices[0]])
        peers = devices[1:4]
        m["p2p_fanin_gbps"] = gb.p2p_gbps(devices[0], peers, fan_in=True)
        m["p2p_fanout_gbps"] = gb.p2p_gbps(devices[0], peers)
        layer_bytes = 3 * 64 * 3 * 7168 * 2048 * 2  # an R1 layer's remote experts for DWDP4, bf16
        pull_bytes = layer_bytes // (8 if _QUICK.value else 1)
        raw["pull_overlap"] = gb.pull_overlap(devices[0], peers, pull_bytes)
        m["layer_pull_gbps"] = raw["pull_overlap"]["pull_gbps"]
        m["layer_pull_over_fanin_ceiling"] = m["layer_pull_gbps"] / m["p2p_fanin_gbps"]
        # 1.0: the compute and the pull took no longer together than the longer of them alone (the pull, at this
        # size); the compute's own slowdown under a pull is bench_copy_engine's measurement
        overlap = raw["pull_overlap"]
        m["pull_with_compute_over_longer_alone"] = overlap["both_s"] / max(overlap["compute_s"], overlap["pull_s"])
        m["all2all_gbps"] = gb.all2all_gbps(devices[:4])
    m["memory_gb"] = devices[0].memory_stats().get("bytes_limit", 0) / 1e9
    config = {"quick": _QUICK.value, "rows": rows, "gemm_backend": "pallas_split", "attention_impl": "cudnn",
              "sustain_s": _SUSTAIN.value}
    write_measurements("gpu_calibration", config=config, raw=raw, metrics=m, root=_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
