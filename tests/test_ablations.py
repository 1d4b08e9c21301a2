"""Ablation sweeps: resume keyed on the resolved config, failed points rerun, the exit status and the summary table.

Most tests stand a fake for bench.run that writes a minimal results document (seconds); one runs a real tiny point.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs.context_bench import get_config
from dwdp_jax import ablations, bench, report, results

ROOT = Path(__file__).resolve().parents[1]


def base_config(tmp_path):
    c = get_config("tiny")
    c.results_root = str(tmp_path)
    c.model.checkpoint = ""  # random weights: these tests are about the sweep machinery
    c.model.num_hidden_layers = 2
    c.workload.num_requests = 4
    c.verify.num_requests = 2
    c.token_buckets = 1  # one compiled shape per point
    c.breakdown = False
    c.sync_samples = 2
    return c


class FakeRun:
    """bench.run's results file without the benchmark: TPS/GPU from config.max_num_tokens, verification as told."""

    def __init__(self, failing=(), raising=()):
        self.calls, self.failing, self.raising = [], set(failing), set(raising)

    def __call__(self, c):
        self.calls.append(c.run)
        mnt = c.max_num_tokens
        metrics = {"dwdp": {"tps_per_gpu": 1.25 * mnt, "ttft_p50_s": 0.5},
                   "dep": {"tps_per_gpu": 1.0 * mnt, "ttft_p50_s": 0.6}}
        metrics["ratio"] = report.ratios(metrics["dwdp"], metrics["dep"])
        verification = {name: {"rel_err": 0.0, "passed": c.run not in self.failing} for name in ("dwdp", "dep")}
        failures = {"dep": "RuntimeError: device lost"} if c.run in self.raising else {}
        path = results.write_results(c.experiment, c.run, config=c, raw={}, metrics=metrics,
                                     verification=verification, root=c.results_root, failures=failures)
        if failures:
            raise RuntimeError(f"strategies failed (the others' results are in {path}): {failures}")
        return {"path": str(path), "metrics": metrics, "verification": verification}


def sweep(c, fake, tmp_path, **kwargs):
    lines = []
    outcomes = ablations.run_points(c, "mnt", "tiny", tmp_path, run_point=fake, log=lines.append, **kwargs)
    return outcomes, lines


def test_identical_config_is_reused_and_said_so(tmp_path):
    fake = FakeRun()
    first, _ = sweep(base_config(tmp_path), fake, tmp_path)
    again, lines = sweep(base_config(tmp_path), fake, tmp_path)
    assert len(fake.calls) == 2 and [r.reused for r in first] == [False, False]
    assert [r.reused for r in again] == [True, True] and all(r.passed for r in again)
    assert all(": reused " in line for line in lines)
    stored = json.loads(first[0].path.read_text())["config"]
    assert stored["point_key"] == again[0].doc["config"]["point_key"] and len(stored["point_key"]) == 16


def test_changed_base_field_recomputes_the_stored_points(tmp_path):
    fake = FakeRun()
    ablations.run_sweep(base_config(tmp_path), "mnt", "tiny", tmp_path, run_point=fake)
    c = base_config(tmp_path)
    c.workload.isl = 50
    paths = ablations.run_sweep(c, "mnt", "tiny", tmp_path, run_point=fake)
    assert len(fake.calls) == 4
    assert all(json.loads(path.read_text())["config"]["workload"]["isl"] == 50 for path in paths)
    outcomes, lines = sweep(base_config(tmp_path), fake, tmp_path)
    assert len(fake.calls) == 6 and not any(r.reused for r in outcomes)
    assert all("workload.isl 50 -> 96" in line for line in lines), lines


def test_moving_the_results_root_keeps_the_key(tmp_path):
    """Where a point is written is no part of what it measures."""
    c = ablations.point_config(base_config(tmp_path), "mnt", {"max_num_tokens": 192}, "tiny", tmp_path)
    moved = ablations.point_config(base_config(tmp_path), "mnt", {"max_num_tokens": 192}, "tiny", tmp_path / "x")
    on = {"platform": "cpu", "device_kind": "cpu"}
    assert ablations.point_key(ablations.keyed_config(c), on) == ablations.point_key(ablations.keyed_config(moved), on)
    assert ablations.point_key(ablations.keyed_config(c), on) != ablations.point_key(
        ablations.keyed_config(c), {"platform": "gpu", "device_kind": "NVIDIA H200"})


def test_file_without_a_key_is_not_trusted(tmp_path):
    c = ablations.point_config(base_config(tmp_path), "mnt", {"max_num_tokens": 192}, "tiny", tmp_path)
    results.write_results(c.experiment, c.run, config=c, raw={}, metrics={}, root=tmp_path,
                          verification={"dwdp": {"passed": True}})
    fake = FakeRun()
    outcomes, _ = sweep(base_config(tmp_path), fake, tmp_path)
    assert fake.calls == ["mnt__max_num_tokens-192", "mnt__max_num_tokens-384"]
    assert outcomes[0].note == "stored without a config key"


