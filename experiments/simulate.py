"""Roofline and simulator studies at NVL72 scale (issue 7): one study per run, one results file per study.

  python -m experiments.simulate --study=contention                 # paper Table 2, model vs simulated pulls
  python -m experiments.simulate --study=sync_cv                    # DEP sync overhead vs CV (paper Fig. 1)
  python -m experiments.simulate --study=roofline --hardware=gb200  # blog Table 1 (= python -m experiments.roofline)
  python -m experiments.simulate --study=pareto                     # e2e TPS/GPU vs TPS/user (Tables 5-6)
  python -m experiments.simulate --study=planner --ttft_targets=1,2,4
  python -m experiments.simulate --study=calibration                # needs results/gpu_calibration + context_bench
  python -m experiments.simulate --study=grid --group_size=8        # Table 4's grid at N GPUs, calibrated (issue 9)

Writes results/<experiment>/<run>.json (experiments roofline, sim_contention, sim_sync_cv, sim_pareto, sim_planner,
sim_calibration) and prints a short table. Invalid input exits with code 2 and a message naming the field, before any
simulation runs. Another command runs a study exactly as this main does with `produce(study, options())` (the figures
command runs the missing ones this way).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from absl import app, flags
from tqdm import tqdm

from dwdp_jax.results import write_results
from dwdp_jax.sim import hardware, studies
from dwdp_jax.sim.roofline import Precision
from dwdp_jax.sim.config import PULL_ISSUES, ContextConfig
from models.config import get_preset

EXPERIMENTS = {"roofline": "roofline", "contention": "sim_contention", "sync_cv": "sim_sync_cv",
               "pareto": "sim_pareto", "planner": "sim_planner", "calibration": "sim_calibration", "grid": "sim_grid"}

FLAGS = flags.FLAGS
flags.DEFINE_enum("study", "contention", list(EXPERIMENTS), "which study to run")
flags.DEFINE_string("hardware", "gb200", f"GPU spec: one of {sorted(hardware.SPECS)} or calibrated")
flags.DEFINE_string("model", "deepseek_r1", "model preset (models.config.PRESETS)")
flags.DEFINE_string("out", "results", "results root")
flags.DEFINE_string("run", "", "results file name (default: the hardware name)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("moe_precision", "nvfp4", "routed/shared expert precision: bf16 | fp8 | nvfp4")
flags.DEFINE_string("dense_precision", "bf16", "MLA projections, dense MLP, LM head precision")
flags.DEFINE_string("attention_precision", "bf16", "attention core precision")
flags.DEFINE_list("isls", ["1024", "2048", "4096", "8192", "16384", "32768", "65536"], "roofline ISLs")
flags.DEFINE_list("batches", ["1", "2", "4", "8"], "roofline batch sizes (sequences per rank)")
flags.DEFINE_integer("group_size", 4, "DWDP group / DEP server size")
flags.DEFINE_integer("local_experts", 0, "DWDP local experts L per rank (0: least redundant placement)")
flags.DEFINE_list("group_sizes", ["3", "4", "6", "8", "12", "16"], "contention: DWDP group sizes")
flags.DEFINE_list("disciplines", ["none", "fifo", "round_robin"], "contention: pull disciplines")
flags.DEFINE_integer("min_pulls", 80000, "contention: pulls simulated per group size (at least)")
flags.DEFINE_integer("isl", 8192, "sync_cv / pareto / planner: ISL")
flags.DEFINE_float("input_ratio", 0.8, "input lengths uniform in [ratio * ISL, ISL]")
flags.DEFINE_integer("osl", 1024, "pareto / planner: output tokens per request")
flags.DEFINE_integer("max_num_tokens", 32768, "sync_cv: DEP tokens per rank per step")
flags.DEFINE_list("loads", ["0.3", "0.5", "0.7", "0.8", "0.9", "1.0"], "sync_cv: arrival rates / DEP capacity")
flags.DEFINE_list("seeds", ["0", "1"], "sync_cv: workload seeds")
flags.DEFINE_integer("num_requests", 2000, "sync_cv: requests per (load, seed)")
flags.DEFINE_list("bands", [b.name for b in studies.paper_bands()], "pareto: paper TPS/user bands to simulate")
flags.DEFINE_string("band", "60-80", "planner: the generation configuration (a pareto band name)")
flags.DEFINE_float("mtp_acceptance", 0.8, "generation: acceptance of each MTP draft token")
flags.DEFINE_integer("cycles", 5, "pareto / planner: requests = cycles x concurrency")
flags.DEFINE_list("ttft_targets", ["0.5", "1", "2", "5"], "planner: median TTFT targets, seconds")
flags.DEFINE_list("planner_group_sizes", ["3", "4", "6", "8"], "planner: DWDP group sizes")
flags.DEFINE_integer("max_ctx_gpus", 32, "planner: most context GPUs")
flags.DEFINE_enum("discipline", "fifo", ["fifo", "round_robin", "none"], "DWDP pull discipline (pareto, planner)")
flags.DEFINE_integer("slice_bytes", 1 << 20, "round_robin slice size, bytes")
flags.DEFINE_enum("packing", "lookahead", ["lookahead", "fcfs"], "DWDP batch filling (pareto, planner): DEP's window "
                  "one rank at a time, or strict FCFS (serving.scheduler)")
flags.DEFINE_float("compute_slowdown", 0.0, "DWDP compute slowdown while pulling (0.05 = 5%)")
flags.DEFINE_float("attention_slowdown", None, "DWDP attention slowdown while pulling (default: --compute_slowdown)")
flags.DEFINE_enum("pull_issue", "after_moe", list(PULL_ISSUES), "where a DWDP rank issues the next "
                  "pull: after a MoE layer (two layers ahead) or after its attention (one layer ahead)")
flags.DEFINE_float("tolerance", 0.10, "calibration: allowed relative error of the predicted DWDP/DEP ratio")
flags.DEFINE_list("projection_requests", ["256"], "calibration: request counts each measured run is also projected at")


def options(**overrides: Any) -> SimpleNamespace:
    """This module's flag values (their defaults unless a command line set them) with `overrides`: the settings
    `python -m experiments.simulate` runs a study with, for another command to run the same study."""
    values = {flag.name: flag.value for flag in FLAGS.get_flags_for_module(sys.modules[__name__])}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown simulate options {unknown}")
    return SimpleNamespace(**{**values, **overrides})


def _ints(opts: SimpleNamespace, name: str) -> list[int]:
    try:
        return [int(v) for v in getattr(opts, name)]
    except ValueError as e:
        raise ValueError(f"--{name} must be a list of integers, got {getattr(opts, name)}") from e


def _floats(opts: SimpleNamespace, name: str) -> list[float]:
    try:
        return [float(v) for v in getattr(opts, name)]
    except ValueError as e:
        raise ValueError(f"--{name} must be a list of numbers, got {getattr(opts, name)}") from e


def _precision(opts: SimpleNamespace) -> Precision:
    return Precision(moe=opts.moe_precision, dense=opts.dense_precision, attention=opts.attention_precision)


def _context(opts: SimpleNamespace, strategy: str, max_num_tokens: int, max_batch_size: int) -> ContextConfig:
    return ContextConfig(strategy, group_size=opts.group_size, max_num_tokens=max_num_tokens,
                         max_batch_size=max_batch_size, discipline=opts.discipline, slice_bytes=opts.slice_bytes,
                         packing=opts.packing, compute_slowdown=opts.compute_slowdown,
                         attention_slowdown=opts.attention_slowdown, pull_issue=opts.pull_issue,
                         precision=_precision(opts), seed=opts.seed)


def _band(opts: SimpleNamespace, name: str) -> studies.Band:
    bands = {b.name: b for b in studies.paper_bands(opts.mtp_acceptance)}
    if name not in bands:
        raise ValueError(f"unknown band {name!r}; choose from {sorted(bands)}")
    return bands[name]


def run_study(study: str, opts: SimpleNamespace, progress: studies.Progress = tqdm) -> dict:
    """Validates the options (`options`) and runs one study; returns its document (config, raw, metrics)."""
    if study == "calibration":
        return studies.calibration_study(opts.out, opts.tolerance, requests=_ints(opts, "projection_requests"))
    if study == "grid":
        return studies.grid_study(opts.out, opts.group_size)
    cfg, hw, prec = get_preset(opts.model), hardware.get(opts.hardware, opts.out), _precision(opts)
    hw.peak_flops_per_s(prec.moe)
    local = opts.local_experts or None
    if study == "roofline":
        return studies.roofline_study(cfg, hw, _ints(opts, "isls"), _ints(opts, "batches"), opts.group_size, prec,
                                      local)
    if study == "contention":
        return studies.contention_study(cfg, hw, _ints(opts, "group_sizes"), opts.disciplines, opts.min_pulls,
                                        seed=opts.seed, progress=progress)
    if study == "sync_cv":
        return studies.sync_cv_study(cfg, hw, opts.isl, opts.input_ratio, opts.group_size, opts.max_num_tokens,
                                     _floats(opts, "loads"), _ints(opts, "seeds"), opts.num_requests, prec=prec,
                                     progress=progress)
    if study == "pareto":
        return studies.pareto_study(cfg, hw, [_band(opts, b) for b in opts.bands], opts.isl, opts.osl,
                                    opts.input_ratio, opts.cycles, opts.group_size,
                                    _context(opts, "dep", 33000, 4), opts.seed, progress=progress)
    return studies.planner_study(cfg, hw, _band(opts, opts.band), _floats(opts, "ttft_targets"),
                                 _ints(opts, "planner_group_sizes"), opts.max_ctx_gpus, opts.isl, opts.osl,
                                 opts.input_ratio, opts.cycles, _context(opts, "dwdp", 33000, 4), opts.seed,
                                 progress=progress)


def write(study: str, doc: dict, opts: SimpleNamespace) -> Path:
    """Writes a study's document as results/<experiment>/<run>.json (run: --run, else the hardware's name)."""
    run = opts.run or ("calibrated" if study == "calibration" else opts.hardware)
    return write_results(EXPERIMENTS[study], run, config={**doc["config"], "argv": sys.argv}, raw=doc["raw"],
                         metrics=doc["metrics"], root=opts.out, with_devices=False)


def produce(study: str, opts: SimpleNamespace) -> Path:
    """Runs one study without progress bars and writes its results file (what the main does, for another command);
    ValueError, before anything is written, on invalid input."""
    return write(study, run_study(study, opts, progress=_quiet), opts)


def _quiet(items):
    return items


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def table(study: str, doc: dict) -> str:
    """The short end-of-run table."""
    m = doc["metrics"]
    if study == "roofline":
        lines = [f"{'ISL':>7}{'batch':>6}{'T_comp ms':>11}{'T_pref ms':>11}{'T_a2a ms':>10}{'comp/pref':>11}"
                 f"{'DEP/DWDP':>10}"]
        lines += [f"{p['isl']:>7}{p['batch']:>6}{1e3 * p['t_compute_s']:>11.3f}{1e3 * p['t_prefetch_s']:>11.3f}"
                  f"{1e3 * p['t_all2all_s']:>10.3f}{p['compute_over_prefetch']:>11.2f}{p['dep_over_dwdp']:>10.2f}"
                  for p in doc["raw"]["points"]]
        lines += ["blog Table 1 (batch 1): ISL  comp/pref ours (published, diff)  DEP/DWDP ours (published, diff)"]
        lines += [f"  {r['isl']:>6}  {r['compute_over_prefetch']:.2f} ({r['compute_over_prefetch_published']}, "
                  f"{r['compute_over_prefetch_diff']:+.2f})  {r['dep_over_dwdp']:.2f} ({r['dep_over_dwdp_published']},"
                  f" {r['dep_over_dwdp_diff']:+.2f})" for r in m["published"]]
        lines += [f"batch {b}: crossover ISL {_fmt(v['crossover_isl'], '.0f')}, speedup peak {v['speedup_peak']:.2f} "
                  f"at ISL {v['speedup_peak_isl']}" for b, v in m["per_batch"].items()]
        return "\n".join(lines)
    if study == "contention":
        lines = [f"{'N':>3} {'paper match':>11}  Pr[C=c] % model | simulated (none) | max diff pp | stretch fifo/rr"]
        for n, row in m["per_group"].items():
            sim = row.get("none", {})
            lines.append(f"{n:>3} {str(row.get('paper_match', '-')):>11}  "
                         f"{' '.join(f'{p:.2f}' for p in row['model_percent'][:4])} | "
                         f"{' '.join(f'{p:.2f}' for p in sim.get('empirical_percent', [])[:4])} | "
                         f"{_fmt(sim.get('max_abs_diff_pp'), '.2f')} | "
                         f"{_fmt(row.get('fifo', {}).get('prefetch_stretch'), '.3f')}/"
                         f"{_fmt(row.get('round_robin', {}).get('prefetch_stretch'), '.3f')}")
        return "\n".join(lines)
    if study == "sync_cv":
        lines = [f"{'CV':>6}{'steps':>8}{'overhead':>10}"]
        lines += [f"{b['cv_center']:>6.2f}{b['steps']:>8}{b['overhead']:>10.3f}" for b in m["bins"]]
        lines.append(f"overhead at CV {m['cv_target']:.0%}: {m['overhead_at_target']:.3f} (local-linear trend), "
                     f"{m['overhead_bin_at_target']:.3f} (bin mean); paper ~0.12")
        return "\n".join(lines)
    if study == "pareto":
        lines = [f"{'band':>8}{'ctx DEP/DWDP':>14}{'TPS/user x':>12}{'TPS/GPU x':>11}{'TTFT DEP ms':>13}"
                 f"{'TTFT DWDP ms':>14}"]
        lines += [f"{r['band']:>8}{r['dep_ctx_gpus']:>8}/{r['dwdp_ctx_gpus']:<5}{r['tps_per_user_speedup']:>12.2f}"
                  f"{r['tps_per_gpu_speedup']:>11.2f}{r['ttft_dep_ms']:>13.0f}{r['ttft_dwdp_ms']:>14.0f}"
                  for r in m["table"]]
        return "\n".join(lines)
    if study == "planner":
        def pick(p):
            if p is None:
                return "none meets it"
            return (f"{p['ctx_gpus']} ctx GPUs (groups of {p['group_size']}), {p['output_tps_per_gpu']:.0f} TPS/GPU, "
                    f"TTFT {p['ttft_p50_s']:.2f} s")
        lines = [f"TTFT <= {r['ttft_target_s']} s: DWDP {pick(r['dwdp'])}; DEP {pick(r['dep'])}" for r in m["choices"]]
        return "\n".join(lines + [f"infeasible group sizes (memory): {m['infeasible_group_sizes']}"])
    if study == "grid":
        lines = [f"DWDP{doc['config']['group_size']} / DEP{doc['config']['group_size']} predicted (calibrated, setup "
                 f"of {doc['config']['base_run']})", f"{'r':>5}{'MNT':>7}{'mitigation':>12}{'DWDP/DEP':>10}  "
                 f"Pr[C=1..4] %"]
        lines += [f"{p['input_ratio']:>5}{p['max_num_tokens']:>7}{str(p['contention_mitigation']):>12}"
                  f"{p['dwdp_over_dep']:>10.3f}  " + " ".join(f"{100 * p['contention'].get(c, 0.0):.1f}"
                                                             for c in range(1, 5)) for p in m["points"]]
        return "\n".join(lines)
    return "\n".join(calibration_lines(doc))


def calibration_lines(doc: dict) -> list[str]:
    """Per measured run: predicted against measured, then the run's projections on a line that names the run again
    (a reader scanning the projections must not have to count lines to know whose they are)."""
    lines = []
    for r in doc["metrics"]["runs"]:
        lines.append(f"{r['run']}: predicted DWDP/DEP {r['predicted_ratio']:.3f}, measured {r['measured_ratio']:.3f}, "
                     f"error {r['rel_error']:+.1%} ({'within' if r['within_tolerance'] else 'OUTSIDE'} tolerance)")
        lines.append(f"  {r['run']} projected DWDP/DEP: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r["projections"].items()))
    return lines + [f"{r['run']}: skipped, other kernels {r['kernels']}" for r in doc["raw"]["skipped_other_kernels"]]


def main(study: str) -> int:
    opts = options()
    try:
        doc = run_study(study, opts)
    except ValueError as e:
        print(f"simulate: invalid input: {e}", file=sys.stderr)
        return 2
    path = write(study, doc, opts)
    print(table(study, doc))
    print(f"wrote {path}")
    return 0


def _cli(argv):
    del argv
    sys.exit(main(FLAGS.study))


if __name__ == "__main__":
    app.run(_cli)
