"""Roofline model and discrete-event simulator (issue 7): contention, roofline trend, sync overhead, calibration."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dwdp_jax.placement import Placement
from dwdp_jax.results import read_results, write_results
from dwdp_jax.serving.scheduler import CountCheckError, DepScheduler, DwdpScheduler
from dwdp_jax.serving.workload import Request, synthetic_requests
from dwdp_jax.sim import calibration, contention, hardware, planner, roofline, servers, simulate, studies
from dwdp_jax.sim import workload as sim_workload
from dwdp_jax.sim.config import PACKINGS, STRATEGIES, ContextConfig, E2EConfig
from dwdp_jax.sim.roofline import GenServer, Precision
from dwdp_jax.sim.workload import Workload, arrival_times_s, input_lengths
from models.config import deepseek_r1

REPO = Path(__file__).resolve().parents[1]
R1 = deepseek_r1()
GB200 = hardware.GB200


# ---------------------------------------------------------------------------------------------------------- contention

@pytest.mark.parametrize("n", sorted(contention.PAPER_TABLE2))
def test_contention_pmf_equals_paper_table2_to_printed_precision(n):
    rows = contention.matches_paper(n)
    assert len(rows) == len(contention.PAPER_TABLE2[n])
    assert all(r["match"] for r in rows), rows
    pmf = contention.contention_pmf(n)
    assert len(pmf) == n - 1 and math.isclose(sum(pmf), 1.0)
    assert math.isclose(contention.expected_slowdown(n), 1 + (n - 2) / (n - 1))


def test_simulated_contention_frequencies_within_one_point_of_the_model():
    doc = studies.contention_study(R1, GB200, sorted(contention.PAPER_TABLE2), ["none"], min_pulls=80000)
    for n, row in doc["metrics"]["per_group"].items():
        assert row["paper_match"]
        assert row["none"]["max_abs_diff_pp"] < 1.0, (n, row["none"])
        assert math.isclose(sum(row["none"]["empirical_percent"]), 100.0)


def test_fifo_contention_stretches_prefetch_and_sliced_round_robin_removes_it():
    doc = studies.contention_study(R1, GB200, [8], ["none", "fifo", "round_robin"], min_pulls=4000)
    row = doc["metrics"]["per_group"][8]
    ctx = ContextConfig("dwdp")
    slice_s = ctx.slice_bytes / GB200.copy_bytes_per_s
    assert row["none"]["prefetch_stretch"] == pytest.approx(1.0, rel=1e-6)
    assert row["fifo"]["prefetch_stretch"] > 1.3
    # Every source is shared evenly, so only the per-slice cost remains (uniform placement: equal shards).
    assert row["round_robin"]["prefetch_stretch"] == pytest.approx((slice_s + ctx.slice_overhead_s) / slice_s, rel=1e-3)


# ------------------------------------------------------------------------------------------------------------ roofline

def test_roofline_units_by_hand():
    prec = Precision()
    assert roofline.expert_bytes(R1, prec) == pytest.approx(3 * 7168 * 2048 * (0.5 + 1 / 16))  # 24.8 MB NVFP4
    placement = Placement.uniform(256, 4)
    assert roofline.prefetch_bytes(R1, placement, prec) == pytest.approx(192 * roofline.expert_bytes(R1, prec))
    assert roofline.prefetch_s(R1, GB200, placement, prec) == pytest.approx(4.757e9 / 900e9, rel=1e-3)  # ~5.3 ms
    op = roofline.gemm("x", 10, 20, 30, "bf16")
    assert (op.flops, op.bytes) == (2 * 10 * 20 * 30, 20 * 30 * 2 + 10 * 20 * 2 + 10 * 30 * 2)
    assert roofline.op_time_s(op, GB200) == max(op.flops / 2.5e15, op.bytes / 8e12)
    assert roofline.causal_pairs([3, 2]) == 6 + 3
    assert roofline.experts_touched(R1, 1, 256) == pytest.approx(1.0)


def test_roofline_gb200_reproduces_blog_table1_trend():
    isls = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    doc = studies.roofline_study(R1, GB200, isls, [1, 4], 4, Precision())
    points = {p["isl"]: p for p in doc["raw"]["points"] if p["batch"] == 1}
    assert points[8192]["compute_over_prefetch"] < 1 < points[16384]["compute_over_prefetch"]
    assert 8192 < doc["metrics"]["per_batch"][1]["crossover_isl"] < 16384
    speedup = [points[i]["dep_over_dwdp"] for i in isls]
    peak = int(np.argmax(speedup))
    assert 0 < peak < len(isls) - 1
    assert all(a < b for a, b in zip(speedup[:peak], speedup[1:peak + 1]))
    assert all(a > b for a, b in zip(speedup[peak:], speedup[peak + 1:]))
    published = doc["metrics"]["published"]
    assert [r["isl"] for r in published] == [1024, 8192, 16384, 32768]
    for r in published:
        assert abs(r["compute_over_prefetch_diff"]) < 0.15 and abs(r["dep_over_dwdp_diff"]) < 0.15, r
    # A larger batch enlarges the compute window: the crossover moves to shorter ISL.
    assert doc["metrics"]["per_batch"][4]["crossover_isl"] < doc["metrics"]["per_batch"][1]["crossover_isl"]


# ----------------------------------------------------------------------------------------------------------- simulator

def test_workload_sampler():
    w = Workload(1000, 8192, input_ratio=0.8, rate_per_s=10.0, seed=3)
    lengths, arrivals = input_lengths(w), arrival_times_s(w)
    assert lengths.min() >= int(0.8 * 8192) and lengths.max() <= 8192
    assert np.all(np.diff(arrivals) >= 0) and 80 < arrivals[-1] < 120
    assert np.array_equal(lengths, input_lengths(w))
    normal = input_lengths(Workload(2000, 1000, isl_std=100.0))
    assert normal.max() <= 1999 and abs(normal.mean() - 1000) < 10
    assert input_lengths(Workload(2000, 1000, isl_std=100.0, max_len=1050)).max() == 1050
    assert not arrival_times_s(Workload(4, 10)).any()


def test_the_simulator_runs_the_serving_workload_and_scheduler():
    """One workload sampler and one scheduler: a simulated run batches exactly as the runtimes' scheduler does."""
    w = Workload(40, 8192, 0.5, rate_per_s=50.0, seed=4)
    served = synthetic_requests(40, 8192, input_ratio=0.5, rate_per_s=50.0, seed=4)
    assert [(r.id, r.input_len, r.arrival_s) for r in sim_workload.requests(w)] == \
        [(r.id, r.input_len, r.arrival_s) for r in served]
    assert np.array_equal(input_lengths(w), [r.input_len for r in served])
    saturated = Workload(40, 8192, 0.5, seed=4)
    ctx = ContextConfig("dep", max_num_tokens=16384, max_batch_size=3)
    steps = simulate.simulate_context(R1, GB200, ctx, saturated).iterations
    scheduler = DepScheduler(sim_workload.requests(saturated), num_ranks=4, max_num_tokens=16384, max_batch_size=3)
    expected = []
    while (batches := scheduler.next_step(0.0)) is not None:
        expected.append([b.num_tokens for b in batches])
    assert [it.rank_tokens for it in steps] == expected
    with pytest.raises(ValueError, match="input_ratio must be 1.0 when isl_std is given"):
        Workload(4, 1024, 0.8, isl_std=100.0)


