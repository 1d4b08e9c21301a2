"""The kernel block cache: recorded blocks come back for their shape and card, the kernels use them when they
trace, and a malformed cache is refused naming the file and the field."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.kernels import tuning
from dwdp_jax.kernels.split_gemm import Blocks, split_ragged_dot
from dwdp_jax.kernels.split_gemm_mgpu import MgpuBlocks

ROOT = Path(__file__).resolve().parents[1]


def test_recorded_blocks_come_back_nearest_in_rows(tmp_path):
    path = tmp_path / "blocks.json"
    small, large = Blocks(block_n=64), Blocks(block_n=256, group_m=16, per_group=True)
    tuning.record("split_triton", "H200", 7168, 2048, True, 32768, small, 400.0, "test", path)
    tuning.record("split_triton", "H200", 7168, 2048, True, 262144, large, 500.0, "test", path)
    tuning.record("split_mgpu", "H200", 7168, 2048, True, 262144, MgpuBlocks(tile_n=64, chain=True), 510.0, "t", path)
    assert tuning.lookup("split_triton", Blocks, "H200", 7168, 2048, True, 40000, path) == small
    assert tuning.lookup("split_triton", Blocks, "H200", 7168, 2048, True, 131072, path) == large  # log scale
    assert tuning.lookup("split_mgpu", MgpuBlocks, "H200", 7168, 2048, True, 1, path) == MgpuBlocks(tile_n=64,
                                                                                                     chain=True)
    for other in [("H100", 7168, 2048, True), ("H200", 2048, 7168, True), ("H200", 7168, 2048, False)]:
        assert tuning.lookup("split_triton", Blocks, *other, 262144, path) is None
    assert tuning.lookup("split_triton", Blocks, "H200", 7168, 2048, True, 8, tmp_path / "absent.json") is None
    # recording the same problem again replaces its entry
    tuning.record("split_triton", "H200", 7168, 2048, True, 32768, Blocks(block_n=32), 410.0, "test", path)
    assert len(tuning.read(path)) == 3
    assert tuning.lookup("split_triton", Blocks, "H200", 7168, 2048, True, 32768, path) == Blocks(block_n=32)


def test_the_fastest_kernel_is_picked_per_problem_by_its_cached_rate(tmp_path):
    path, both = tmp_path / "blocks.json", ("split_triton", "split_mgpu")
    tuning.record("split_triton", "H200", 7168, 2048, True, 262144, Blocks(), 510.0, "t", path)
    tuning.record("split_mgpu", "H200", 7168, 2048, True, 262144, MgpuBlocks(tile_n=64), 565.0, "t", path)
    tuning.record("split_triton", "H200", 2048, 7168, False, 262144, Blocks(), 582.0, "t", path)
    tuning.record("split_mgpu", "H200", 2048, 7168, False, 262144, MgpuBlocks(), 563.0, "t", path)
    tuning.record("split_mgpu", "H200", 2048, 7168, False, 8192, MgpuBlocks(), 900.0, "t", path)  # far in rows
    assert tuning.fastest(both, "H200", 7168, 2048, True, 236000, path) == "split_mgpu"
    assert tuning.fastest(both, "H200", 2048, 7168, False, 236000, path) == "split_triton"
    assert tuning.fastest(both, "H200", 2048, 7168, False, 8192, path) == "split_mgpu"
    assert tuning.fastest(("split_triton",), "H200", 7168, 2048, True, 236000, path) == "split_triton"
    assert tuning.fastest(both, "H100", 7168, 2048, True, 236000, path) is None


def test_the_default_split_backend_runs_the_faster_kernel_of_each_projection(tmp_path, monkeypatch):
    from dwdp_jax.kernels import gpu, grouped_gemm

    path, kind = tmp_path / "blocks.json", jax.devices()[0].device_kind
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(path))
    tuning.record("split_mgpu", kind, 64, 32, True, 96, MgpuBlocks(), 2.0, "t", path)  # gate/up: Mosaic GPU
    tuning.record("split_triton", kind, 64, 32, True, 96, Blocks(), 1.0, "t", path)
    tuning.record("split_triton", kind, 32, 64, False, 96, Blocks(), 1.0, "t", path)  # down: Triton only
    calls = []

    def fake(name):
        def kernel(x_MK, group_sizes_G, weights, *, fused=False, interpret=False):
            calls.append((name, fused))
            return jnp.zeros((x_MK.shape[0], 32 if fused else 64), x_MK.dtype)
        return kernel

    monkeypatch.setattr(gpu, "SPLIT_KERNELS", {name: fake(name) for name in gpu.SPLIT_KERNELS})
    slab = type("Slab", (), dict(w_gate_EDF=jnp.ones((2, 64, 32), jnp.bfloat16),
                                 w_up_EDF=jnp.ones((2, 64, 32), jnp.bfloat16),
                                 w_down_EFD=jnp.ones((2, 32, 64), jnp.bfloat16)))
    y = grouped_gemm.get_split_backend("pallas_split")(jnp.ones((96, 64), jnp.bfloat16), jnp.array([40, 50]), (slab,))
    assert calls == [("split_mgpu", True), ("split_triton", False)] and y.shape == (96, 64)


@pytest.mark.parametrize("doc,message", [
    ("not json", "not readable JSON"),
    ({"version": 2, "entries": []}, "needs {'version': 1"),
    ({"version": 1, "entries": [{"kernel": "split_triton"}]}, "entries[0].device_kind must be a str"),
    ({"version": 1, "entries": [{"kernel": "k", "device_kind": "d", "k": 8, "n": 8, "fused": 1, "rows": 8,
                                 "blocks": {}, "tflops": 1.0, "measured": ""}]}, "entries[0].fused must be a bool"),
    ({"version": 1, "entries": [{"kernel": "k", "device_kind": "d", "k": 0, "n": 8, "fused": True, "rows": 8,
                                 "blocks": {}, "tflops": 1.0, "measured": ""}]}, "needs k, n and rows >= 1"),
])
def test_a_malformed_cache_is_refused_naming_the_field(tmp_path, doc, message):
    path = tmp_path / "blocks.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        tuning.lookup("split_triton", Blocks, "d", 8, 8, True, 8, path)
    assert str(path) in str(e.value)


def test_unknown_block_fields_are_refused(tmp_path):
    path = tmp_path / "blocks.json"
    tuning.record("split_triton", "cpu", 64, 128, False, 256, MgpuBlocks(), 1.0, "test", path)
    with pytest.raises(ValueError, match="unknown fields"):
        tuning.lookup("split_triton", Blocks, "cpu", 64, 128, False, 256, path)


def _grid(blocks=None) -> int:
    x = jnp.ones((320, 64), jnp.bfloat16)  # a shape no other test traces: the jit cache holds a trace per shape
    w = jnp.ones((4, 64, 128), jnp.bfloat16)
    split_ragged_dot.clear_cache()
    jaxpr = str(jax.make_jaxpr(lambda x, gs, w: split_ragged_dot(x, gs, (w,), blocks=blocks, interpret=True))(
        x, jnp.array([80, 80, 80, 80], jnp.int32), w))
    return int(re.search(r"grid=\((\d+),\)", jaxpr).group(1))


def test_the_kernel_traces_with_the_cached_blocks(tmp_path, monkeypatch):
    path = tmp_path / "blocks.json"
    monkeypatch.setenv("DWDP_KERNEL_BLOCKS", str(path))
    default = _grid()
    tuning.record("split_triton", jax.devices()[0].device_kind, 64, 128, False, 320, Blocks(block_n=32), 1.0, "t")
    assert _grid() == 4 * default == _grid(Blocks(block_n=32))  # 4 column blocks of 32 instead of one of 128
    # and the output is still right with them
    x = jax.random.normal(jax.random.key(0), (320, 64), jnp.float32).astype(jnp.bfloat16)
    w = (0.1 * jax.random.normal(jax.random.key(1), (4, 64, 128), jnp.float32)).astype(jnp.bfloat16)
    gs = jnp.array([100, 0, 150, 70], jnp.int32)
    ours = split_ragged_dot(x, gs, (w,), interpret=True).astype(jnp.float32)
    ref = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    assert float(jnp.linalg.norm(ours - ref) / jnp.linalg.norm(ref)) < 1e-2
    split_ragged_dot.clear_cache()
    np.testing.assert_equal(tuning.read(path)[0]["blocks"]["block_n"], 32)


@pytest.mark.parametrize("flags,message", [(["--tune", "--nosweep"], "it needs --sweep"), ([], "needs a GPU")])
def test_bench_grouped_gemm_exits_2_on_cpu_or_tune_without_sweep(flags, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_grouped_gemm", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("module,flag,message", [
    ("bench_grouped_gemm", "--routing=zipf", "value should be one of <skewed|uniform>"),
    ("gpu_calibration", "--sustain_s=-1", "sustain_s"),
    ("bench_attention", "--burst_idle_s=-1", "burst_idle_s"),
    ("bench_attention", "--bursts=0", "bursts"),
    ("bench_attention", "--backends=tokamax,flash", "--backends: unknown ['flash']"),
    ("bench_fp8_gemm", "--rel_tol=-1", "rel_tol"),
    ("bench_fp8_gemm", "--with_option=overwrite", "with_option ['overwrite']: not fields of"),
    ("bench_fp8_dense", "--tune --with_option=overwrite", "with_option ['overwrite']: not fields of Fp8Blocks"),
    ("bench_fp8_dense", "--with_option=cluster_m", "--with_option narrows the sweep: it needs --tune"),
])
def test_gpu_benchmarks_refuse_bad_flags_before_any_device_work(module, flag, message):
    proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", *flag.split()], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr and "needs a GPU" not in proc.stderr, proc.stderr[-2000:]
