"""The main job refuses bad input before any device work, says what its CPU timings can claim, and shows progress
from its first seconds."""

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from configs.context_bench import get_config
from dwdp_jax import report, validation
from dwdp_jax.serving import metrics
from test_bench import with_fields

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "r1_width_4gpu", "r1_width_4gpu_std")


def config_with(tmp_path, **changes):
    """The tiny default writing under tmp_path, with `changes` ("dep.dispatch": value)."""
    c = get_config("tiny")
    c.results_root = str(tmp_path)
    return with_fields(c, **changes)


def context_bench(*flags: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.context_bench", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def leaf_fields(c, prefix=""):
    return [f for k, v in c.items() for f in (leaf_fields(v, f"{prefix}{k}.") if hasattr(v, "items")
                                              else [prefix + k])]


@pytest.mark.parametrize("name", PRESETS)
def test_every_field_of_every_preset_is_checked_and_valid(name, tmp_path):
    c = get_config(name)
    c.results_root = str(tmp_path)
    assert sorted(leaf_fields(c)) == sorted(validation.FIELD_CHECKS)
    assert validation.validate(c).requests


@pytest.mark.parametrize("field", sorted(validation.FIELD_CHECKS))
def test_every_field_check_refuses_a_value_of_no_type(field):
    assert validation.FIELD_CHECKS[field](object())


@pytest.mark.parametrize("changes,message", [
    ({"dep.dispatch": "bogus"},
     "config.dep.dispatch='bogus': one of ('auto', 'dense', 'ragged') ('auto': ragged on GPU, dense on CPU); "
     "default 'auto'"),
    ({"cpu_devices": 0}, "config.cpu_devices=0: an integer >= 1"),
    ({"verify.num_requests": -1}, "config.verify.num_requests=-1: an integer >= 1; default 6"),
    ({"verify.num_requests": 60}, "config.verify.num_requests=60: the first 60 requests, spread over the ranks, do "
                                  "not fit one step of config.max_num_tokens=384 tokens"),
    ({"gemm_backend": "palas_split"}, "config.gemm_backend='palas_split': unknown grouped GEMM backend "
                                      "'palas_split'; available: ["),  # the registry: tests may add backends
    ({"attention_impl": "flash"}, "config.attention_impl='flash': unknown attention backend 'flash'; available: "),
    ({"model.preset": "deepseek_r1_fp8", "model.checkpoint": "", "gemm_backend": "pallas_mgpu"},
     "config.gemm_backend='pallas_mgpu' with FP8 experts (config.model.preset='deepseek_r1_fp8'): grouped GEMM "
     "backend 'pallas_mgpu' has no FP8 path"),
    ({"attention_impl": "tokamax"}, "config.attention_impl='tokamax': tokamax attention: q/k head_dim=48 is not "
                                    "supported: a multiple of 64"),
    ({"dwdp.transport": "nccl"}, "config.dwdp.transport='nccl': unknown transport 'nccl'; available: "),
    ({"model.weights": "zeros"}, "config.model.weights='zeros': one of ('random', 'synthetic'); default 'random'"),
    ({"model.preset": "r1"}, "config.model.preset='r1': one of ("),
    ({"model.dtype": "fp8"}, "config.model.dtype='fp8': ModelConfig.dtype must be one of float32, bfloat16"),
    ({"model.checkpoint": "/nonexistent"}, "config.model.checkpoint='/nonexistent': '' (random weights) or a "
                                           "checkpoint directory"),
    ({"model.weights": "synthetic"}, "config.model.weights='synthetic' generates the weights"),
    ({"model.checkpoint": "", "model.num_hidden_layers": 1}, "config.model.num_hidden_layers=1: the model needs a "
                                                             "MoE layer"),
    ({"workload.dataset": "/nonexistent/file.jsonl"}, "config.workload.dataset='/nonexistent/file.jsonl': "),
    ({"workload.input_ratio": -0.5}, "config.workload.input_ratio=-0.5: a number in [0.0, 1.0]"),
    ({"max_num_tokens": 64}, "config.max_num_tokens=64: 32 request(s) longer than max_num_tokens=64"),
    ({"token_buckets": 5}, "config.token_buckets must be >= 1 and divide max_num_tokens=384, got 5"),
    ({"repeats": 0}, "config.repeats=0: an integer >= 1; default 1"),
    ({"memory_fraction": 0.0}, "config.memory_fraction=0.0: a number in (0.0, 1.0]"),
    ({"strategies": "dwdp,dwdp"}, "config.strategies='dwdp,dwdp': a comma list of distinct names from"),
    ({"dep.balance": "random"}, "config.dep.balance='random': one of ('tokens', 'requests'); default 'tokens'"),
    ({"dep.num_ranks": 3}, "config.dep.num_ranks: DEP's 3 ranks must divide the model's 16 experts"),
    ({"dwdp.packing": "best"}, "config.dwdp.packing='best': one of ('lookahead', 'fcfs')"),
    ({"dwdp.pull_issue": "early"}, "config.dwdp.pull_issue='early': one of ('after_moe', 'after_attention')"),
    ({"dwdp.pull_issue": "after_attention", "dwdp.prefetch": False},
     "config.dwdp: DwdpOptions.pull_issue='after_attention' places prefetched pulls"),
    ({"dwdp.timeline": True}, "config.dwdp: DwdpOptions.timeline needs transport='copy_engine'"),
    ({"dwdp.local_experts": 5}, "config.num_ranks=4, config.dwdp.local_experts=5: "),
    ({"variants": "oops"}, "config.variants: 'oops' needs a new name"),
    ({"variants": "a:isl=x"}, "config.variants 'a': isl='x' is not a int"),
    ({"variants": "a:max_len=9"}, "config.variants 'a': 'max_len=9' must be field=value with a field in"),
    ({"variants": "a:isl=100000"}, "config.variants 'a': "),
    ({"variants": "a:input_ratio=2.0"}, "config.variants 'a': input_ratio must be in [0, 1]"),
    ({"variants": "a:max_num_tokens=100"},
     "config.variants 'a': max_num_tokens must be one of the run's token buckets [96, 192, 288, 384], got 100"),
    ({"run": "a/b"}, "config.run='a/b': empty or a name without '/'"),
])
def test_bad_field_is_named_with_what_it_allows(tmp_path, changes, message):
    with pytest.raises(ValueError) as e:
        validation.validate(config_with(tmp_path, **changes))
    assert message in str(e.value)


def test_paths_must_be_usable(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "module_0001.txt").write_text("")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="config.trace='.*used': '' \\(no trace\\) or a new or empty directory"):
        validation.validate(config_with(tmp_path, trace=str(tmp_path / "used")))
    with pytest.raises(ValueError, match="config.results_root='.*file/results': a directory that exists or can be "
                                         "created; .*file is a file"):
        validation.validate(config_with(tmp_path, results_root=str(tmp_path / "file" / "results")))
    with pytest.raises(ValueError, match="config.compilation_cache='.*file/cache': '' \\(off\\) or a directory that "
                                         "exists or can be created; .*file is a file"):
        validation.validate(config_with(tmp_path, compilation_cache=str(tmp_path / "file" / "cache")))
    validation.validate(config_with(tmp_path, trace=str(tmp_path / "new" / "trace")))
    validation.validate(config_with(tmp_path, compilation_cache=""))


