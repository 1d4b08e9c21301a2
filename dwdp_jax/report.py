"""What a run's results can claim and the short end-of-run table: DWDP over DEP with its band over the passes, the
timing context (a CPU run is a functional check), and `format_table`."""

from __future__ import annotations

import os
from typing import Any

from dwdp_jax.serving import metrics


def tps_band(summary: dict) -> list[float]:
    """[min, max] TPS/GPU over the passes (a summary made elsewhere, without passes: zero width)."""
    return summary.get("tps_per_gpu_band", [summary["tps_per_gpu"]] * 2)


def ratios(dwdp: dict, dep: dict) -> dict[str, Any]:
    """DWDP over DEP; the TPS/GPU ratio's band pairs the passes' extremes."""
    (dwdp_lo, dwdp_hi), (dep_lo, dep_hi) = tps_band(dwdp), tps_band(dep)
    return {"tps_per_gpu_dwdp_over_dep": dwdp["tps_per_gpu"] / dep["tps_per_gpu"],
            "tps_per_gpu_dwdp_over_dep_band": [dwdp_lo / dep_hi, dwdp_hi / dep_lo],
            "ttft_p50_dep_over_dwdp": dep["ttft_p50_s"] / dwdp["ttft_p50_s"]}


def timing_context(devices: list, repeats: int) -> dict[str, Any]:
    """What the run's timings can claim. Virtual CPU devices share the host's cores, so there they show that each
    strategy serves the workload, not how fast: a functional check, which makes no speed claim."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    platform = devices[0].platform
    return {"functional_check": platform == "cpu", "platform": platform, "devices": len(devices),
            "host_cores": cores, "passes": repeats}


def timing_header(timing: dict[str, Any]) -> list[str]:
    """What the timings below can claim (`timing_context`), and where their noise band comes from."""
    if not timing:
        return []
    passes = (f"TPS/GPU: the median of {timing['passes']} passes, [min, max] beside it" if timing["passes"] > 1
              else "one pass per strategy: no noise band (config.repeats > 1 measures one)")
    if timing["functional_check"]:
        return [f"FUNCTIONAL CHECK, no speed claim: {timing['devices']} virtual CPU devices share "
                f"{timing['host_cores']} host cores, so the timings below show that each strategy serves the "
                f"workload, not how fast it would on GPUs; {passes}"]
    return [f"{timing['devices']} {timing['platform'].upper()} devices; {passes}"]


def _band(band: list[float], digits: int, passes: int) -> str:
    return f"[{band[0]:.{digits}f}, {band[1]:.{digits}f}]" if passes > 1 else "(1 pass)"


def _ratio_text(r: dict[str, Any], functional: bool, passes: int) -> str:
    band = r.get("tps_per_gpu_dwdp_over_dep_band", [r["tps_per_gpu_dwdp_over_dep"]] * 2)
    tps = f"DWDP/DEP TPS/GPU {r['tps_per_gpu_dwdp_over_dep']:.3f} {_band(band, 3, passes)}"
    if functional:
        return f"{tps}, TTFT p50 DEP/DWDP {r['ttft_p50_dep_over_dwdp']:.3f} (functional-check timings)"
    return f"{tps}, TTFT p50 speedup {r['ttft_p50_dep_over_dwdp']:.3f}"


def sync_text(dep: dict[str, Any]) -> str:
    """DEP's synchronization overhead with its band; one that cannot be told from zero reads "within noise" (a
    negative estimate is noise: waiting never saves time)."""
    value, (lo, hi), steps = dep["sync_overhead"], dep["sync_overhead_band"], f"{dep['sampled_steps']} sampled steps"
    if metrics.within_noise([lo, hi]):
        text = f"within noise (band [0.0%, {100 * max(hi, 0.0):.1f}%] over {steps})"
    elif lo == hi:
        text = f"{100 * value:.1f}% (one sampled step: no noise band)"
    else:
        text = f"{100 * value:.1f}% (band [{100 * lo:.1f}%, {100 * hi:.1f}%] over {steps})"
    return f"DEP synchronization overhead {text}; mean rank-token CV {100 * dep['rank_cv_mean']:.1f}%"


def format_table(doc: dict[str, Any]) -> str:
    """The short end-of-run table: what its timings can claim, per strategy TPS/GPU with its band over the passes,
    TTFT p50/p90, iteration p50, and the DWDP/DEP ratios."""
    m = doc["metrics"]
    timing = doc.get("timing", {})
    functional, passes = timing.get("functional_check", False), timing.get("passes", 1)
    rows = timing_header(timing)
    rows.append(f"{'strategy':<10}{'TPS/GPU':>10}{'[min, max]':>18}{'TTFT p50 s':>12}{'TTFT p90 s':>12}"
                f"{'iter p50 s':>12}{'verified':>10}")
    strategies = [name for name in m if name != "ratio"]
    for name in strategies:
        s = m[name]
        ok = doc["verification"].get(name, {}).get("passed", "-")
        rows.append(f"{name:<10}{s['tps_per_gpu']:>10.1f}{_band(tps_band(s), 1, passes):>18}"
                    f"{s['ttft_p50_s']:>12.4f}{s['ttft_p90_s']:>12.4f}{s['iteration_p50_s']:>12.4f}{str(ok):>10}")
    if "ratio" in m:
        rows.append(_ratio_text(m["ratio"], functional, passes))
    for v, r in m.get("ratio", {}).get("variants", {}).items():
        rows.append(f"variant {v}: DWDP {m['dwdp']['variants'][v]['tps_per_gpu']:.1f}, DEP "
                    f"{m['dep']['variants'][v]['tps_per_gpu']:.1f} TPS/GPU, {_ratio_text(r, functional, passes)}")
    if doc.get("phase_s"):
        rows.append("wall s per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["phase_s"].items()))
    repeats = {name: m[name]["repeats_tps_per_gpu"] for name in strategies
               if len(m[name].get("repeats_tps_per_gpu", ())) > 1}
    if repeats:
        rows.append("repeats TPS/GPU " + "; ".join(f"{name} " + " ".join(f"{x:.1f}" for x in tps)
                                                   for name, tps in repeats.items()) + " (the median pass above)")
    if "dep" in m and "sync_overhead" in m["dep"]:
        rows.append(sync_text(m["dep"]))
    comm = doc.get("breakdown", {}).get("dep", {}).get("communication", {})
    if "gbps_per_rank" in comm:
        where = ": copies between virtual CPU devices in host memory, not a link's speed" if functional else ""
        rows.append(f"DEP all-to-all (dispatch + combine, first step profiled) {comm['gbps_per_rank']:.1f} GB/s "
                    f"per rank{where}")
    if "pull_gbps_median" in m.get("dwdp", {}):
        rows.append(f"DWDP pulls {m['dwdp']['pull_gbps_median']:.1f} GB/s, exposed wait "
                    f"{100 * m['dwdp']['exposed_wait_fraction_mean']:.2f}% of the step")
    for name in strategies:
        trace = m[name].get("trace", {})
        if "error" in trace:
            rows.append(f"{name} traced pass failed: {trace['error']}")
        elif trace:
            rows.append(f"{name} traced pass, ms per iteration: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(trace["per_iteration_ms"].items(), key=lambda kv: -kv[1])))
    if doc.get("routing_skew"):
        skew = doc["routing_skew"]
        rows.append(f"routing skew, max/mean expert load per MoE layer over {skew['tokens']} verification tokens: "
                    + " ".join(f"{x:.2f}" for x in skew["max_over_mean"])
                    + f" (uniform routing: {skew['uniform_max_over_mean']:.2f})")
    per_layer = {name: v["expert_id_match_per_layer"] for name, v in doc["verification"].items()
                 if "expert_id_match_per_layer" in v}
    if doc.get("reference_noise"):
        noise = doc["reference_noise"]
        rows.append(f"reference with its embeddings one last bit off: rel err {noise['rel_err']:.2e}, expert sets "
                    f"{100 * noise['expert_id_match']:.1f}% identical (the floor: a strategy within it passes)")
        per_layer["floor"] = noise["expert_id_match_per_layer"]
    if per_layer:
        rows.append("expert sets identical per MoE layer: " + "; ".join(
            f"{name} " + " ".join(f"{100 * x:.1f}%" for x in xs) for name, xs in per_layer.items()))
    rows.append(f"HLO collectives: {doc['hlo_collectives']}")
    rows.append(f"results: {doc['path']}")
    return "\n".join(rows)
