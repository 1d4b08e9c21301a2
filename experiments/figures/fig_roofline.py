"""Roofline crossover (blog Table 1) and the calibration check, from the simulator's results files.

Reads results/roofline/*.json (python -m experiments.roofline): per run, roofline_<run>.png/pdf with T_compute /
T_prefetch and T_DEP / T_DWDP against ISL for every batch size, the blog's four published ratios marked at batch 1,
and roofline_<run>.md (the batch-1 table with the published values and the constants used). Reads
results/sim_calibration/*.json (python -m experiments.simulate --study=calibration): calibration_<run>.png/pdf, the
measured and predicted DWDP/DEP TPS/GPU ratio of every benchmark run side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.figures.common import cli, load, plt, save

TITLE = "blog Table 1, roofline (results/roofline); calibration, measured vs simulated (results/sim_calibration)"
ROOFLINE_CAPTION = ("Crosses: the four ratios of the TensorRT-LLM blog's Table 1 (DeepSeek-R1 context, GB200, DWDP4 vs "
                    "DEP4, batch 1, perfectly balanced). Curves: this roofline per batch size. The blog states no peak "
                    "rates or bandwidths: the constants in the title are this project's GB200 spec.")
CALIBRATION_CAPTION = ("The paper has no such check: it predicts this project's own measured 4-GPU DWDP/DEP ratios "
                       "with the simulator on the spec calibrated from the GPU kernel and copy measurements "
                       "(results/gpu_calibration). Runs measured with other kernels than the calibration's are left "
                       "out; the projections to other depths and workloads are in the results file. Labels: "
                       "predicted / measured - 1 (red: outside the tolerance).")


def _by_batch(points: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in sorted(points, key=lambda p: (p["batch"], p["isl"])):
        out.setdefault(p["batch"], []).append(p)
    return out


def _constants(doc: dict) -> str:
    hw, prec = doc["config"]["hardware"], doc["config"]["precision"]
    peaks = ", ".join(f"{k.split('_')[0]} {v / 1e15:.2f}" for k, v in hw.items()
                      if k.endswith("flops_per_s") and k[:3] in ("bf1", "fp8", "fp4") and v)
    return (f"{hw['name']}: dense PFLOP/s {peaks}; HBM {hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s; NVLink "
            f"{hw['nvlink_bytes_per_s'] / 1e9:.0f} GB/s per direction; copy {hw['copy_bytes_per_s'] / 1e9:.0f} GB/s. "
            f"Precision: experts {prec['moe']}, dense {prec['dense']}, attention {prec['attention']}; "
            f"DWDP{doc['config']['group_size']} vs DEP{doc['config']['group_size']}")


def _roofline_figure(doc: dict) -> "plt.Figure":
    fig, (ax_ratio, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.4))
    for batch, rows in _by_batch(doc["raw"]["points"]).items():
        isl = [r["isl"] for r in rows]
        ax_ratio.plot(isl, [r["compute_over_prefetch"] for r in rows], marker="o", label=f"batch {batch}")
        ax_speed.plot(isl, [r["dep_over_dwdp"] for r in rows], marker="o", label=f"batch {batch}")
    published = doc["metrics"]["published"]
    for ax, key in ((ax_ratio, "compute_over_prefetch_published"), (ax_speed, "dep_over_dwdp_published")):
        ax.scatter([r["isl"] for r in published], [r[key] for r in published], marker="x", s=70, color="black",
                   zorder=5, label="blog Table 1 (batch 1)")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ISL (tokens per sequence)")
        ax.legend(fontsize=8)
    ax_ratio.set_yscale("log")
    ax_ratio.set_ylabel("T_compute / T_prefetch  (>1: prefetch hidden)")
    ax_speed.set_ylabel("T_DEP / T_DWDP  (per MoE layer)")
    fig.suptitle(_constants(doc), fontsize=7)
    return fig


def _markdown(doc: dict) -> str:
    rows = [p for p in doc["raw"]["points"] if p["batch"] == 1]
    published = {r["isl"]: r for r in doc["metrics"]["published"]}
    lines = [f"# Roofline, {doc['run']}", "", _constants(doc), "",
             "| ISL | T_compute ms | T_prefetch ms | T_all2all ms | compute/prefetch | published | DEP/DWDP "
             "| published |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["isl"]):
        pub = published.get(r["isl"], {})
        lines.append(f"| {r['isl']} | {1e3 * r['t_compute_s']:.3f} | {1e3 * r['t_prefetch_s']:.3f} | "
                     f"{1e3 * r['t_all2all_s']:.3f} | {r['compute_over_prefetch']:.2f} | "
                     f"{pub.get('compute_over_prefetch_published', '')} | {r['dep_over_dwdp']:.2f} | "
                     f"{pub.get('dep_over_dwdp_published', '')} |")
    crossings = ", ".join(f"batch {b}: {v['crossover_isl']:.0f}" if v["crossover_isl"] else f"batch {b}: none"
                          for b, v in doc["metrics"]["per_batch"].items())
    return "\n".join(lines + ["", f"Crossover ISL (compute/prefetch = 1): {crossings}", ""])


def _calibration_figure(doc: dict) -> "plt.Figure":
    """One row per measured run (names are long: they read along the y axis), measured and predicted side by side."""
    runs = doc["metrics"]["runs"]
    y = np.arange(len(runs))[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(runs) + 1.6))
    ax.barh(y + 0.2, [r["measured_ratio"] for r in runs], 0.4, label="measured (GPU run)", color="tab:blue")
    ax.barh(y - 0.2, [r["predicted_ratio"] for r in runs], 0.4, label="predicted (calibrated simulator)",
            color="tab:orange")
    for yi, r in zip(y, runs):
        ax.text(max(r["measured_ratio"], r["predicted_ratio"]) + 0.01, yi, f"{r['rel_error']:+.1%}", va="center",
                fontsize=8, color="black" if r["within_tolerance"] else "tab:red")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(y, [str(r["run"]) for r in runs], fontsize=8)
    ax.set_xlabel("DWDP / DEP TPS/GPU (right of the dashed line: DWDP faster)")
    ax.set_xlim(0, 1.15 * max([r["measured_ratio"] for r in runs] + [r["predicted_ratio"] for r in runs]))
    fig.suptitle(f"{doc['config']['hardware']['name']}: prediction error per run (tolerance "
                 f"{doc['config']['tolerance']:.0%})", fontsize=9)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    return fig


def main(results_root: str | Path | None = None, figures_root: str | Path | None = None) -> list[Path]:
    """Roofline figures and tables, and calibration figures; [] (with a warning) when there are no results."""
    written = []
    for doc in load("roofline", results_root):
        written += save(_roofline_figure(doc), f"roofline_{doc['run']}", figures_root, markdown=_markdown(doc),
                        caption=ROOFLINE_CAPTION)
    for doc in load("sim_calibration", results_root):
        written += save(_calibration_figure(doc), f"calibration_{doc['run']}", figures_root,
                        caption=CALIBRATION_CAPTION)
    return written


if __name__ == "__main__":
    cli(main)
