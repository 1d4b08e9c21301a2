"""The figures command on CPU, from a fresh clone's results: every paper figure of the map in docs/results.md written,
the missing simulator studies run by the command itself, unusable results files skipped with a reason, and the
paper's values beside ours."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dwdp_jax.results import read_results

REPO = Path(__file__).resolve().parent.parent
TRACKED = REPO / "results"
# Tracked GPU runs: a full one (breakdown, pull timeline, pull contention, DEP sync sample), one recorded with
# config.breakdown=False, and one whose measured DEP overhead is below zero.
RUNS = {"full": "r1_width_4gpu_h200x4_depth7_s9_repeats_std4096_20261128-051307.json",
        "no_breakdown": "r1_width_4gpu_std_depth7_n1024_h200x4_20261128-194042.json",
        "negative_sync": "r1_width_4gpu_std_h200x4_depth7_20261127-173654.json"}
# The studies' settings here: the same studies as the mains run, on fewer points, so the test stays short.
CHEAP = {"contention": {"group_sizes": "3,4", "min_pulls": 2000},
         "sync_cv": {"loads": "0.5,1.0", "seeds": "0", "num_requests": 200},
         "pareto": {"bands": "160-180"},
         "planner": {"band": "160-180", "group_sizes": "4", "max_ctx_gpus": 8},
         "roofline": {"isls": "1024,8192,16384,32768", "batches": "1"}}


def _map_scripts() -> set[str]:
    """The figure modules the paper figure -> script -> data map (docs/results.md) names."""
    return set(re.findall(r"`experiments/figures/(fig_\w+)\.py`", (REPO / "docs" / "results.md").read_text()))


def _fresh_results(root: Path) -> None:
    """What a fresh clone holds for the figures (the GPU calibration and a few GPU runs), plus a CPU run."""
    shutil.copytree(TRACKED / "gpu_calibration", root / "gpu_calibration")
    (root / "context_bench").mkdir(parents=True)
    for name in RUNS.values():
        shutil.copy(TRACKED / "context_bench" / name, root / "context_bench" / name)
    cpu = json.loads((TRACKED / "context_bench" / RUNS["full"]).read_text())
    cpu.update(run="tiny_cpu", environment={**cpu["environment"], "device_kind": "cpu"},
               model={**cpu["model"], "dtype": "float32"})
    (root / "context_bench" / "tiny_cpu.json").write_text(json.dumps(cpu))
    (root / "ablations").mkdir()
    (root / "ablations" / "isl__isl-64.json").write_text(json.dumps({
        "run": "isl__isl-64", "environment": {"device_kind": "cpu"}, "config": {"sweep": "isl", "point": {"isl": 64}},
        "metrics": {s: {"tps_per_gpu": 10.0, "ttft_p50_s": 1.0} for s in ("dwdp", "dep")}}))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Runs the figures command's library entry point once: (results root, figures root, written, failed, stdout)."""
    from experiments.figures.__main__ import run_all

    tmp = tmp_path_factory.mktemp("figures")
    results, figures = tmp / "results", tmp / "figures"
    _fresh_results(results)
    capture = tmp / "stdout.txt"
    with capture.open("w") as out:
        stdout, sys.stdout = sys.stdout, out
        try:
            written, failed = run_all(results, figures, study_overrides=CHEAP)
        finally:
            sys.stdout = stdout
    return results, figures, written, failed, capture.read_text()


def test_every_paper_figure_of_the_map_is_written(made):
    results, figures, written, failed, _ = made
    assert failed == {}
    scripts = _map_scripts()
    assert {"fig_sync_overhead", "fig_breakdown", "fig_roofline", "fig_contention", "fig_ablations", "fig_pareto",
            "fig_planner", "fig_pull_timeline"} <= scripts
    for script in scripts:
        pngs = [p for p in written[f"experiments.figures.{script}"] if p.suffix == ".png"]
        assert pngs and all(p.exists() and p.with_suffix(".pdf").exists() for p in pngs), script
    names = {p.name for p in figures.iterdir()}
    for stem in ("sync_overhead_gb200", "roofline_gb200", "calibration_calibrated", "contention_gb200",
                 "pareto_gb200", "planner_gb200", *(f"ablation_{s}" for s in ("isl", "mnt", "isl_std", "group_size",
                                                                              "contention"))):
        assert f"{stem}.png" in names, stem
    assert {"breakdown_r1_width_4gpu_20261128-051307.png", "pull_timeline_r1_width_4gpu_20261128-051307.png"} <= names