def test_source_change_is_said_and_reruns_only_when_asked(tmp_path, monkeypatch):
    fake = FakeRun()
    sweep(base_config(tmp_path), fake, tmp_path)
    monkeypatch.setattr(results, "source_hash", lambda: "0123456789ab")
    reused, lines = sweep(base_config(tmp_path), fake, tmp_path)
    assert len(fake.calls) == 2 and all(r.reused for r in reused)
    assert all(line.endswith(", now 0123456789ab)") for line in lines), lines
    sweep(base_config(tmp_path), fake, tmp_path, rerun_on_source_change=True)
    assert len(fake.calls) == 4


def test_failed_point_reruns_and_only_it(tmp_path):
    failing = FakeRun(failing={"mnt__max_num_tokens-192"})
    ablations.run_sweep(base_config(tmp_path), "mnt", "tiny", tmp_path, run_point=failing)
    ablations.run_sweep(base_config(tmp_path), "mnt", "tiny", tmp_path, run_point=failing)
    assert failing.calls == ["mnt__max_num_tokens-192", "mnt__max_num_tokens-384", "mnt__max_num_tokens-192"]
    fixed = FakeRun()
    again, lines = sweep(base_config(tmp_path), fixed, tmp_path)
    assert fixed.calls == ["mnt__max_num_tokens-192"] and [r.reused for r in again] == [False, True]
    assert "failed verification" in lines[0] and [r.passed for r in again] == [True, True]


def test_strategy_failure_is_kept_and_the_sweep_goes_on(tmp_path):
    fake = FakeRun(raising={"mnt__max_num_tokens-192"})
    outcomes, _ = sweep(base_config(tmp_path), fake, tmp_path)
    assert len(fake.calls) == 2 and [r.passed for r in outcomes] == [False, True]
    assert "device lost" in outcomes[0].error and "device lost" in ablations.summary_table(outcomes)


def test_summary_table_has_each_points_numbers(tmp_path):
    outcomes, _ = sweep(base_config(tmp_path), FakeRun(failing={"mnt__max_num_tokens-384"}), tmp_path)
    table = ablations.summary_table(outcomes)
    row_192, row_384 = (line.split() for line in table.splitlines()[1:3])
    assert row_192 == ["mnt__max_num_tokens-192", "ran", "240.0", "192.0", "1.250", "1.200", "yes"]
    assert row_384 == ["mnt__max_num_tokens-384", "ran", "480.0", "384.0", "1.250", "1.200", "FAILED"]
    assert "functional check" in table  # the fake's documents record this CPU machine


@pytest.fixture
def one_point(monkeypatch):
    """The mnt sweep with one point, for the real runs."""
    monkeypatch.setitem(ablations.SWEEP_VALUES, "mnt", {"tiny": [192], "r1": [16384]})


def test_real_point_end_to_end(tmp_path, one_point):
    outcomes, lines = sweep(base_config(tmp_path), bench.run, tmp_path)
    assert outcomes[0].passed and not outcomes[0].reused and "running" in lines[0]
    again, lines = sweep(base_config(tmp_path), bench.run, tmp_path)
    assert again[0].reused and "reused" in lines[0]
    tps = outcomes[0].doc["metrics"]["dwdp"]["tps_per_gpu"]
    assert f"{tps:.1f}" in ablations.summary_table(again)


# The command line with FakeRun standing in for bench.run; its first argument names the points that fail verification.
FAKE_CLI = """
import sys
from absl import app
from dwdp_jax import bench
from tests.test_ablations import FakeRun
bench.run = FakeRun(failing=set(sys.argv.pop(1).split(",")))
from experiments import ablations
app.run(ablations.main)
"""


def run_cli(tmp_path, failing=""):
    return subprocess.run([sys.executable, "-c", FAKE_CLI, failing, "--sweep=mnt", f"--results={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_exits_1_after_every_point_when_one_fails_and_0_once_rerun(tmp_path):
    failed = run_cli(tmp_path, failing="mnt__max_num_tokens-192")
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "1 of 2 points FAILED" in failed.stderr and "mnt__max_num_tokens-192" in failed.stderr
    assert [line.split()[-1] for line in failed.stdout.splitlines()[3:5]] == ["FAILED", "yes"], failed.stdout
    assert "CPU timings are a functional check" in failed.stdout
    fixed = run_cli(tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "192: running: stored run failed verification" in fixed.stdout and "384: reused" in fixed.stdout


def test_measurements_rewritten_under_one_run_keep_each_finished_case(tmp_path, capsys):
    """A script with several cases rewrites one run file after each (quietly) and echoes the table at the end: a
    run cut after its first case leaves that case on disk."""
    run = results.run_stamp()
    first = results.write_measurements("bench_x", config={"done": ["a"]}, raw={}, metrics={"a_tflops": 1.0},
                                       root=tmp_path, run=run, echo=False)
    assert capsys.readouterr().out == ""
    assert json.loads(first.read_text())["metrics"] == {"a_tflops": 1.0}
    last = results.write_measurements("bench_x", config={"done": ["a", "b"]}, raw={},
                                      metrics={"a_tflops": 1.0, "b_tflops": 2.0}, root=tmp_path, run=run)
    assert last == first and list((tmp_path / "bench_x").glob("*.json")) == [first]
    assert json.loads(last.read_text())["config"]["done"] == ["a", "b"]
    assert "b_tflops" in capsys.readouterr().out
