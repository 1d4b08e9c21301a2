"""DWDP and DEP on the multi-controller runtime, CPU processes: logits against the single-process reference,
no collective in DWDP's programs, bytes pulled as planned, groups behind the router with one rank killed, and
launches that cannot work failing fast on every process."""

import glob
import json
import time

import numpy as np
import pytest

from dwdp_jax.distributed import launch
from dwdp_jax.distributed.spec import Spec, verify_batches
from dwdp_jax.runtime.reference import prefill
from models import deepseek_v3 as M
from models.deepseek_v3 import Params


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def outcome_text(result):
    return json.dumps(result["processes"], indent=1)


@pytest.mark.parametrize("processes,devices_per_process,transport", [(2, 2, "copy_engine"), (4, 1, "device_put")])
def test_dwdp_and_dep_across_processes_equal_the_reference(tmp_path, processes, devices_per_process, transport):
    spec = Spec.of(group_size=processes * devices_per_process, devices_per_process=devices_per_process,
                   transport=transport)
    result = launch.run(spec, str(tmp_path), timeout_s=240)
    assert result["finished"] and all(p["exit"] == 0 for p in result["processes"]), outcome_text(result)
    params = Params(*M.init_model(spec.model_config(), seed=spec.seed))
    outputs = {}
    for path in glob.glob(str(tmp_path / "outputs_p*.npz")):
        outputs.update(np.load(path))
    reports = [json.load(open(p)) for p in sorted(glob.glob(str(tmp_path / "report_p*.json")))]
    assert len(reports) == processes
    assert sorted(r for rep in reports for r in rep["ranks"]) == list(range(spec.group_size))
    n_moe = spec.model_config().num_moe_layers
    for rank in range(spec.group_size):
        for i, batch in enumerate(verify_batches(spec, rank)):
            ref = prefill(params, batch)
            for strategy in ("dwdp", "dep"):
                logits = outputs[f"{strategy}/{rank}/{i}/logits"]
                assert np.isfinite(logits).all()
                assert rel_err(logits, ref.logits_TV) <= 1e-6, (strategy, rank, i)
                for m in range(n_moe):
                    ids = outputs[f"{strategy}/{rank}/{i}/ids{m}"]
                    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ref.expert_ids[m], 1))
    placement = spec.placement()
    row_bytes = 3 * spec.model_config().hidden_size * spec.model_config().moe_intermediate_size * 4  # fp32
    for rep in reports:
        assert len(rep["devices"]) == devices_per_process
        for rank, count in rep["dwdp"]["collectives"].items():
            assert count == 0, f"DWDP rank {rank}'s programs hold {count} collectives"
        assert rep["dwdp"]["transport"] == transport
        # the owner's programs read its slabs in the shared segment: the weights are held once
        assert rep["dwdp"]["slabs_in_shared_segment"] and all(rep["dwdp"]["slabs_in_shared_segment"].values())
        for rank, pulled in rep["dwdp"]["bytes_pulled"].items():
            remote = sum(p.count for p in placement.pulls(int(rank)))
            assert pulled == rep["dwdp"]["bytes_planned"][rank] == 2 * n_moe * remote * row_bytes > 0
        assert rep["dep"]["mesh_devices"] == spec.group_size and rep["dep"]["all_to_all"] == 3 * n_moe
    assert not glob.glob("/dev/shm/dwdp_*"), "a run left shared segments behind"


