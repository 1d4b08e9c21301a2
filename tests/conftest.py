"""CPU virtual devices for multi-device tests: must run before JAX initializes its backend. GPU tests run with
fp32 dots at full precision: their oracles are fp32 products computed by XLA, which NVIDIA GPUs otherwise take in
TF32 (JAX's default precision there), a 10-bit mantissa that would blur the tolerances the tests assert.

Compiled programs go to XLA's persistent cache in the checkout's `.jax_cache` (ignored by git), which the pytest
workers and the processes the multi-process tests start share (set through the environment, which they inherit):
most of the suite's time is compiling, and the end-to-end tests compile the same tiny programs."""

import os
from pathlib import Path

import jax
import pytest

for _key, _value in (("jax_compilation_cache_dir", str(Path(__file__).resolve().parents[1] / ".jax_cache")),
                     ("jax_persistent_cache_min_compile_time_secs", 0), ("jax_persistent_cache_min_entry_size_bytes", 0)):
    os.environ.setdefault(_key.upper(), str(_value))
    jax.config.update(_key, type(_value)(os.environ[_key.upper()]))
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True)
def _fp32_oracles_on_gpu(request):
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    with jax.default_matmul_precision("float32"):
        yield
