"""experiments.bench_layer on CPU: the tiny layer's staged step equals the one-program prefill at fp32 for bf16-
and FP8-laid-out presets and an ablation; the results carry every variant's time and stages, the FP8/bf16 ratio and
the ablation's effect; bad input is refused before any work."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dwdp_jax.measure import gpu_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "experiments.bench_layer", *args, f"--results={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_tiny_layer_fp8_against_bf16_and_an_ablation(tmp_path):
    """bf16 and FP8 as released, and an ablation of the latter (FP8 Q/K/V: rounded inputs of attention) as a third
    variant: every staged step equals its one-program prefill, and the ablation moves the logits by the rounding
    only."""
    ablated = "deepseek_r1_released:fp8_attention_qkv=True"
    done = _run("--tiny", "--tokens=128", "--sequences=2", "--rounds=1", "--warmup=0",
                f"--presets=deepseek_r1_released,deepseek_r1,{ablated}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FUNCTIONAL CHECK, no speed claim" in done.stdout
    [path] = (tmp_path / "bench_layer").glob("*.json")
    metrics = json.loads(path.read_text())["metrics"]
    for preset in ("deepseek_r1", "deepseek_r1_released", ablated):
        assert metrics[f"{preset}_rel_err_vs_prefill"] <= 1e-5
        assert metrics[f"{preset}_step_ms"] > 0 and metrics[f"{preset}_attention_ms"] > 0
        assert metrics[f"{preset}_moe_ms"] > 0
    assert metrics["deepseek_r1_over_deepseek_r1_released_tokens_per_s"] > 0
    assert metrics["deepseek_r1_over_deepseek_r1_released_paired_median"] == pytest.approx(  # one round: the same
        metrics["deepseek_r1_over_deepseek_r1_released_tokens_per_s"], rel=1e-12)
    assert 0 < metrics["deepseek_r1_logits_rel_to_deepseek_r1_released"] < 0.5
    assert 0 < metrics[f"{ablated}_logits_rel_to_deepseek_r1_released"] < 0.1


def test_traced_step_breaks_device_time_down_by_scope(tmp_path):
    """--trace: one more step of each variant under the profiler, its kernels attributed to the model's named scopes
    through XLA's HLO dump; the routing's skew is recorded; a used trace directory is refused."""
    from dwdp_jax import stage_trace

    trace = tmp_path / "trace"
    done = _run("--tiny", "--tokens=128", "--sequences=2", "--rounds=1", "--warmup=0",
                "--presets=deepseek_r1,deepseek_r1_released", f"--trace={trace}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = (tmp_path / "bench_layer").glob("*.json")
    doc = json.loads(path.read_text())
    metrics, top = doc["metrics"], doc["raw"]["top_kernels"]
    for preset in ("deepseek_r1", "deepseek_r1_released"):
        assert 0 < metrics[f"{preset}_trace_busy_ms"] <= metrics[f"{preset}_trace_span_ms"]
        assert metrics[f"{preset}_trace_kernels"] >= sum(r["calls"] for r in top[preset])  # the costliest 20 and more
        for stage in ("attention", "mla_proj", "moe_gmm"):  # others may fuse into a neighbour
            assert metrics[f"{preset}_trace_{stage}_ms"] > 0, stage
        assert metrics[f"{preset}_routed_max_over_mean"] >= 1.0
        rows = top[preset]
        assert 0 < len(rows) <= 20 and [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
        assert {r["stage"] for r in rows} <= set(stage_trace.STAGES) | {"other", "copy"}
        assert any(r["stage"] == "moe_gmm" for r in rows)
        idle = {k: v for k, v in metrics.items() if k.startswith(f"{preset}_trace_idle_before_")}
        assert sum(idle.values()) == pytest.approx(metrics[f"{preset}_trace_idle_ms"], rel=1e-6, abs=1e-9)
        gaps = doc["raw"]["idle_gaps"][preset]
        assert [r["ms"] for r in gaps] == sorted((r["ms"] for r in gaps), reverse=True)
        assert all(idle[f"{preset}_trace_idle_before_{r['stage']}_ms"] >= r["ms"] for r in gaps)
    for key in ("busy", "wall"):  # the FP8 variant's speedup over the first in the traced step
        assert metrics[f"deepseek_r1_released_over_deepseek_r1_trace_{key}"] == pytest.approx(
            metrics[f"deepseek_r1_trace_{key}_ms"] / metrics[f"deepseek_r1_released_trace_{key}_ms"])
    assert "costliest instructions of one traced step" in done.stdout and "idle before these" in done.stdout
    again = _run("--tiny", "--tokens=128", "--rounds=1", "--warmup=0", f"--trace={trace}", tmp_path=tmp_path / "x")
    assert again.returncode != 0 and "is not empty; give a new directory" in again.stderr


def test_tiny_defaults_to_a_batch_the_cpu_holds(tmp_path):
    """--tiny without --tokens: 256 tokens (with the GPU default of 32768 the CPU's XLA attention scores, [heads, T,
    T] in fp32, took the process past 23 GB of memory)."""
    done = _run("--tiny", "--rounds=1", "--warmup=0", "--presets=deepseek_r1", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = (tmp_path / "bench_layer").glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["config"]["tokens"] == 256 and doc["metrics"]["deepseek_r1_tokens_per_s"] > 0
    if shutil.which("nvidia-smi") is None:  # no clock claimed without samples
        assert "rounds_sm_clock_mhz_median" not in doc["metrics"]


def test_bad_input_is_refused_before_any_work(tmp_path):
    done = _run("--tokens=128", tmp_path=tmp_path)
    assert done.returncode == 2 and "R1 width needs a GPU; --tiny" in done.stderr
    done = _run("--tiny", "--tokens=130", "--sequences=4", tmp_path=tmp_path)
    assert done.returncode != 0 and "--tokens=130 must be a multiple of --sequences=4" in done.stderr
    done = _run("--tiny", "--tokens=128", "--attention_impls=xla,flash", tmp_path=tmp_path)
    assert done.returncode != 0 and "unknown attention backend 'flash'" in done.stderr
    done = _run("--tiny", "--tokens=128", "--attention_impls=xla,xla", tmp_path=tmp_path)
    assert done.returncode != 0 and "names a backend twice" in done.stderr
    done = _run("--tiny", "--tokens=128", "--presets=deepseek_r1:fp8_attention=True", tmp_path=tmp_path)
    assert done.returncode != 0 and "'fp8_attention=True' in 'deepseek_r1:fp8_attention=True' is not" in done.stderr
    assert not (tmp_path / "bench_layer").exists()


def test_rounds_record_the_clocks_nvidia_smi_sampled(tmp_path):
    """A stand-in nvidia-smi on the PATH: the timed rounds' SM clock (median, lowest) and highest power are recorded
    from its samples (on a machine without nvidia-smi, none: `test_tiny_defaults_to_a_batch_the_cpu_holds`)."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nprintf '1980, 150.0\\n1500, 700.5\\n[N/A], [N/A]\\n1320, 690.0\\n'\nexec sleep 30\n")
    smi.chmod(0o755)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PATH=f"{smi.parent}:{os.environ['PATH']}")
    done = subprocess.run([sys.executable, "-m", "experiments.bench_layer", "--tiny", "--rounds=1", "--warmup=0",
                           "--presets=deepseek_r1", f"--results={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = (tmp_path / "bench_layer").glob("*.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert metrics["rounds_sm_clock_mhz_median"] == 1500 and metrics["rounds_sm_clock_mhz_min"] == 1320
    assert metrics["rounds_power_w_max"] == 700.5


def test_each_variant_takes_every_place_in_the_rounds():
    """Over as many rounds as variants, each variant runs once at each position and after each other variant."""
    names = ["bf16", "fp8", "fp8_fused"]
    orders = [gpu_bench.round_order(names, i) for i in range(len(names))]
    assert all(sorted(o) == sorted(names) for o in orders)
    for pos in range(len(names)):
        assert sorted(o[pos] for o in orders) == sorted(names)
    followed = {(o[j - 1], o[j]) for o in orders for j in range(1, len(o))}
    followed |= {(a[-1], b[0]) for a, b in zip(orders, orders[1:] + orders[:1])}
    assert followed == {(a, b) for a in names for b in names if a != b}
    assert gpu_bench.round_order(names, 4) == orders[1]


def test_paired_ratios_are_each_rounds_own():
    """Clocks slowing over the rounds, the variant at 0.8 of the base's time in each: every round's ratio is 1.25;
    rounds that do not pair up are refused."""
    base = [1.0, 1.0, 1.3, 1.6, 1.6]
    other = [0.8 * b for b in base]
    assert gpu_bench.paired_ratios(base, other) == pytest.approx([1.25] * 5)
    with pytest.raises(ValueError):
        gpu_bench.paired_ratios(base, other[:-1])
