"""Roofline and simulator studies at NVL72 scale (issue 7): one study per run, one results file per study.

  python -m experiments.simulate --config=configs/simulate.py:contention   # paper Table 2, model vs simulated pulls
  python -m experiments.simulate --config=configs/simulate.py:sync_cv      # DEP sync overhead vs CV (paper Fig. 1)
  python -m experiments.simulate --config=configs/simulate.py:roofline     # blog Table 1 (= experiments.roofline)
  python -m experiments.simulate --config=configs/simulate.py:pareto       # e2e TPS/GPU vs TPS/user (Tables 5-6)
  python -m experiments.simulate --config=configs/simulate.py:planner --config.ttft_targets=1,2,4
  python -m experiments.simulate --config=configs/simulate.py:calibration  # needs gpu_calibration + context_bench
  python -m experiments.simulate --config=configs/simulate.py:grid --config.group_size=8  # Table 4 at N GPUs
  python -m experiments.simulate --study=projection --config.fp8_grouped_gemm_tflops=...  # full R1 FP8, DWDP8/DEP8

`--study=NAME` is short for `--config=configs/simulate.py:NAME`. Writes results/<experiment>/<run>.json (experiments
roofline, sim_contention, sim_sync_cv, sim_pareto, sim_planner, sim_calibration, sim_grid) and prints a short table.
Invalid input exits with code 2 and a message naming the field, before any simulation runs. Another command runs a
study exactly as this main does with `produce(options(STUDY))` (the figures command runs the missing ones this way).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_dict, config_flags
from tqdm import tqdm

import configs
from configs import simulate as simulate_configs
from dwdp_jax.results import write_results
from dwdp_jax.sim import calibration, hardware, studies
from dwdp_jax.sim.config import ContextConfig
from dwdp_jax.sim.roofline import Precision
from dwdp_jax.sim.workload import Workload
from models.config import get_preset

CONFIG_FILE = os.path.join(os.path.dirname(configs.__file__), "simulate.py")
EXPERIMENTS = {"roofline": "roofline", "contention": "sim_contention", "sync_cv": "sim_sync_cv",
               "pareto": "sim_pareto", "planner": "sim_planner", "calibration": "sim_calibration", "grid": "sim_grid",
               "memory": "sim_memory", "projection": "sim_projection"}
WORKLOADS = ("uniform_r0.8", "std4096")


def options(study: str, **overrides: Any) -> config_dict.ConfigDict:
    """The study's config (configs/simulate.py:STUDY) with `overrides`: the settings `python -m experiments.simulate`
    runs it with, for another command to run the same study."""
    c = simulate_configs.get_config(study)
    unknown = sorted(set(overrides) - set(c.keys()))
    if unknown:
        raise ValueError(f"unknown {study} config fields {unknown}; the study has {sorted(c.keys())}")
    c.update(overrides)
    return c


def _items(c: config_dict.ConfigDict, name: str) -> list[str]:
    return [v.strip() for v in str(c[name]).split(",") if v.strip()]


def _ints(c: config_dict.ConfigDict, name: str) -> list[int]:
    try:
        return [int(v) for v in _items(c, name)]
    except ValueError as e:
        raise ValueError(f"config.{name} must be a comma-separated list of integers, got {c[name]!r}") from e


def _floats(c: config_dict.ConfigDict, name: str) -> list[float]:
    try:
        return [float(v) for v in _items(c, name)]
    except ValueError as e:
        raise ValueError(f"config.{name} must be a comma-separated list of numbers, got {c[name]!r}") from e


def _precision(c: config_dict.ConfigDict) -> Precision:
    return Precision(moe=c.moe_precision, dense=c.dense_precision, attention=c.attention_precision)


def _context(c: config_dict.ConfigDict, strategy: str, max_num_tokens: int, max_batch_size: int) -> ContextConfig:
    """The e2e studies' base context servers (the planner sets every group size itself: its config has none)."""
    group = {"group_size": c.group_size} if "group_size" in c else {}
    return ContextConfig(strategy, **group, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                         discipline=c.discipline, slice_bytes=c.slice_bytes, packing=c.packing,
                         compute_slowdown=c.compute_slowdown, attention_slowdown=c.attention_slowdown,
                         pull_issue=c.pull_issue, precision=_precision(c), seed=c.seed)


