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
from dwdp_jax import compile_cache
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

print(json.dumps([program(jax.device_put(x, d)).tolist() for d in jax.devices()]))
"""


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith("jit_program-") and p.name.endswith("-cache"))


def run(cache: Path, mode: str) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_one_entry_serves_every_device(tmp_path):
    enabled, plain = tmp_path / "enabled", tmp_path / "plain"
    outputs = run(enabled, "enable")
    assert len(entries(enabled)) == 1  # compiled on device 0, loaded on devices 1-3
    assert all(o == outputs[0] for o in outputs)
    assert run(plain, "plain") == outputs
    assert len(entries(plain)) == 4  # jax's own key on CPU: one entry per device
    assert run(enabled, "enable") == outputs and len(entries(enabled)) == 1  # a second run reads the entry
