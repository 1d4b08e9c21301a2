"""CPU virtual devices for multi-device tests: must run before JAX initializes its backend."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