def test_scheduler_takes_closed_loop_submissions_in_arrival_order():
    scheduler = DwdpScheduler([Request(0, 10)], num_ranks=2, max_num_tokens=32, max_batch_size=4)
    scheduler.submit(Request(1, 20, arrival_s=1.0))
    assert scheduler.next_batch(0, 0.5).request_ids == (0,)
    assert scheduler.next_batch(1, 0.5) is None and scheduler.next_arrival_s() == 1.0
    with pytest.raises(ValueError, match="request 2 arrives at 0.5 s, before pending request 1"):
        scheduler.submit(Request(2, 5, arrival_s=0.5))
    with pytest.raises(ValueError, match=r"duplicate request ids: \[0\]"):
        scheduler.submit(Request(0, 5, arrival_s=2.0))
    with pytest.raises(ValueError, match="longer than max_num_tokens=32"):
        scheduler.submit(Request(3, 33, arrival_s=2.0))
    batch = scheduler.next_batch(1, 1.0)
    assert batch.request_ids == (1,)
    scheduler.complete(batch)
    with pytest.raises(CountCheckError, match=r"1 request\(s\) never completed: \[0\]"):
        scheduler.finish()


def test_dep_step_barrier_and_sync_overhead():
    prec = Precision()
    even = [roofline.prefill_times(R1, GB200, [8192], prec)] * 4
    step_s, busy_s = servers.dep_step(R1, GB200, even, [8192] * 4, prec)
    assert np.allclose(busy_s, step_s)
    uneven = [roofline.prefill_times(R1, GB200, [8192] * k, prec) for k in (1, 1, 1, 2)]
    step2_s, busy2_s = servers.dep_step(R1, GB200, uneven, [8192, 8192, 8192, 16384], prec)
    assert busy2_s.max() == pytest.approx(step2_s) and 1 - busy2_s.mean() / step2_s > 0.05


