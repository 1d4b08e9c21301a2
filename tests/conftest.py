"""CPU virtual devices for multi-device tests: must run before JAX initializes its backend. GPU tests run with
fp32 dots at full precision: their oracles are fp32 products computed by XLA, which NVIDIA GPUs otherwise take in
TF32 (JAX's default precision there), a 10-bit mantissa that would blur the tolerances the tests assert.

Compiled programs go to XLA's persistent cache in the checkout's `.jax_cache` (ignored by git), which the pytest
workers and the processes the multi-process tests start share (set through the environment, which they inherit):
most of the suite's time is compiling, and the end-to-end tests compile the same tiny programs. For the same
reason the GPU suite runs in two workers sharing the card (README).

Where no CUDA plugin is installed, XLA compiles with LLVM's optimizations off (`--xla_backend_optimization_level=0`,
appended to XLA_FLAGS, which the processes the tests start inherit): the tests' programs are tiny, so compiling is
their cost and running them is not, and the programs that carry host callbacks (the copy-engine transport's
fences) never enter the persistent cache. The level changes code generation, not the operations' semantics: the
tolerances and bit-for-bit comparisons hold at it, between programs compiled alike. One cache entry serves a
program on every device (`compile_cache`), as in the main job."""

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import jax
import pytest

from dwdp_jax import compile_cache


def _cuda_plugin_installed() -> bool:
    """jax's CUDA plugin, as a module or as an installed distribution (jax-cuda12-plugin, jax-cuda13-pjrt, ...)."""
    return (any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
            or any((d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
                   for d in importlib.metadata.distributions()))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers of `pytest -m gpu -n 2` share one GPU: each allocates what it uses, not 75% of the card, and its
    # pool (which keeps what it grew to) stops at its share of 90%, so one worker cannot starve the other.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                          f"{0.9 / int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')):.3f}")
if not _cuda_plugin_installed():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# the environment carries the cache to the processes the multi-process tests start
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
compile_cache.enable(os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True)
def _fp32_oracles_on_gpu(request):
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    with jax.default_matmul_precision("float32"):
        yield
