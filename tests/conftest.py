"""CPU virtual devices for multi-device tests: must run before JAX initializes its backend. GPU tests run with
fp32 dots at full precision: their oracles are fp32 products computed by XLA, which NVIDIA GPUs otherwise take in
TF32 (JAX's default precision there), a 10-bit mantissa that would blur the tolerances the tests assert."""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True)
def _fp32_oracles_on_gpu(request):
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    with jax.default_matmul_precision("float32"):
        yield