def test_dwdp_exposes_prefetch_only_when_prefetch_bound():
    short = simulate.simulate_context(R1, GB200, ContextConfig("dwdp", max_num_tokens=1024, max_batch_size=1),
                                      Workload(8, 1024))
    long = simulate.simulate_context(R1, GB200, ContextConfig("dwdp"), Workload(8, 32768))
    assert short.summary()["exposed_wait_fraction"] > 0.5
    assert long.summary()["exposed_wait_fraction"] < 0.01
    assert all(r.prefill_end_s > r.arrival_s for r in short.requests + long.requests)


def test_compute_slowdown_while_pulling_costs_throughput():
    w = Workload(32, 8192, 0.8)
    base = simulate.simulate_context(R1, GB200, ContextConfig("dwdp"), w).tps_per_gpu
    slow = simulate.simulate_context(R1, GB200, ContextConfig("dwdp", compute_slowdown=0.1), w).tps_per_gpu
    assert base / 1.1 <= slow < base


def test_attention_slowdown_and_the_pull_issue_point():
    """A pull slowing attention only costs less than one slowing all compute; issuing each pull after the MoE
    layer's attention (so it overlaps the grouped GEMM) recovers part of that cost."""
    w = Workload(32, 8192, 0.8)

    def tps(**kw):
        return simulate.simulate_context(R1, GB200, ContextConfig("dwdp", **kw), w).tps_per_gpu

    base, everything = tps(), tps(compute_slowdown=0.2)
    after_moe, after_attention = tps(attention_slowdown=0.2), tps(attention_slowdown=0.2, pull_issue="after_attention")
    assert everything < after_moe < base
    assert after_moe < after_attention <= base
    assert ContextConfig("dwdp", compute_slowdown=0.1).slowdowns == (0.1, 0.1)
    assert ContextConfig("dwdp", compute_slowdown=0.1, attention_slowdown=0.3).slowdowns == (0.3, 0.1)


def test_sync_overhead_at_cv20_isl8k_r08():
    doc = studies.sync_cv_study(R1, GB200)
    m = doc["metrics"]
    assert 0.10 <= m["overhead_at_target"] <= 0.14, m["overhead_at_target"]
    assert m["bins"][0]["overhead"] < 0.03 < m["bins"][2]["overhead"]  # grows with imbalance


def test_e2e_closed_loop_and_planner():
    gen = GenServer(num_gpus=4, max_batch=16, mtp_tokens=1)
    w = Workload(64, 2048, 0.8, osl=32)
    results = {s: simulate.simulate_e2e(R1, GB200, E2EConfig(ContextConfig(s, max_num_tokens=8192), gen), w)
               for s in STRATEGIES}
    for result in results.values():
        s = result.summary()
        assert s["steady_requests"] > 0 and s["output_tps_per_gpu"] > 0 and s["ttft_p50_s"] > 0
        assert all(r.end_s > r.gen_start_s >= r.prefill_end_s > r.arrival_s for r in result.requests)
    points = [{"ttft_p50_s": 0.5, "output_tps_per_gpu": 10.0}, {"ttft_p50_s": 2.0, "output_tps_per_gpu": 20.0}]
    choices = planner.plan(points, [0.1, 1.0, 3.0])
    assert [c.best and c.best["output_tps_per_gpu"] for c in choices] == [None, 10.0, 20.0]


def test_planner_skips_group_sizes_that_do_not_fit_memory():
    band = studies.Band("tiny", GenServer(num_gpus=4, max_batch=16), (4,), (4,))
    doc = studies.planner_study(R1, GB200, band, [1.0, 100.0], group_sizes=(2, 4), max_ctx_gpus=8, isl=2048, osl=16,
                                cycles=4)
    assert doc["metrics"]["infeasible_group_sizes"] == [2]
    assert {(p["strategy"], p["ctx_gpus"]) for p in doc["raw"]["points"]} == {("dwdp", 4), ("dwdp", 8), ("dep", 4),
                                                                                ("dep", 8)}
    assert doc["metrics"]["choices"][1]["dwdp"] is not None


# --------------------------------------------------------------------------------------------------------- calibration