def _served_despite_a_fault(tmp_path, kind: str, num_requests: int, reason: str, rank: int = 1, **fields):
    """2 groups x 2 ranks, `rank` of group 0 faulted (`kind`) with its first batch in hand: the run ends in time,
    every request completed once, the failure recorded with `reason` and its batch re-run on group 1, whose
    processes exit 0. Returns (spec, result, failure, processes by (group, process))."""
    spec = Spec.of(mode="serve", num_groups=2, group_size=2, devices_per_process=1, num_requests=num_requests,
                   max_batch_size=2, model_changes=dict(num_hidden_layers=3, first_k_dense_replace=1),
                   fault=dict(group=0, rank=rank, after_batches=0, kind=kind), barrier_timeout_s=5.0, **fields)
    start = time.time()
    result = launch.run(spec, str(tmp_path), timeout_s=150)
    assert time.time() - start < 150 and result["finished"], outcome_text(result)
    serving = result["serving"]
    assert serving["completed"] == serving["requests"] == num_requests, serving["failures"]
    assert not serving["lost"] and not serving["served_twice"]
    [failure] = serving["failures"]
    assert failure["group"] == 0 and failure["rank"] == rank and reason in failure["reason"]
    assert failure["requeued"], "the faulted rank held a batch: its requests must be re-run"
    assert all(result["completed"][r]["group"] == 1 for r in failure["requeued"])
    by_process = {(p["group"], p["process"]): p for p in result["processes"]}
    assert by_process[(1, 0)]["exit"] == by_process[(1, 1)]["exit"] == 0
    return spec, result, by_process


def test_two_groups_one_rank_killed_every_request_served_once(tmp_path):
    spec, result, by_process = _served_despite_a_fault(tmp_path, "kill", 24, "died")
    serving = result["serving"]
    assert serving["per_group"][1]["live"] and not serving["per_group"][0]["live"]
    assert serving["per_group"][1]["requests"] + serving["per_group"][0].get("requests", 0) == 24
    assert by_process[(0, 1)]["signal"] == "SIGKILL"
    # the dead rank's surviving peer ends by itself, naming the process it lost
    peer = by_process[(0, 0)]
    assert peer["exit"] == 4 and any("process(es) [1]" in s for s in peer["said"]), peer
    # the served logits are the reference's, re-runs included
    params = Params(*M.init_model(spec.model_config(), seed=spec.seed))
    from dwdp_jax.packing import pack
    for rid, tokens in spec.requests():
        ref = prefill(params, pack([tokens], budget=spec.token_budget)).logits_TV[-1]
        assert rel_err(result["completed"][rid]["logits"], ref) <= 1e-6, rid


def test_the_process_hosting_the_coordination_service_killed_takes_only_its_group_down(tmp_path):
    """Rank 0's process also runs its group's coordination service: with it gone, the runtime ends its peer at once
    (SIGABRT, saying the leader died; no hang), and the other group serves every request once."""
    spec, result, by_process = _served_despite_a_fault(tmp_path, "kill", 16, "died", rank=0)
    assert by_process[(0, 0)]["signal"] == "SIGKILL"
    assert by_process[(0, 1)]["signal"] == "SIGABRT", by_process[(0, 1)]
    assert "leader task was preempted/died" in (tmp_path / "log_g0_p1.txt").read_text()
    params = Params(*M.init_model(spec.model_config(), seed=spec.seed))
    from dwdp_jax.packing import pack
    for rid, tokens in spec.requests():
        ref = prefill(params, pack([tokens], budget=spec.token_budget)).logits_TV[-1]
        assert rel_err(result["completed"][rid]["logits"], ref) <= 1e-6, rid


def test_a_rank_stalled_past_the_deadline_takes_only_its_group_down(tmp_path):
    """A real rank process holding its batch past step_deadline_s: its group is failed and its processes ended, the
    batch re-runs on the other group, every request completed once, nothing hangs. The deadline leaves a healthy
    rank's first step (its programs compiled) room on a loaded 2-core machine: at 8 s a CI run completed no request,
    most likely both groups past the deadline."""
    _served_despite_a_fault(tmp_path, "stall", 16, "stalled", step_deadline_s=25.0)


def _failed_fast(result, seconds):
    assert result["finished"] and result["wall_s"] < seconds, outcome_text(result)
    return {(p["group"], p["process"]): p for p in result["processes"]}


