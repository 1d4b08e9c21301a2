"""XLA's persistent compilation cache, one entry per program whatever device runs it.

A DWDP rank runs its own programs: the same HLO on every device of the group, compiled once per device. On GPU jax
keys the persistent cache without the device assignment (so that processes share programs) and loads an entry onto
whichever device asks; a CPU program's key holds its devices, so the virtual CPU devices of a development run each
compiled every program again. Here the key leaves the assignment out on every platform: the tiny main job on 2 cores
took 101 s without the cache, 64 s on an empty one and 34 s once its programs were cached (WORKSPACE 2026-12-07 j).
Programs carrying host callbacks (the copy-engine transport's fences, cuBLASLt through `buffer_callback`) never enter
the cache: jax refuses to write them."""

from __future__ import annotations

import inspect
import os

import jax


def enable(directory: str) -> None:
    """Every compiled program written to and read from `directory` (created if missing), however short its compile:
    a tiny model's programs compile in under a second each, below jax's default threshold."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _one_entry_for_every_device()


def _one_entry_for_every_device() -> None:
    """jax 0.10-0.11's private key function with the device assignment always stripped, as jax strips it on GPU;
    left alone where its signature differs (a speed-up only, never a change of what runs)."""
    from jax._src import cache_key

    hash_options = cache_key._hash_serialized_compile_options
    if getattr(hash_options, "strips_devices", False):
        return
    if "strip_device_assignment" not in inspect.signature(hash_options).parameters:
        return

    def stripped(hash_obj, options, strip_device_assignment=False):
        return hash_options(hash_obj, options, True)

    stripped.strips_devices = True
    cache_key._hash_serialized_compile_options = stripped