def _calibration_files(root: Path, ratio_factors: dict[str, float]) -> float:
    """A synthetic calibration file and context_bench runs whose measured ratio is factor x the prediction."""
    write_results("gpu_calibration", "synthetic", config={"gemm_backend": "pallas_split", "attention_impl": "cudnn"},
                  raw={}, root=root, with_devices=False,
                  metrics={"gemm_tflops": 600.0, "hbm_gbps": 4000.0, "p2p_gbps": 300.0, "attention_tflops": 350.0,
                           "grouped_gemm_tflops": 300.0, "memory_gb": 141.0})
    cfg = R1.replace(num_hidden_layers=6, dtype="bfloat16")
    config = {"num_ranks": 4, "max_num_tokens": 32768, "max_batch_size": 64, "token_buckets": 2,
              "dwdp": {"slices": 1, "local_experts": 0, "packing": "lookahead"},
              "gemm_backend": "pallas_split", "attention_impl": "cudnn",
              "workload": {"num_requests": 32, "isl": 8192, "input_ratio": 0.8, "isl_std": -1.0, "rate_per_s": 0.0,
                           "seed": 0, "dataset": ""}}
    bf16 = Precision("bf16", "bf16", "bf16", "bf16")
    hw = hardware.calibrated(root)
    w = Workload(32, 8192, 0.8)
    tps = {s: simulate.simulate_context(cfg, hw, ContextConfig(s, max_num_tokens=32768, token_buckets=2,
                                                               precision=bf16), w).tps_per_gpu
           for s in STRATEGIES}
    predicted = tps["dwdp"] / tps["dep"]
    for run, factor in ratio_factors.items():
        write_results("context_bench", run, config=config, raw={}, root=root, with_devices=False,
                      model=dataclasses.asdict(cfg),
                      metrics={"dwdp": {"tps_per_gpu": factor * predicted * 100.0}, "dep": {"tps_per_gpu": 100.0}})
    return predicted


def test_dwdp_lookahead_packing_needs_fewer_iterations_with_varied_lengths():
    cfg, w = R1.replace(num_hidden_layers=5), Workload(64, 8192, 1.0, isl_std=4096.0)
    runs = {p: simulate.simulate_context(cfg, GB200, ContextConfig("dwdp", packing=p), w) for p in PACKINGS}
    # fuller batches; throughput need not follow in a short run (with 64 requests the tail decides: 0.96x here)
    assert runs["lookahead"].summary()["num_iterations"] < runs["fcfs"].summary()["num_iterations"]


def test_padding_to_a_static_shape_costs_the_per_token_gemms_only():
    prec = Precision("bf16", "bf16", "bf16", "bf16")
    real, padded = (roofline.prefill_times(R1, GB200, [6000, 9000], prec, p) for p in (None, 16384))
    assert padded.routed_s == real.routed_s and padded.head_s == real.head_s  # never routed, no logits
    for name in ("attention_s", "pre_moe_s", "dense_s"):
        assert getattr(padded, name) > getattr(real, name), name
    # the attention core is not padded: the padded attention grows by the projections' share only
    core = roofline.ops_time_s([roofline.prefill_attention_core(R1, 15000, roofline.causal_pairs([6000, 9000]), prec)],
                               GB200)
    assert padded.attention_s - core == pytest.approx((real.attention_s - core) * 16384 / 15000, rel=0.05)
    with pytest.raises(ValueError, match="padded_tokens=8192 is below the batch's 15000 tokens"):
        roofline.prefill_times(R1, GB200, [6000, 9000], prec, 8192)


def test_token_buckets_pad_each_dwdp_batch_and_every_dep_rank_to_the_fullest():
    cfg, w = R1.replace(num_hidden_layers=6), Workload(32, 8192, 1.0, isl_std=4096.0)
    runs = {(s, tb): simulate.simulate_context(cfg, GB200, ContextConfig(s, max_num_tokens=32768, token_buckets=tb),
                                               w).summary()
            for s in STRATEGIES for tb in (None, 2, 32768)}
    tps = {key: run["tps_per_gpu"] for key, run in runs.items()}
    # a bucket per token count: no padding for a DWDP rank, while a DEP step still pads every rank to its fullest
    assert tps[("dwdp", 32768)] == pytest.approx(tps[("dwdp", None)])
    assert tps[("dep", 32768)] < tps[("dep", None)]
    assert tps[("dwdp", 2)] < tps[("dwdp", None)] and tps[("dep", 2)] < tps[("dep", 32768)]
    assert ContextConfig("dep", max_num_tokens=32768, token_buckets=2).padded(16385) == 32768
    with pytest.raises(ValueError, match="token_buckets must be None or >= 1 and divide max_num_tokens=32768"):
        ContextConfig("dwdp", max_num_tokens=32768, token_buckets=3)