def test_a_missing_process_fails_the_others_within_the_start_timeout(tmp_path):
    spec = Spec.of(group_size=2, start_timeout_s=4.0)
    result = launch.run(spec, str(tmp_path), timeout_s=60, skip=((0, 1),))
    [present] = _failed_fast(result, 30).values()
    assert present["exit"] == 2 and any("did not assemble" in s and "2 processes" in s for s in present["said"])


# The start timeout (the default 30 s) leaves two processes room to import JAX and assemble beside a loaded test run:
# at 10 s a CI run's process exited 2 without the owner's message, most likely before its group assembled.
def test_mismatched_configurations_fail_every_process_naming_the_field(tmp_path):
    spec = Spec.of(group_size=2)
    other = Spec.of(group_size=2, seed=4)
    result = launch.run(spec, str(tmp_path), timeout_s=90, spec_of=lambda g, p: other if p == 1 else spec)
    for p in _failed_fast(result, 60).values():
        assert p["exit"] == 2 and any("seed = 3 on process 0, 4 on process 1" in s for s in p["said"]), p


def test_a_handle_that_cannot_be_mapped_fails_every_process_naming_the_owner(tmp_path):
    spec = Spec.of(group_size=2, fault=dict(group=0, rank=1, after_batches=0, kind="bad_handle"))
    result = launch.run(spec, str(tmp_path), timeout_s=90)
    for p in _failed_fast(result, 60).values():
        assert p["exit"] == 2 and any("owner 1's slab segment /dev/shm/dwdp_missing_segment cannot be opened" in s
                                      for s in p["said"]), p["said"]


def test_bad_launch_fields_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="group_size=3.*multiple of devices_per_process"):
        Spec.of(group_size=3, devices_per_process=2)
    with pytest.raises(ValueError, match="unknown launch field"):
        Spec.of(groups=2)
    with pytest.raises(ValueError, match="fault="):
        Spec.of(mode="serve", fault=dict(group=5, rank=0, after_batches=0, kind="kill"))


def test_router_isolates_a_stalled_group_and_discards_its_late_result():
    """The router alone, ranks played by threads: group 0's rank keeps its batch past the deadline."""
    import threading
    from multiprocessing.connection import Client

    from dwdp_jax.distributed.router import Router

    requests = [(i, [1] * (2 + i % 3)) for i in range(8)]
    router = Router(requests, num_groups=2, group_size=1, token_budget=8, max_batch_size=2, step_deadline_s=0.5,
                    authkey=b"k")
    host, port = router.address.rsplit(":", 1)
    late = threading.Event()

    def rank(group):
        conn = Client((host, int(port)), authkey=b"k")
        conn.send(("hello", group, 0, 0))
        while True:
            conn.send(("next", group, 0))
            item = conn.recv()
            if item is None:
                conn.send(("bye", group, 0))
                return
            batch_id, reqs = item
            if group == 0:
                time.sleep(1.5)  # stalled past the deadline; its result then arrives late
                conn.send(("done", group, 0, batch_id, 0.0, 0.0, {r: np.zeros(1) for r, _ in reqs}))
                late.set()
                continue
            conn.send(("done", group, 0, batch_id, time.time(), time.time(), {r: np.ones(1) for r, _ in reqs}))

    threads = [threading.Thread(target=rank, args=(g,), daemon=True) for g in (0, 1)]
    for t in threads:
        t.start()
    assert router.wait(20)
    late.wait(5)
    time.sleep(0.2)
    summary = router.summary()
    router.close()
    assert summary["completed"] == 8 and not summary["lost"] and not summary["served_twice"]
    [failure] = summary["failures"]
    assert failure["group"] == 0 and "stalled" in failure["reason"] and failure["requeued"]
    assert all(router.completed[r]["group"] == 1 for r in range(8))
    assert summary["discarded"] and summary["discarded"][0]["group"] == 0