def _measured(c: config_dict.ConfigDict, hw: hardware.HardwareSpec) -> hardware.HardwareSpec:
    """`hw` with the measured rates the config sets (TFLOP/s) in place of the spec's."""
    fields = {"fp8_gemm_tflops": "fp8_flops_per_s", "fp8_grouped_gemm_tflops": "grouped_gemm_fp8_flops_per_s",
              "fp8_grouped_gemm_down_tflops": "grouped_gemm_fp8_down_flops_per_s",
              "attention_tflops": "attention_flops_per_s"}
    changes = {field: c[key] * hardware.TERA for key, field in fields.items() if c.get(key) is not None}
    for key in (k for k in fields if c.get(k) is not None and not c[k] > 0):
        raise ValueError(f"config.{key} must be > 0 TFLOP/s, got {c[key]}")
    if not changes:
        return hw
    return dataclasses.replace(hw, **changes, name=f"{hw.name}+measured", source=f"{hw.source}; set: "
                               + ", ".join(f"{k}={c[k]}" for k in fields if c.get(k) is not None))


def _workload(c: config_dict.ConfigDict, name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"config.workloads: unknown {name!r}; choose from {WORKLOADS}")
    shape = {"uniform_r0.8": dict(input_ratio=0.8), "std4096": dict(isl_std=4096.0)}[name]
    return Workload(c.num_requests, c.isl, seed=c.seed, **shape)


def _band(c: config_dict.ConfigDict, name: str) -> studies.Band:
    bands = {b.name: b for b in studies.paper_bands(c.mtp_acceptance)}
    if name not in bands:
        raise ValueError(f"unknown band {name!r}; choose from {sorted(bands)}")
    return bands[name]


def run_study(c: config_dict.ConfigDict, progress: studies.Progress = tqdm) -> dict:
    """Validates the config (`options`) and runs its study; returns its document (config, raw, metrics)."""
    if c.study == "calibration":
        return calibration.calibration_study(c.results_root, c.tolerance, requests=_ints(c, "projection_requests"))
    if c.study == "grid":
        return calibration.grid_study(c.results_root, c.group_size)
    if c.study == "memory":
        return studies.memory_study([get_preset(m) for m in _items(c, "models")],
                                    [hardware.get(h) for h in _items(c, "cards")], _ints(c, "group_sizes"),
                                    _ints(c, "max_num_tokens"), c.memory_fraction)
    cfg, hw, prec = get_preset(c.model), _measured(c, hardware.get(c.hardware, c.results_root)), _precision(c)
    hw.peak_flops_per_s(prec.moe)
    if c.study == "projection":
        return studies.projection_study(cfg, hw, {name: _workload(c, name) for name in _items(c, "workloads")},
                                        _context(c, "dwdp", c.max_num_tokens, c.max_batch_size),
                                        _context(c, "dep", c.max_num_tokens, c.max_batch_size), c.memory_fraction)
    if c.study == "roofline":
        return studies.roofline_study(cfg, hw, _ints(c, "isls"), _ints(c, "batches"), c.group_size, prec,
                                      c.local_experts or None)
    if c.study == "contention":
        return studies.contention_study(cfg, hw, _ints(c, "group_sizes"), _items(c, "disciplines"), c.min_pulls,
                                        seed=c.seed, progress=progress)
    if c.study == "sync_cv":
        return studies.sync_cv_study(cfg, hw, c.isl, c.input_ratio, c.group_size, c.max_num_tokens,
                                     _floats(c, "loads"), _ints(c, "seeds"), c.num_requests, prec=prec,
                                     progress=progress)
    if c.study == "pareto":
        return studies.pareto_study(cfg, hw, [_band(c, b) for b in _items(c, "bands")], c.isl, c.osl,
                                    c.input_ratio, c.cycles, c.group_size, _context(c, "dep", 33000, 4), c.seed,
                                    progress=progress)
    return studies.planner_study(cfg, hw, _band(c, c.band), _floats(c, "ttft_targets"), _ints(c, "group_sizes"),
                                 c.max_ctx_gpus, c.isl, c.osl, c.input_ratio, c.cycles,
                                 _context(c, "dwdp", 33000, 4), c.seed, progress=progress)


def write(doc: dict, c: config_dict.ConfigDict) -> Path:
    """Writes a study's document as results/<experiment>/<run>.json (run: config.run, else the hardware's name)."""
    run = c.run or {"calibration": "calibrated", "memory": "r1_full_depth"}.get(c.study, c.hardware)
    return write_results(EXPERIMENTS[c.study], run, config={**doc["config"], "argv": sys.argv}, raw=doc["raw"],
                         metrics=doc["metrics"], root=c.results_root, with_devices=False)