def test_missing_studies_are_simulated_into_the_results_root(made):
    from experiments import simulate
    from experiments.figures import simulated

    results, _, _, _, stdout = made
    assert simulated.missing(results) == []
    for study in simulated.STUDIES:
        assert f"{study}: wrote {results / simulate.EXPERIMENTS[study]}" in stdout
    (contention,) = read_results("sim_contention", results)
    assert contention["config"]["min_pulls"] == 2000 and contention["config"]["group_sizes"] == [3, 4]


def test_unusable_results_are_skipped_with_a_reason(made):
    _, _, _, _, stdout = made
    skipped = [line.strip() for line in stdout.splitlines() if line.strip().startswith("skipped ")]
    assert ("skipped context_bench run r1_width_4gpu_std_20261128-194042: recorded without a breakdown "
            "(config.breakdown=False)") in skipped
    assert "skipped context_bench run tiny_cpu: a CPU run: a functional check, not speed data" in skipped
    assert "skipped ablations run isl__isl-64: a CPU run: a functional check, not speed data" in skipped
    assert "breakdown_r1_width_4gpu_std_20261128-194042.png" not in stdout


def test_paper_values_stand_beside_ours(made):
    _, figures, _, _, _ = made
    ablations = (figures / "ablations.md").read_text()
    assert "| isl=1024 | - | - | - | - | 1.110 | - | - | - | 1.27 | - |" in ablations  # Table 3a, nothing measured
    assert "| 0.995 |" in ablations and "| 1.081 |" in ablations  # Table 4, mitigation off -> on
    assert "| 160-180 | 170-180 | 8/" in (figures / "pareto_gb200.md").read_text()
    assert "| 494 |" in (figures / "pareto_gb200.md").read_text()  # Table 6, DEP TTFT ms
    assert "| 4 | 3 | 11.11 |" in (figures / "contention_gb200.md").read_text()  # Table 2
    assert "| 32768 |" in (roofline := (figures / "roofline_gb200.md").read_text()) and "| 4.77 |" in roofline
    sync = (figures / "sync_overhead_gb200.md").read_text()
    assert "| paper Fig. 1 (GB200, DEP4, ISL 8K, r 0.8) | 20% | ~12% |" in sync
    assert "output TPS/GPU 0.97" in (figures / "planner_gb200.md").read_text()  # Table 5, 170-180 TPS/user


def test_breakdown_draws_paper_table1_normalized_beside_the_run(made):
    from experiments.figures import fig_breakdown

    results = made[0]
    doc = json.loads((results / "context_bench" / RUNS["full"]).read_text())
    fig = fig_breakdown._figure(doc, fig_breakdown._validated(doc))
    assert [t.get_text() for t in fig.axes[0].texts] == ["1", "0.883"]  # paper Table 1: DWDP4 / DEP4 iteration


def test_a_negative_measured_sync_overhead_is_drawn_at_zero_never_below(made):
    from experiments.figures import fig_sync_overhead

    results = made[0]
    measured = fig_sync_overhead.measured_points(results)
    assert {p.run for p in measured} == {"r1_width_4gpu_20261128-051307", "r1_width_4gpu_std_20261128-194042",
                                         "r1_width_4gpu_std_20261127-173654"}  # the CPU run is not among them
    assert min(p.overhead for p in measured) < 0
    (doc,) = read_results("sim_sync_cv", results)
    ax = fig_sync_overhead._figure(doc, measured).axes[0]
    drawn = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if c.get_label().startswith("measured")])
    assert drawn.min() == 0.0
    assert any(t.get_text() == "-59%" for t in ax.texts)


def test_calibration_table_names_the_run_of_every_projection(made):
    from experiments import simulate

    (doc,) = read_results("sim_calibration", made[0])
    lines = simulate.table("calibration", doc).splitlines()
    projections = [line for line in lines if "projected" in line]
    assert len(projections) == len(doc["metrics"]["runs"]) >= 2
    for run, line in zip((r["run"] for r in doc["metrics"]["runs"]), projections):
        assert line.strip().startswith(f"{run} projected DWDP/DEP: ")


def test_command_exits_0_and_reports_without_simulating(made):
    results, _, _, _, _ = made
    figures = results.parent / "figures_cli"
    done = subprocess.run([sys.executable, "-m", "experiments.figures", f"--results={results}",
                           f"--figures={figures}", "--nosimulate"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "simulating" not in done.stdout + done.stderr
    assert "fig_ablations: paper Tables 3-4" in done.stdout
    assert re.fullmatch(r"\d+ figures \(PNG and PDF\) in .*figures_cli", done.stdout.splitlines()[-1])
