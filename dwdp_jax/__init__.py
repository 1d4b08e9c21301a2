"""dwdp-jax: Distributed Weight Data Parallelism for DeepSeek-R1-class MoE inference in JAX.

The package's own __init__ imports nothing: the models import `dwdp_jax.kernels`, which runs this file first, so
anything imported here that needs the models (the checkpoint loader, the runtimes) would close a circle. Import
the public entry points from their modules: `dwdp_jax.checkpoint.load_hf_checkpoint`,
`dwdp_jax.runtime.reference.prefill_logits`.
"""