def produce(c: config_dict.ConfigDict) -> Path:
    """Runs one study without progress bars and writes its results file (what the main does, for another command);
    ValueError, before anything is written, on invalid input."""
    return write(run_study(c, progress=_quiet), c)


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
    if study == "projection":
        fits = {True: "fits", False: "does not fit", None: "card memory unknown"}
        mem = ", ".join(f"{k} {v:.1f} GB ({fits[m['fits'][k]]} at {doc['config']['memory_fraction']:.0%})"
                        for k, v in m["memory_gb_per_rank"].items())
        lines = [f"{'workload':<14}{'DWDP TPS/GPU':>14}{'DEP TPS/GPU':>13}{'DWDP/DEP':>10}"]
        lines += [f"{w:<14}{v['dwdp_tps_per_gpu']:>14.0f}{v['dep_tps_per_gpu']:>13.0f}{v['dwdp_over_dep']:>10.3f}"
                  for w, v in m["workloads"].items()]
        return "\n".join(lines + [f"per rank: {mem}; hardware {doc['config']['hardware'].name}"])
    if study == "memory":
        cards = list(doc["config"]["cards"])
        lines = [f"{'experts':>8}{'strategy':>9}{'N':>4}{'MNT':>7}{'replicated':>11}{'experts':>9}{'slots':>7}"
                 f"{'a2a':>6}{'activ.':>8}{'total GB':>9}  fits " + " ".join(cards)
                 + "  | dense FP8: total GB, fits"]
        lines += [f"{'fp8' if r['fp8_experts'] else 'bf16':>8}{r['strategy']:>9}{r['group_size']:>4}"
                  f"{r['max_num_tokens']:>7}" + "".join(f"{r[k] / 1e9:>{w}.1f}" for k, w in (
                      ("replicated_weight_bytes", 11), ("local_expert_bytes", 9), ("prefetch_slot_bytes", 7),
                      ("all_to_all_bytes", 6), ("activation_bytes", 8), ("total_bytes", 9)))
                  + "  " + " ".join(("yes" if r["fits"][card] else "no").rjust(len(card)) for card in cards)
                  + f"  | {r['total_bytes_fp8_dense'] / 1e9:.1f} "
                  + " ".join(("yes" if r["fits_fp8_dense"][card] else "no") for card in cards)
                  for r in doc["raw"]["rows"]]
        return "\n".join(lines + [f"fits: at most {doc['config']['memory_fraction']:.0%} of the card's memory; dense "
                                  "FP8: the replicated projections FP8 as the checkpoint stores them "
                                  "(ModelConfig.fp8_dense)"])
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


def main(c: config_dict.ConfigDict) -> int:
    try:
        doc = run_study(c)
    except ValueError as e:
        print(f"simulate: invalid input: {e}", file=sys.stderr)
        return 2
    path = write(doc, c)
    print(table(c.study, doc))
    print(f"wrote {path}")
    return 0


def invalid(message: str) -> None:
    print(f"simulate: invalid input: {message}", file=sys.stderr)
    sys.exit(2)


def command_line(argv: list[str], default_study: str) -> list[str]:
    """argv with `--study=NAME` as `--config=configs/simulate.py:NAME`, and `default_study` where neither names one;
    exits 2 on an unknown study or a --config.x override of a field the study does not have (ml_collections would
    raise a traceback)."""
    rest, study, spec = [], None, None
    for arg in argv[1:]:
        if arg.startswith("--study="):
            study = arg.split("=", 1)[1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if study is not None and spec is not None:
        invalid("give --study or --config, not both")
    path, _, name = (spec or CONFIG_FILE).partition(":")
    name = study or name or default_study
    if name not in simulate_configs.STUDIES:
        invalid(f"unknown study {name!r}; choose from {', '.join(simulate_configs.STUDIES)}")
    if os.path.abspath(path) == CONFIG_FILE:
        known = list(simulate_configs.get_config(name).keys())
        for field in (a[len("--config."):].split("=", 1)[0] for a in rest if a.startswith("--config.")):
            if field not in known:
                nearest = ", ".join(difflib.get_close_matches(field, known, n=3, cutoff=0.0))
                invalid(f"--config.{field}: no such field of the {name} study; nearest: {nearest}")
    return [argv[0], f"--config={path}:{name}", *rest]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, a bad value (--config.min_pulls=many) exiting 2 in one line like every other bad input."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        invalid(str(e).strip().splitlines()[-1])


def run_main(default_study: str) -> None:
    """The command: `default_study` unless --study or --config names another."""
    sys.argv = command_line(sys.argv, default_study)
    config = config_flags.DEFINE_config_file("config", None, "study config (configs/simulate.py:STUDY)",
                                             lock_config=True)
    app.run(lambda argv: sys.exit(main(config.value)), flags_parser=parse_flags)


if __name__ == "__main__":
    run_main("contention")