def test_bench_setup_packs_runs_without_the_packing_field_strict_fcfs(tmp_path):
    """Runs written before config.dwdp.packing existed (the GPU runs of sessions 4-6) packed strict FCFS."""
    _calibration_files(tmp_path, {"run": 1.0})
    doc = read_results("context_bench", tmp_path)[0]
    assert calibration.bench_setup(doc)[3].packing == "lookahead"
    del doc["config"]["dwdp"]["packing"]
    assert calibration.bench_setup(doc)[3].packing == "fcfs"
    with pytest.raises(ValueError, match=r"ContextConfig.packing must be one of \('lookahead', 'fcfs'\)"):
        ContextConfig("dwdp", packing="best")


def test_calibration_reads_each_variant_of_a_run_as_a_run(tmp_path):
    _calibration_files(tmp_path, {"run": 1.0})
    (doc,) = read_results("context_bench", tmp_path)
    doc["config"]["variants"] = "std:isl_std=4096,input_ratio=1.0;half:max_num_tokens=16384"
    doc["metrics"]["dwdp"]["variants"] = {"std": {"tps_per_gpu": 120.0}, "half": {"tps_per_gpu": 100.0}}
    doc["metrics"]["dep"]["variants"] = {"std": {"tps_per_gpu": 100.0}, "half": {"tps_per_gpu": 100.0}}
    write_results("context_bench", "run", config=doc["config"], raw={}, root=tmp_path, with_devices=False,
                  model=doc["model"], metrics=doc["metrics"])
    runs = {r["run"]: r for r in calibration.calibration_study(tmp_path)["metrics"]["runs"]}
    assert set(runs) == {"run", "run/std", "run/half"} and runs["run/std"]["measured_ratio"] == pytest.approx(1.2)
    cfg, w, dep, dwdp = calibration.bench_setup(doc)
    hw = hardware.calibrated(tmp_path)

    def ratio(workload, configs):
        tps = {s.strategy: simulate.simulate_context(cfg, hw, s, workload).tps_per_gpu for s in configs}
        return tps["dwdp"] / tps["dep"]

    std = dataclasses.replace(w, isl_std=4096.0, input_ratio=1.0)
    assert runs["run/std"]["predicted_ratio"] == pytest.approx(ratio(std, (dep, dwdp)))
    assert runs["run/std"]["predicted_ratio"] != pytest.approx(runs["run"]["predicted_ratio"])
    # half the batch budget on the run's bucket size (16K of 32K in two buckets: one bucket)
    half = [dataclasses.replace(x, max_num_tokens=16384, token_buckets=1) for x in (dep, dwdp)]
    assert runs["run/half"]["predicted_ratio"] == pytest.approx(ratio(w, half))


