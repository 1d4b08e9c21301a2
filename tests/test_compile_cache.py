"""The persistent compilation cache: one entry serves a program on every device, loaded there with its results equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the same program on each of 4 virtual CPU devices, in a fresh process on an empty cache
SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from dwdp_jax import compile_cache
hits = []  # programs loaded from the persistent cache
monitoring.register_event_listener(lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None)
jax.config.update("jax_num_cpu_devices", 4)
if sys.argv[2] == "enable":
    compile_cache.enable(sys.argv[1])
else:  # jax's own cache: keyed by the devices
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
x = jnp.arange(64.0).reshape(8, 8) / 64

@jax.jit
def program(x):
    return jnp.tanh(x @ x.T).sum(axis=1)

outputs, loaded = [], []
for xd in [jax.device_put(x, d) for d in jax.devices()]:
    before = len(hits)
    outputs.append(program(xd).tolist())
    loaded.append(len(hits) - before)
print(json.dumps([outputs, loaded]))
"""


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith("jit_program-") and p.name.endswith("-cache"))


def run(cache: Path, mode: str) -> tuple[list, list]:
    """(the program's output on each device, whether the program was loaded from the cache there: 1 or 0)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tuple(json.loads(proc.stdout.splitlines()[-1]))


def test_one_entry_serves_every_device(tmp_path):
    enabled, plain = tmp_path / "enabled", tmp_path / "plain"
    outputs, loaded = run(enabled, "enable")
    assert len(entries(enabled)) == 1 and loaded == [0, 1, 1, 1]  # compiled on device 0, loaded on devices 1-3
    assert all(o == outputs[0] for o in outputs)
    assert run(plain, "plain") == (outputs, [0, 0, 0, 0])  # jax's own key on CPU: compiled on every device
    assert len(entries(plain)) == 4
    # a second process loads the program on all 4 devices
    assert run(enabled, "enable") == (outputs, [1, 1, 1, 1]) and len(entries(enabled)) == 1
