"""CUDA VMM across two processes sharing one GPU: the bytes a peer pulls from an owner's exported allocation
(poisoned destinations), zero-copy import into JAX, and a two-process DWDP group whose slabs live in VMM memory,
pulled by the copy engine and by XLA slices, against the reference. GPU only."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu():
    import jax

    return jax.devices()[0].platform == "gpu"


def test_vmm_pull_moves_the_right_bytes_and_reports_bandwidth(tmp_path, monkeypatch):
    if not _gpu():
        pytest.skip("needs a GPU")
    # The suite's own process holds its JAX pool on the GPU (75% by default): the two benchmark processes get 0.1 each
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.1")
    from experiments.bench_vmm import WAIT_S

    out = tmp_path / "vmm.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench_vmm", "--mib=1024", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=2 * WAIT_S + 60)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    print(json.dumps(results))
    assert results["zero_copy"] and results["copy_engine_bytes_match"] and results["xla_bytes_match"]
    assert results["copy_engine_gbps"] > 50 and results["xla_pull_gbps"] > 50
    assert results["fabric"] == "created" or "fabric" in results["fabric"]


@pytest.mark.parametrize("transport", ["copy_engine", "device_put"])
def test_dwdp_group_of_two_processes_on_vmm_equals_the_reference(tmp_path, monkeypatch, transport):
    if not _gpu():
        pytest.skip("needs a GPU")
    from dwdp_jax.distributed import launch
    from dwdp_jax.distributed.spec import Spec, verify_batches
    from dwdp_jax.runtime.reference import prefill
    from models import deepseek_v3 as M
    from models.deepseek_v3 import Params

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")
    spec = Spec.of(group_size=2, strategies=["dwdp"], start_timeout_s=120.0, step_deadline_s=120.0,
                   transport=transport)
    result = launch.run(spec, str(tmp_path), timeout_s=400, platform="gpu")
    logs = "\n".join(open(p).read()[-2000:] for p in tmp_path.glob("log_*.txt"))
    assert result["finished"] and all(p["exit"] == 0 for p in result["processes"]), logs
    params = Params(*M.init_model(spec.model_config(), seed=spec.seed))
    outputs = {}
    for path in tmp_path.glob("outputs_p*.npz"):
        outputs.update(np.load(path))
    worst = 0.0
    for rank in range(2):
        for i, batch in enumerate(verify_batches(spec, rank)):
            ref = prefill(params, batch)
            got = outputs[f"dwdp/{rank}/{i}/logits"]
            worst = max(worst, float(np.linalg.norm(got - ref.logits_TV) / np.linalg.norm(ref.logits_TV)))
    print(f"worst relative logits error {worst:.2e}")
    assert worst <= 2e-3
    for p in tmp_path.glob("report_p*.json"):
        rep = json.loads(p.read_text())
        assert all(v == 0 for v in rep["dwdp"]["collectives"].values())
        assert rep["dwdp"]["bytes_pulled"] == rep["dwdp"]["bytes_planned"]
        # the owner's programs read its slabs from its VMM allocation: one copy of the weights
        assert rep["dwdp"]["slabs_in_shared_segment"] and all(rep["dwdp"]["slabs_in_shared_segment"].values())
        print(p.name, rep["dwdp"])
