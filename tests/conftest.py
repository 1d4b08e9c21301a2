"""CPU virtual devices for multi-device tests: must run before JAX initializes its backend."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

# The longest test files first: with `--dist loadfile` a worker runs one file at a time, and a long file collected
# last would run alone while the other worker idles (about 3 minutes each, on 2 CPU cores).
LONGEST_FIRST = ("test_multiprocess.py", "test_split_gemm_mgpu.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order
