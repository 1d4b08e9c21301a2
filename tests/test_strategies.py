"""The strategies behind one interface: the reference serves like DWDP and DEP, the stages after planning read the
typed plan only, and a new strategy needs a registry entry, not a driver change."""

import ast
from pathlib import Path

import numpy as np
import pytest

from dwdp_jax import bench, memory, strategies, validation
from dwdp_jax.packing import pack
from dwdp_jax.runtime import reference
from models import deepseek_v3
from test_bench import small_config

ROOT = Path(__file__).resolve().parents[1]


def test_reference_runtime_steps_like_the_one_program_prefill():
    """The staged reference (front, one program per MoE layer, head) against `reference.prefill`, fp32."""
    cfg = small_config(Path("/nonexistent"))
    p = validation.plan(cfg)
    params = reference.Params(*deepseek_v3.init_model(p.cfg, seed=0))
    batch = pack([[5, 7, 9, 11, 3], [2, 4], [8] * 9], budget=32)
    runtime = reference.ReferenceRuntime(params, p.devices[0])
    ours, want = runtime.step(0, batch).output, reference.prefill(params, batch)
    err = np.linalg.norm(ours.logits_TV - want.logits_TV) / np.linalg.norm(want.logits_TV)
    assert err < 1e-5, err
    assert all((a == b).all() for a, b in zip(ours.expert_ids, want.expert_ids, strict=True))
    last = reference.ReferenceRuntime(params, p.devices[0], last_token_logits=4).step(0, batch).output
    np.testing.assert_allclose(last.logits_TV, want.logits_TV[batch.last_token_index()], rtol=1e-5, atol=1e-5)
    # a second runtime over the first's experts holds no copy of its own and computes the same step
    shared = reference.ReferenceRuntime(params, p.devices[0], expert_views=runtime.expert_views)
    assert all(a is b for a, b in zip(shared.expert_views, runtime.expert_views, strict=True))
    np.testing.assert_array_equal(shared.step(0, batch).output.logits_TV, ours.logits_TV)
    with pytest.raises(ValueError, match="expert_views must hold"):
        reference.ReferenceRuntime(params, p.devices[0], expert_views=runtime.expert_views[:-1])
    profiled = runtime.step(0, batch, profile=True)
    assert profiled.stages_s["moe"] > 0 and profiled.stages_s["attention"] > 0
    with pytest.raises(ValueError, match="the reference runs on one rank"):
        runtime.step(1, batch)


def test_reference_dwdp_and_dep_served_side_by_side(tmp_path):
    c = small_config(tmp_path, strategies="reference,dwdp,dep")
    doc = bench.run(c)
    assert list(doc["metrics"])[:3] == ["reference", "dwdp", "dep"] and "ratio" in doc["metrics"]
    for name in ("reference", "dwdp", "dep"):
        v = doc["verification"][name]
        assert v["passed"] and v["rel_err"] <= c.verify.rel_tol and v["expert_id_match"] == 1.0, (name, v)
    assert doc["metrics"]["reference"]["num_requests"] == c.workload.num_requests
    assert not any(doc["hlo_collectives"]["reference"].values())
    assert not any(doc["hlo_collectives"]["dwdp"].values()) and doc["hlo_collectives"]["dep"]["step"] > 0


def test_the_reference_alone_runs_on_one_device(tmp_path):
    """No DWDP group to place: one rank is a valid run of the single-device baseline."""
    doc = bench.run(small_config(tmp_path, strategies="reference", num_ranks=1, breakdown=True,
                                 **{"verify.num_requests": 4}))
    assert list(doc["metrics"]) == ["reference"] and doc["verification"]["reference"]["passed"]
    breakdown = doc["breakdown"]["reference"]
    assert breakdown["attention"]["ms"] > 0 and breakdown["grouped_gemm"]["ms"] > 0
    with pytest.raises(ValueError, match="config.num_ranks=1, config.dwdp.local_experts=0: Placement.num_ranks must "
                                         "be >= 2"):
        validation.validate(small_config(tmp_path, strategies="reference,dwdp", num_ranks=1))


def test_the_depth_fits_every_planned_strategy(tmp_path):
    """With the reference in the run, the depth is the one at which all of the model sits on one device."""
    p = validation.validate(small_config(tmp_path, **{"model.num_hidden_layers": 12}))
    device_bytes = memory.plan_reference(p.cfg.replace(num_hidden_layers=6), p.batching.max_num_tokens,
                                         attention_impl="flash").total_bytes
    p.strategies = ("dwdp",)
    alone = validation.depth_that_fits(p, device_bytes)
    assert memory.plan_dwdp(p.cfg.replace(num_hidden_layers=alone), p.placement, p.batching.max_num_tokens,
                            attention_impl="flash").total_bytes <= device_bytes
    p.strategies = ("reference", "dwdp")
    assert validation.depth_that_fits(p, device_bytes) == 6 < alone
    with pytest.raises(ValueError, match="no depth of the model fits .* at one MoE layer, reference: does not fit"):
        validation.depth_that_fits(p, device_bytes // 4)


PLANNED_STAGES = ("dwdp_jax/strategies.py", "dwdp_jax/serving/loop.py", "dwdp_jax/profiling.py",
                  "dwdp_jax/verification.py", "dwdp_jax/report.py")


@pytest.mark.parametrize("path", PLANNED_STAGES)
def test_stages_after_planning_read_the_plan_not_the_config(path):
    """The config is read once, into `run_plan.Plan`: no function of the later stages takes it."""
    takers = [f"{node.name}({arg.arg})" for node in ast.walk(ast.parse((ROOT / path).read_text()))
              if isinstance(node, ast.FunctionDef) for arg in node.args.args + node.args.kwonlyargs
              if arg.arg in ("c", "config")]
    assert not takers, takers


def test_a_new_strategy_is_a_registry_entry(tmp_path, monkeypatch):
    class TwoEngines(strategies.Dwdp):
        name = "dwdp_again"

    monkeypatch.setitem(strategies.REGISTRY, TwoEngines.name, TwoEngines)
    doc = bench.run(small_config(tmp_path, strategies="dwdp,dwdp_again"))
    assert doc["verification"]["dwdp_again"]["passed"]
    assert doc["metrics"]["dwdp_again"]["num_requests"] == doc["metrics"]["dwdp"]["num_requests"]
    with pytest.raises(ValueError, match="a comma list of distinct names from .*'reference', 'dwdp', 'dep'"):
        validation.validate(small_config(tmp_path, strategies="dwdp,nope"))
