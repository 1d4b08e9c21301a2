"""dwdp-jax: Distributed Weight Data Parallelism for DeepSeek-R1-class MoE inference in JAX."""

import importlib

# Lazy public API: the model package imports dwdp_jax.kernels, so importing the runtimes eagerly here would
# make a cycle.
_PUBLIC = {
    "load_hf_checkpoint": "dwdp_jax.checkpoint",
    "prefill_logits": "dwdp_jax.runtime.reference",
}


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dwdp_jax' has no attribute {name!r}")