def test_ragged_dispatch_is_refused_on_cpu_before_building(tmp_path):
    with pytest.raises(ValueError, match=r"config.dep.dispatch='ragged': XLA:CPU has no ragged_all_to_all"):
        validation.plan(config_with(tmp_path, **{"dep.dispatch": "ragged"}))


def test_validation_starts_no_backend():
    proc = subprocess.run([sys.executable, "-c", "from jax._src import xla_bridge\n"
                           "from configs.context_bench import get_config\nfrom dwdp_jax import validation\n"
                           "validation.validate(get_config())\nassert not xla_bridge.backends_are_initialized()"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_dispatch_fails_in_seconds_naming_field_allowed_and_default(tmp_path):
    proc, seconds = context_bench("--config.dep.dispatch=bogus", f"--config.results_root={tmp_path}")
    assert proc.returncode == 2 and seconds < 15, (seconds, proc.stderr[-2000:])
    assert "config.dep.dispatch='bogus': one of ('auto', 'dense', 'ragged')" in proc.stderr
    assert "default 'auto'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,message", [
    ("--config.cpu_devices=0", "context_bench: invalid input: config.cpu_devices=0: an integer >= 1"),
    ("--config.verify.num_requests=-1", "context_bench: invalid input: config.verify.num_requests=-1: an integer"),
    ("--config.dep.dispach=dense", "--config.dep.dispach: no such config field; nearest: config.dep.dispatch"),
    ("--config.num_ranks=two", "flag --config.num_ranks=two: invalid literal for int()"),
    ("--config=configs/context_bench.py:r2", "--config=configs/context_bench.py:r2: unknown context_bench config"),
    ("--config.num_ranks=16", "config.num_ranks=16 (DWDP 16, DEP 16) needs as many devices, and this CPU run has 4 "
                              "virtual ones: raise config.cpu_devices"),
    ("--config.dep.num_ranks=8", "config.num_ranks=4 (DWDP 4, DEP 8) needs as many devices, and this CPU run has 4 "
                                 "virtual ones: raise config.cpu_devices"),
])
def test_bad_command_line_exits_2_in_one_line(flag, message):
    proc, _ = context_bench(flag)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def cpu_doc(sync_overhead: float, band: list[float], functional: bool = True, passes: int = 1) -> dict:
    """A results document as bench.run returns it, of two strategies on four devices."""
    def strategy(tps):
        return {"tps_per_gpu": tps, "tps_per_gpu_band": [tps * 0.9, tps * 1.1] if passes > 1 else [tps, tps],
                "repeats_tps_per_gpu": [tps] * passes, "ttft_p50_s": 0.6, "ttft_p90_s": 0.8, "iteration_p50_s": 0.4}

    m = {"dwdp": strategy(843.1), "dep": strategy(710.7)}
    m["dep"].update(sync_overhead=sync_overhead, sync_overhead_band=band, sampled_steps=8, rank_cv_mean=0.009,
                    sync_overhead_within_noise=metrics.within_noise(band))
    m["ratio"] = report.ratios(m["dwdp"], m["dep"])
    timing = {"functional_check": functional, "platform": "cpu" if functional else "gpu", "devices": 4,
              "host_cores": 2, "passes": passes}
    return {"path": "results/x.json", "metrics": m, "verification": {"dwdp": {"passed": True}, "dep": {"passed": True}},
            "hlo_collectives": {}, "timing": timing,
            "breakdown": {"dep": {"communication": {"bytes_per_rank": 1e5, "gbps_per_rank": 0.1}}}}


def test_cpu_table_is_a_functional_check_without_speed_claims_or_negative_overhead():
    table = report.format_table(cpu_doc(-0.114, [-0.3, 0.07]))
    assert table.startswith("FUNCTIONAL CHECK, no speed claim: 4 virtual CPU devices share 2 host cores")
    assert "one pass per strategy: no noise band" in table and "(1 pass)" in table
    assert "speedup" not in table and not re.search(r"-\d[\d.]*%", table)
    assert "DEP synchronization overhead within noise (band [0.0%, 7.0%] over 8 sampled steps)" in table
    assert "GB/s per rank: copies between virtual CPU devices in host memory, not a link's speed" in table


def test_gpu_table_reports_bands_and_an_overhead_beyond_noise():
    table = report.format_table(cpu_doc(0.104, [0.05, 0.16], functional=False, passes=3))
    assert table.startswith("4 GPU devices; TPS/GPU: the median of 3 passes, [min, max] beside it")
    assert "[758.8, 927.4]" in table and "TTFT p50 speedup" in table and "FUNCTIONAL" not in table
    assert "DEP synchronization overhead 10.4% (band [5.0%, 16.0%] over 8 sampled steps)" in table
    assert "DWDP/DEP TPS/GPU 1.186 [0.971, 1.450]" in table


def test_sync_overhead_band_is_two_standard_errors_of_the_weighted_mean():
    step_s, alone_s = [1.0, 1.0], [[0.8, 0.8], [1.0, 1.0]]  # per step 20% and 0%
    lo, hi = metrics.sync_overhead_band(step_s, alone_s)
    assert (lo, hi) == pytest.approx((-0.1, 0.3))  # 10% +- 2 x (std 14.1% / sqrt 2)
    assert metrics.within_noise((lo, hi))
    assert metrics.sync_overhead_band([1.0], [[0.8, 0.8]]) == pytest.approx((0.2, 0.2))
    assert not metrics.within_noise((0.2, 0.2)) and metrics.within_noise((-0.1, -0.1))


def test_progress_shows_in_the_first_seconds(tmp_path):
    """The run announces its phases on stderr from the start (the warm-up alone compiles for a minute on CPU)."""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.context_bench", f"--config.results_root={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, lines = time.perf_counter(), queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        seen = []
        while not any("params:" in line for line in seen):
            seen.append(lines.get(timeout=max(30 - (time.perf_counter() - start), 0.01)))
    except queue.Empty:
        pytest.fail(f"no progress within 30 s: {seen}")
    finally:
        proc.kill()
        proc.wait()
    assert any(re.match(r"\[\s*\d+\.\d s\] plan: ", line) for line in seen)


def test_fp8_experts_need_fp8_tensor_cores():
    from types import SimpleNamespace

    from dwdp_jax.kernels import fp8

    cards = {"8.0": False, "8.6": False, "8.9": True, "9.0": True, "10.0": True}
    for cc, has in cards.items():
        assert fp8.has_fp8_tensor_cores(SimpleNamespace(platform="gpu", compute_capability=cc)) is has, cc