def test_grid_predicts_table_4_at_a_group_size_from_the_measured_setup(tmp_path):
    predicted = _calibration_files(tmp_path, {"run": 1.0})
    doc = calibration.grid_study(tmp_path, group_size=4, input_ratios=(0.8, 0.5), max_num_tokens=(32768,))
    points = {(p["input_ratio"], p["contention_mitigation"]): p for p in doc["metrics"]["points"]}
    assert len(points) == 4 and doc["config"]["base_run"] == "run"
    # the measured setup itself (r 0.8, MNT 32K, whole-shard pulls, 4 ranks) is the calibration's prediction
    assert points[(0.8, False)]["dwdp_over_dep"] == pytest.approx(predicted)
    assert sum(points[(0.8, False)]["contention"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="group_size must be >= 2, got 1"):
        calibration.grid_study(tmp_path, group_size=1)
    with pytest.raises(ValueError, match="no GPU calibration results"):
        calibration.grid_study(tmp_path / "empty")
    for path in (tmp_path / "context_bench").glob("*.json"):
        path.unlink()
    with pytest.raises(ValueError, match="no bf16 context_bench run with both strategies"):
        calibration.grid_study(tmp_path)


def test_calibration_reads_measured_runs_and_reports_predicted_vs_measured(tmp_path):
    """A unit test of the mechanism on synthetic files, not a claim about any GPU."""
    predicted = _calibration_files(tmp_path, {"close": 1.05, "far": 1.3})
    write_results("context_bench", "cpu_fp32", config={}, raw={}, root=tmp_path, with_devices=False,
                  model=dataclasses.asdict(R1.replace(dtype="float32")),
                  metrics={"dwdp": {"tps_per_gpu": 1.0}, "dep": {"tps_per_gpu": 1.0}})
    doc = calibration.calibration_study(tmp_path, tolerance=0.10)
    runs = {r["run"]: r for r in doc["metrics"]["runs"]}
    assert "cpu_fp32" not in runs  # CPU runs measure the machinery, not the GPU
    assert runs["close"]["predicted_ratio"] == pytest.approx(predicted)
    assert runs["close"]["measured_ratio"] == pytest.approx(1.05 * predicted)
    assert runs["close"]["within_tolerance"] and not runs["far"]["within_tolerance"]
    assert runs["far"]["rel_error"] == pytest.approx(1 / 1.3 - 1)
    projected = runs["close"]["projections"]
    assert projected["layers=6"] == pytest.approx(predicted)  # the measured depth projects to the prediction
    assert set(projected) == {f"layers={n}{s}{r}" for n in (6, 7, 8, 11, 61) for s in ("", ",isl_std=4096")
                              for r in ("", ",requests=256")} | {f"layers=6{s},pull_issue=after_attention"
                                                                 for s in ("", ",isl_std=4096")}
    # compute does not slow while pulling here, so only the shorter prefetch window could change the ratio
    assert projected["layers=6,pull_issue=after_attention"] == pytest.approx(predicted, rel=0.02)
    # more requests of the same workload: the same model, a different run, so a different ratio
    assert projected["layers=6,requests=256"] != pytest.approx(predicted, rel=1e-6)
    assert doc["config"]["hardware"].name == "calibrated:unknown"  # the synthetic file names no device
    assert not doc["metrics"]["all_within_tolerance"]
    # a run with other kernels is not compared with rates it did not use
    write_results("context_bench", "mgpu", config={"gemm_backend": "pallas_mgpu", "attention_impl": "cudnn"}, raw={},
                  root=tmp_path, with_devices=False, model=dataclasses.asdict(R1.replace(dtype="bfloat16")),
                  metrics={"dwdp": {"tps_per_gpu": 1.0}, "dep": {"tps_per_gpu": 1.0}})
    doc = calibration.calibration_study(tmp_path, tolerance=0.10)
    assert [r["run"] for r in doc["raw"]["skipped_other_kernels"]] == ["mgpu"]
    assert "mgpu" not in {r["run"] for r in doc["metrics"]["runs"]}


def test_calibrated_spec_requires_measurements(tmp_path):
    with pytest.raises(ValueError, match="no GPU calibration results"):
        hardware.calibrated(tmp_path)
    write_results("gpu_calibration", "partial", config={}, raw={}, root=tmp_path, with_devices=False,
                  metrics={"gemm_tflops": 600.0, "hbm_gbps": 4000.0})
    with pytest.raises(ValueError, match="metrics.p2p_gbps is required"):
        hardware.calibrated(tmp_path)


def test_calibrated_down_projection_runs_at_its_own_rate(tmp_path):
    metrics = {"gemm_tflops": 600.0, "hbm_gbps": 4000.0, "p2p_gbps": 300.0, "grouped_gemm_tflops": 500.0}
    write_results("gpu_calibration", "a", config={}, raw={}, root=tmp_path, with_devices=False, metrics=metrics)
    fc1, fc2 = roofline.routed_ops(R1, 262144.0, 256.0, Precision(moe="bf16"))
    hw = hardware.calibrated(tmp_path)
    assert hw.grouped_gemm_down_flops_per_s is None  # without the down rate both projections run at the one rate
    assert roofline.op_time_s(fc2, hw) == pytest.approx(fc2.flops / 500e12)
    write_results("gpu_calibration", "b", config={}, raw={}, root=tmp_path, with_devices=False,
                  metrics={**metrics, "grouped_gemm_down_tflops": 400.0})
    hw = hardware.calibrated(tmp_path)
    assert roofline.op_time_s(fc1, hw) == pytest.approx(fc1.flops / 500e12)
    assert roofline.op_time_s(fc2, hw) == pytest.approx(fc2.flops / 400e12)
    with pytest.raises(ValueError, match="grouped_gemm_down_flops_per_s must be > 0 or None"):
        dataclasses.replace(hw, grouped_gemm_down_flops_per_s=0.0)


# ---------------------------------------------------------------------------------------------------------- bad input

def test_bad_inputs_fail_with_the_field_named():
    with pytest.raises(ValueError, match="unknown hardware 'tpu9'"):
        hardware.get("tpu9")
    with pytest.raises(ValueError, match="local_experts"):
        simulate.simulate_context(R1, GB200, ContextConfig("dwdp", local_experts=101), Workload(4, 1024))
    with pytest.raises(ValueError, match="rate_per_s"):
        Workload(4, 1024, rate_per_s=-1.0)
    with pytest.raises(ValueError, match="loads"):
        studies.sync_cv_study(R1, GB200, loads=[0.5, -0.2])
    with pytest.raises(ValueError, match="no nvfp4"):
        roofline.op_time_s(roofline.gemm("x", 1, 1, 1, "nvfp4"), hardware.H100_SXM)
    with pytest.raises(ValueError, match="max_num_tokens"):
        simulate.simulate_context(R1, GB200, ContextConfig("dep", max_num_tokens=1000), Workload(4, 2048))
    with pytest.raises(ValueError, match="ContextConfig.compute_slowdown"):
        ContextConfig("dwdp", compute_slowdown=-0.1)
    with pytest.raises(ValueError, match="ContextConfig.attention_slowdown"):
        ContextConfig("dwdp", attention_slowdown=-0.1)
    with pytest.raises(ValueError, match=r"ContextConfig.pull_issue must be one of \('after_moe', 'after_attention'\)"):
        ContextConfig("dwdp", pull_issue="late")
    with pytest.raises(ValueError, match="ContextConfig.discipline"):
        ContextConfig("dwdp", discipline="lottery")
    with pytest.raises(ValueError, match="group_size must be an integer >= 3"):
        contention.contention_pmf(2)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_bad_input_exits_2_before_writing(tmp_path):
    config = "--config=configs/simulate.py"
    for args, field in ((["--study=sync_cv", "--config.loads=-0.5"], "loads"),
                        (["--config.hardware=tpu9"], "unknown hardware"),
                        ([f"{config}:roofline", "--config.group_size=5", "--config.local_experts=7"], "local_experts"),
                        (["--study=grid", "--config.group_size=1"], "group_size must be >= 2"),
                        ([f"{config}:calibration", "--config.projection_requests=256,x"], "projection_requests"),
                        (["--study=calibration", "--config.projection_requests=0"], "projection_requests"),
                        (["--study=planner", "--config.planner_group_sizes=4"],
                         "--config.planner_group_sizes: no such field of the planner study; nearest: group_sizes"),
                        ([f"{config}:contention", "--config.min_pulls=many"], "--config.min_pulls=many"),
                        (["--study=paretto"], "unknown study 'paretto'"),
                        (["--study=grid", f"{config}:grid"], "give --study or --config, not both")):
        done = _cli("experiments.simulate", *args, f"--config.results_root={tmp_path}")
        assert done.returncode == 2, done.stderr
        assert field in done.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_cli_roofline_writes_results_and_table(tmp_path):
    done = _cli("experiments.roofline", "--config.isls=1024,8192,16384,32768", "--config.batches=1",
                f"--config.results_root={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert "crossover ISL" in done.stdout
    (doc,) = read_results("roofline", tmp_path)
    assert doc["run"] == "gb200" and len(doc["metrics"]["published"]) == 4
    assert doc["config"]["hardware"]["hbm_bytes_per_s"] == 8e12


# ------------------------------------------------------------------------------------------------------------- figures

def _write(root: Path, experiment: str, doc: dict) -> None:
    write_results(experiment, "test", config=doc["config"], raw=doc["raw"], metrics=doc["metrics"], root=root,
                  with_devices=False)


def test_figure_scripts_write_files_and_skip_missing_data(tmp_path):
    from experiments.figures import fig_contention, fig_pareto, fig_planner, fig_roofline, fig_sync_overhead

    results, figures = tmp_path / "results", tmp_path / "figures"
    modules = (fig_roofline, fig_contention, fig_sync_overhead, fig_pareto, fig_planner)
    assert all(m.main(results, figures) == [] for m in modules)
    band = studies.Band("tiny", GenServer(num_gpus=4, max_batch=16), (4,), (4,))
    _write(results, "roofline", studies.roofline_study(R1, GB200, [1024, 16384], [1], 4, Precision()))
    _write(results, "sim_contention", studies.contention_study(R1, GB200, [3, 4], ["none", "fifo", "round_robin"],
                                                               min_pulls=500))
    _write(results, "sim_sync_cv", studies.sync_cv_study(R1, GB200, loads=[0.5, 0.9], seeds=[0], num_requests=300))
    _write(results, "sim_pareto", studies.pareto_study(R1, GB200, [band], isl=2048, osl=16, cycles=4))
    _write(results, "sim_planner", studies.planner_study(R1, GB200, band, [1.0], group_sizes=(4,), max_ctx_gpus=4,
                                                         isl=2048, osl=16, cycles=4))
    _calibration_files(results, {"synthetic": 1.0})
    write_results("context_bench", "no_metrics", config={}, raw={}, metrics={}, root=results, with_devices=False)
    _write(results, "sim_calibration", calibration.calibration_study(results))
    names = {p.name for m in modules for p in m.main(results, figures)}
    for stem in ("roofline_test", "contention_test", "sync_overhead_test", "pareto_test", "planner_test",
                 "calibration_test"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert {"roofline_test.md", "contention_test.md", "pareto_test.md"} <= names
    assert fig_sync_overhead.measured_points(results) == []


def test_source_hash_follows_the_code_not_git(tmp_path):
    """Results name the code that ran by content (the GPU machine's copy of the tree has stale git metadata)."""
    from dwdp_jax.results import environment, source_hash

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = source_hash(tmp_path, ("pkg",))
    assert source_hash(tmp_path, ("pkg",)) == before and len(before) == 12
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert source_hash(tmp_path, ("pkg",)) != before
    assert environment(with_devices=False)["source_hash"] == source_hash()


def test_git_sha_says_when_the_tree_is_not_its_commit(tmp_path):
    """A tracked file changed since HEAD (uncommitted work, or a copy of the tree under stale git metadata) marks the
    sha "-dirty"; untracked files (results) do not; outside a repository it is "unknown"."""
    import subprocess

    from dwdp_jax.results import git_sha

    assert git_sha(tmp_path) == "unknown"
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    (tmp_path / "results.json").write_text("{}")
    assert git_sha(tmp_path) == sha
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == sha + "-dirty"


def test_contention_figure_shows_gpu_measurements_beside_the_model(tmp_path):
    from experiments.figures import fig_contention

    results, figures = tmp_path / "results", tmp_path / "figures"
    _write(results, "sim_contention", studies.contention_study(R1, GB200, [4], ["none"], min_pulls=200))
    write_results("context_bench", "gpu4", config={}, raw={}, root=results, with_devices=False,
                  metrics={"dwdp": {"pull_contention": {"measured": {"1": 0.75, "2": 0.25}}}},
                  placement={"num_ranks": 4})
    assert fig_contention.measured_percent(results) == {4: [("gpu4", [75.0, 25.0, 0.0])]}
    paths = fig_contention.main(results, figures)
    table = next(p for p in paths if p.suffix == ".md").read_text()
    assert "| 4 | 1 | 44.44 |" in table and "75 (gpu4)" in table and "25 (gpu4)" in table


def test_an_achieved_grouped_gemm_rate_applies_to_its_own_precision_only():
    hw = dataclasses.replace(hardware.H200, grouped_gemm_flops_per_s=100e12, grouped_gemm_fp8_flops_per_s=300e12,
                             grouped_gemm_fp8_down_flops_per_s=250e12)
    flops = 1e15
    for kind, precision, rate in (("grouped_gemm", "bf16", 100e12), ("grouped_gemm_down", "bf16", 100e12),
                                  ("grouped_gemm", "fp8", 300e12), ("grouped_gemm_down", "fp8", 250e12)):
        assert roofline.op_time_s(roofline.OpCost("x", kind, flops, 0.0, precision), hw) == pytest.approx(flops / rate)
    bare = dataclasses.replace(hardware.H200, grouped_gemm_flops_per_s=100e12)  # no FP8 rate measured: the FP8 peak
    op = roofline.OpCost("x", "grouped_gemm", flops, 0.0, "fp8")
    assert roofline.op_time_s(op, bare) == pytest.approx(flops / hardware.H200.fp8_flops_per_s)


def test_projection_study_of_full_r1_on_eight_gpus():
    from experiments import simulate as main

    slow = main.run_study(main.options("projection", hardware="h200", num_requests=16, fp8_grouped_gemm_tflops=200.0,
                                       fp8_grouped_gemm_down_tflops=200.0), progress=lambda x: x)
    fast = main.run_study(main.options("projection", hardware="h200", num_requests=16, fp8_grouped_gemm_tflops=900.0,
                                       fp8_grouped_gemm_down_tflops=900.0), progress=lambda x: x)
    assert slow["config"]["hardware"].name == "h200+measured"
    assert set(slow["metrics"]["workloads"]) == {"uniform_r0.8", "std4096"}
    for w, v in slow["metrics"]["workloads"].items():
        faster = fast["metrics"]["workloads"][w]
        assert faster["dep_tps_per_gpu"] > v["dep_tps_per_gpu"] > 0 and faster["dwdp_tps_per_gpu"] > 0
        assert v["dwdp_over_dep"] == pytest.approx(v["dwdp_tps_per_gpu"] / v["dep_tps_per_gpu"])
    gb = slow["metrics"]["memory_gb_per_rank"]
    assert slow["metrics"]["fits"] == {k: gb[k] * 1e9 <= 0.9 * hardware.H200.memory_bytes for k in gb}
    with pytest.raises(ValueError, match="config.fp8_grouped_gemm_tflops must be > 0 TFLOP/s, got -1"):
        main.run_study(main.options("projection", hardware="h200", fp8_grouped_gemm_tflops=-1.0))
    with pytest.raises(ValueError, match="config.workloads: unknown 'r0.5'"):
        main.run_study(main.options("projection", hardware="h200", workloads="r0.5"))
