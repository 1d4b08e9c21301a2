"""Serving layer (workload, scheduler, metrics) and the figure scripts that read its results. CPU only, no JAX."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dwdp_jax.serving import metrics as m
from dwdp_jax.serving.scheduler import CountCheckError, DepScheduler, DwdpScheduler
from dwdp_jax.serving.workload import (Request, arrival_times_s, input_lengths, read_dataset, request_token_ids,
                                       synthetic_requests)

REPO = Path(__file__).resolve().parents[1]


def _requests(lengths, arrivals_s=None):
    arrivals_s = arrivals_s or [0.0] * len(lengths)
    return [Request(id=i, input_len=n, arrival_s=t) for i, (n, t) in enumerate(zip(lengths, arrivals_s))]


# ----------------------------------------------------------------------------------------------------------- workload

def test_synthetic_requests_are_deterministic_by_seed():
    a = synthetic_requests(200, 8192, input_ratio=0.8, rate_per_s=5.0, seed=3)
    b = synthetic_requests(200, 8192, input_ratio=0.8, rate_per_s=5.0, seed=3)
    c = synthetic_requests(200, 8192, input_ratio=0.8, rate_per_s=5.0, seed=4)
    assert a == b
    assert [r.input_len for r in a] != [r.input_len for r in c]
    assert [r.id for r in a] == list(range(200))


def test_uniform_lengths_cover_the_inclusive_range():
    lengths = input_lengths(2000, 10, input_ratio=0.5, seed=0)
    assert set(lengths.tolist()) == set(range(5, 11))
    lengths = input_lengths(2000, 8192, input_ratio=0.8, seed=1)
    assert lengths.min() >= int(8192 * 0.8) and lengths.max() <= 8192
    assert input_lengths(500, 7, input_ratio=0.0, seed=0).min() >= 1  # r = 0 never yields empty prompts
    assert (input_lengths(50, 64, seed=0) == 64).all()


def test_normal_lengths_center_on_isl_and_clip():
    assert (input_lengths(100, 16384, isl_std=0, seed=0) == 16384).all()
    lengths = input_lengths(5000, 2000, isl_std=1000, seed=0)
    assert lengths.min() >= 1 and lengths.max() <= 3999
    assert abs(lengths.mean() - 2000) < 50
    assert input_lengths(500, 2000, isl_std=1000, max_len=2100, seed=0).max() == 2100


def test_lengths_do_not_depend_on_the_arrival_rate():
    saturated = synthetic_requests(50, 1024, input_ratio=0.5, seed=7)
    poisson = synthetic_requests(50, 1024, input_ratio=0.5, rate_per_s=2.0, seed=7)
    assert [r.input_len for r in saturated] == [r.input_len for r in poisson]


def test_arrivals_saturation_and_poisson():
    assert (arrival_times_s(10) == 0).all() and (arrival_times_s(10, math.inf) == 0).all()
    arrivals_s = arrival_times_s(4000, 10.0, seed=2)
    assert (np.diff(arrivals_s) >= 0).all() and arrivals_s[0] > 0
    assert abs(np.diff(arrivals_s).mean() - 0.1) < 0.01
    np.testing.assert_array_equal(arrivals_s, arrival_times_s(4000, 10.0, seed=2))


@pytest.mark.parametrize("kwargs, field", [
    (dict(isl=0), "isl"), (dict(isl=-5), "isl"), (dict(input_ratio=1.5), "input_ratio"),
    (dict(input_ratio=-0.1), "input_ratio"), (dict(isl_std=-1.0), "isl_std"), (dict(rate_per_s=-1.0), "rate_per_s"),
    (dict(rate_per_s=0.0), "rate_per_s"), (dict(num_requests=0), "num_requests"),
    (dict(isl_std=100.0, input_ratio=0.8), "input_ratio"), (dict(max_len=10), "max_len"),
])
def test_bad_workload_parameters_name_the_field(kwargs, field):
    args = dict(num_requests=4, isl=64) | kwargs
    with pytest.raises(ValueError, match=field):
        synthetic_requests(args.pop("num_requests"), args.pop("isl"), **args)


def test_token_ids_are_deterministic_per_request_and_in_vocab():
    request = Request(id=5, input_len=300)
    ids = request_token_ids(request, 1000, seed=1)
    assert ids.shape == (300,) and ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 1000
    np.testing.assert_array_equal(ids, request_token_ids(Request(id=5, input_len=300), 1000, seed=1))
    assert not np.array_equal(ids, request_token_ids(Request(id=6, input_len=300), 1000, seed=1))
    given = Request(id=0, input_len=3, token_ids=[4, 5, 6])
    np.testing.assert_array_equal(request_token_ids(given, 10), [4, 5, 6])
    with pytest.raises(ValueError, match="outside"):
        request_token_ids(given, 6)
    with pytest.raises(ValueError, match="shape"):
        Request(id=1, input_len=2, token_ids=[1, 2, 3])


# ------------------------------------------------------------------------------------------------------------ dataset

def _write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dataset_reads_lengths_tokens_and_arrivals(tmp_path):
    path = _write_lines(tmp_path, ['{"input_len": 4, "arrival_s": 0.5}', '{"token_ids": [1, 2, 3], "arrival_s": 1}',
                                   '{"input_len": 2, "token_ids": [7, 8], "arrival_s": 2.0, "output_len": 9}'])
    requests = read_dataset(path)
    assert [(r.id, r.input_len, r.arrival_s) for r in requests] == [(0, 4, 0.5), (1, 3, 1.0), (2, 2, 2.0)]
    assert requests[0].token_ids is None and requests[2].token_ids.tolist() == [7, 8]
    path = _write_lines(tmp_path, ['{"input_len": 4}', '{"input_len": 5}'])
    assert [r.arrival_s for r in read_dataset(path)] == [0.0, 0.0]
    assert [r.arrival_s > 0 for r in read_dataset(path, rate_per_s=3.0, seed=1)] == [True, True]


def test_dataset_reports_every_malformed_line_with_its_number(tmp_path):
    path = _write_lines(tmp_path, [
        '{"input_len": 4}',                       # 1 ok
        '{"input_len": 4',                        # 2 bad JSON
        '{"arrival_s": 1.0}',                     # 3 no length
        '{"input_len": 3, "token_ids": [1, 2]}',  # 4 mismatch
        '{"input_len": -2}',                      # 5 negative
        '',                                       # 6 blank
        '[1, 2]',                                 # 7 not an object
        '{"input_len": true}',                    # 8 bool is not a length
        '{"token_ids": [1, -3]}',                 # 9 negative token
    ])
    with pytest.raises(ValueError) as info:
        read_dataset(path)
    message = str(info.value)
    assert "8 problem(s)" in message
    for line in range(2, 10):
        assert f"line {line}:" in message
    assert "line 1:" not in message


def test_dataset_arrival_conflicts_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="missing on lines 2"):
        read_dataset(_write_lines(tmp_path, ['{"input_len": 4, "arrival_s": 0}', '{"input_len": 4}']))
    with pytest.raises(ValueError, match="rate_per_s must be None"):
        read_dataset(_write_lines(tmp_path, ['{"input_len": 4, "arrival_s": 0}']), rate_per_s=2.0)
    with pytest.raises(ValueError, match="cannot read dataset file"):
        read_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="cannot read dataset file"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------------------- scheduler

def _drain_dwdp(scheduler, rank=0, now_s=0.0):
    batches = []
    while (batch := scheduler.next_batch(rank, now_s)) is not None:
        batches.append(batch)
        scheduler.complete(batch)
    return batches


def test_dwdp_fills_each_batch_from_the_window_like_dep():
    """The window is the FCFS prefix fitting 2 x (100 tokens, 3 requests): head first, then longest-first with
    room; the deferred go back to the front in order. Three iterations where strict FCFS needs four."""
    requests = _requests([30, 40, 50, 20, 10, 10, 10, 90])
    scheduler = DwdpScheduler(requests, num_ranks=2, max_num_tokens=100, max_batch_size=3)
    batches = _drain_dwdp(scheduler)
    assert [b.request_ids for b in batches] == [(0, 2, 3), (1, 4, 5), (6, 7)]
    assert [b.num_tokens for b in batches] == [100, 60, 100]
    assert [b.iteration for b in batches] == [0, 1, 2]
    assert len(scheduler.finish()) == 8
    with pytest.raises(ValueError, match=r"packing must be one of \('lookahead', 'fcfs'\), got 'best'"):
        DwdpScheduler(requests, num_ranks=2, max_num_tokens=100, max_batch_size=3, packing="best")


def test_dwdp_fcfs_ablation_stops_at_the_first_request_that_does_not_fit():
    requests = _requests([30, 40, 50, 20, 10, 10, 10, 90])
    scheduler = DwdpScheduler(requests, num_ranks=2, max_num_tokens=100, max_batch_size=3, packing="fcfs")
    batches = _drain_dwdp(scheduler)
    assert [b.request_ids for b in batches] == [(0, 1), (2, 3, 4), (5, 6), (7,)]
    assert all(b.num_tokens <= 100 and len(b.requests) <= 3 for b in batches)
    assert [b.iteration for b in batches] == [0, 1, 2, 3]
    assert scheduler.drained
    assert [(a.request_id, a.rank, a.iteration) for a in scheduler.finish()][:3] == [(0, 0, 0), (1, 0, 0), (2, 0, 1)]


def test_dwdp_honours_arrivals():
    requests = _requests([10, 10, 10], arrivals_s=[0.0, 2.0, 1.0])
    scheduler = DwdpScheduler(requests, num_ranks=1, max_num_tokens=100, max_batch_size=8)
    assert scheduler.next_batch(0, 0.5).request_ids == (0,)
    assert scheduler.next_batch(0, 0.5) is None and not scheduler.drained
    assert scheduler.next_arrival_s() == 1.0
    clock = {"now_s": 0.5}
    sleeps = []

    def sleep_s(seconds):
        sleeps.append(seconds)
        clock["now_s"] += seconds

    assert scheduler.wait_for_batch(0, lambda: clock["now_s"], sleep_s).request_ids == (2,)
    assert sleeps == [0.5]
    assert scheduler.wait_for_batch(0, lambda: clock["now_s"], sleep_s).request_ids == (1,)
    assert scheduler.wait_for_batch(0, lambda: clock["now_s"], sleep_s) is None


def test_dwdp_concurrent_takers_lose_and_duplicate_nothing():
    requests = synthetic_requests(2000, 64, input_ratio=0.1, seed=5)
    scheduler = DwdpScheduler(requests, num_ranks=4, max_num_tokens=256, max_batch_size=8)
    taken: list[list] = [[] for _ in range(4)]

    def worker(rank):
        while (batch := scheduler.wait_for_batch(rank)) is not None:
            assert batch.num_tokens <= 256 and len(batch.requests) <= 8 and batch.rank == rank
            taken[rank].append(batch)
            scheduler.complete(batch)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = sorted(rid for batches in taken for b in batches for rid in b.request_ids)
    assert ids == list(range(2000))
    assert len(scheduler.finish()) == 2000
    for rank, batches in enumerate(taken):
        assert [b.iteration for b in batches] == list(range(len(batches)))


def test_dep_balances_tokens_longest_first():
    scheduler = DepScheduler(_requests([8, 7, 6, 5, 4, 3, 2, 1]), num_ranks=2, max_num_tokens=100, max_batch_size=8)
    step = scheduler.next_step(0.0)
    assert [b.num_tokens for b in step] == [18, 18]
    assert [b.request_ids for b in step] == [(0, 3, 4, 7), (1, 2, 5, 6)]
    assert scheduler.next_step(0.0) is None and scheduler.drained


def test_dep_respects_limits_and_covers_every_request():
    requests = synthetic_requests(300, 900, input_ratio=0.2, seed=11)
    scheduler = DepScheduler(requests, num_ranks=4, max_num_tokens=1000, max_batch_size=3)
    steps = []
    while (step := scheduler.next_step(0.0)) is not None:
        assert len(step) == 4 and {b.iteration for b in step} == {len(steps)}
        assert all(b.num_tokens <= 1000 and len(b.requests) <= 3 for b in step)
        steps.append(step)
        for batch in step:
            scheduler.complete(batch)
    assert len(scheduler.finish()) == 300
    assert sorted(rid for step in steps for b in step for rid in b.request_ids) == list(range(300))


def test_dep_defers_what_does_not_pack_and_keeps_fcfs_head():
    scheduler = DepScheduler(_requests([6, 6, 6]), num_ranks=2, max_num_tokens=10, max_batch_size=4)
    first = scheduler.next_step(0.0)
    assert [b.request_ids for b in first] == [(0,), (1,)]
    second = scheduler.next_step(0.0)
    assert [b.request_ids for b in second] == [(2,), ()]
    for batch in first + second:
        scheduler.complete(batch)
    assert [a.iteration for a in scheduler.finish()] == [0, 0, 1]


def test_count_check_catches_lost_and_duplicated_requests():
    lost = DwdpScheduler(_requests([5, 5, 5]), num_ranks=1, max_num_tokens=5, max_batch_size=1)
    batches = [lost.next_batch(0, 0.0) for _ in range(3)]
    lost.complete(batches[0])
    lost.complete(batches[2])
    with pytest.raises(CountCheckError, match=r"never completed: \[1\]"):
        lost.finish()
    duplicated = DepScheduler(_requests([5, 5]), num_ranks=2, max_num_tokens=5, max_batch_size=1)
    step = duplicated.next_step(0.0)
    for batch in step + step[:1]:
        duplicated.complete(batch)
    with pytest.raises(CountCheckError, match=r"more than once: \[\(0, 2\)\]"):
        duplicated.finish()
    unscheduled = DwdpScheduler(_requests([5, 5]), num_ranks=1, max_num_tokens=5, max_batch_size=1)
    with pytest.raises(CountCheckError, match="never completed"):
        unscheduled.finish()


@pytest.mark.parametrize("scheduler_cls", [DwdpScheduler, DepScheduler])
def test_too_long_request_fails_at_construction(scheduler_cls):
    with pytest.raises(ValueError, match=r"longer than max_num_tokens=256.*request 1 has 300 tokens"):
        scheduler_cls(_requests([10, 300]), num_ranks=2, max_num_tokens=256, max_batch_size=4)
    with pytest.raises(ValueError, match="max_batch_size"):
        scheduler_cls(_requests([10]), num_ranks=2, max_num_tokens=256, max_batch_size=0)
    with pytest.raises(ValueError, match="duplicate request ids"):
        scheduler_cls([Request(1, 5), Request(1, 6)], num_ranks=2, max_num_tokens=256, max_batch_size=4)


# ------------------------------------------------------------------------------------------------------------ metrics

REQUESTS = [m.RequestRecord(0, 100, 0.0, 0.0, 1.0, 0), m.RequestRecord(1, 200, 0.0, 0.0, 2.0, 1),
            m.RequestRecord(2, 300, 1.0, 2.0, 4.0, 0)]
ITERATIONS = [m.IterationRecord(0, 0, 0.0, 1.0, 100, {"attention": 4.0, "grouped_gemm": 2.0}),
              m.IterationRecord(1, 0, 0.0, 2.0, 200, {"attention": 6.0}),
              m.IterationRecord(0, 1, 2.0, 4.0, 300)]


def test_request_and_iteration_metrics_by_hand():
    assert m.ttft(REQUESTS) == m.Percentiles(p50=2.0, p90=pytest.approx(2.8), mean=2.0)  # ttft 1, 2, 3
    assert m.makespan_s(REQUESTS) == 4.0
    assert m.context_tps_per_gpu(REQUESTS, 2) == 75.0  # 600 tokens / 4 s / 2 ranks
    assert m.iteration_latency(ITERATIONS) == m.Percentiles(2.0, 2.0, pytest.approx(5 / 3))
    assert m.rank_times(ITERATIONS, 3, 4.0) == [m.RankTime(0, 3.0, 1.0), m.RankTime(1, 2.0, 2.0),
                                               m.RankTime(2, 0.0, 4.0)]
    summary = m.summarize(REQUESTS, ITERATIONS, 2)
    assert summary["tps_per_gpu"] == 75.0 and summary["ttft_p50_s"] == 2.0 and summary["queue_mean_s"] == 1 / 3
    assert summary["rank_busy_s"] == [3.0, 2.0] and summary["rank_idle_s"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="overlapping"):
        m.rank_times(ITERATIONS + [m.IterationRecord(1, 1, 0.5, 3.0, 1)], 2, 4.0)


def test_dep_sync_overhead_and_rank_token_cv_by_hand():
    step_s = [2.0, 4.0]
    rank_compute_s = [[2.0, 1.0], [4.0, 4.0]]
    np.testing.assert_allclose(m.sync_overhead(step_s, rank_compute_s), [0.25, 0.0])
    assert m.overall_sync_overhead(step_s, rank_compute_s) == pytest.approx(1 / 12)  # 1 - (1.5 + 4) / 6
    np.testing.assert_allclose(m.rank_token_cv([[100, 300], [200, 200], [0, 0]]), [0.5, 0.0, np.nan])
    with pytest.raises(ValueError, match="steps, ranks"):
        m.sync_overhead(step_s, [1.0, 2.0])
    steps = m.dep_steps([m.IterationRecord(0, 7, 0.0, 1.5, 100), m.IterationRecord(1, 7, 0.1, 2.0, 300),
                         m.IterationRecord(1, 3, 5.0, 6.0, 10)], 2)
    np.testing.assert_array_equal(steps.iteration, [3, 7])
    np.testing.assert_allclose(steps.step_s, [1.0, 2.0])
    np.testing.assert_array_equal(steps.rank_tokens, [[0, 10], [100, 300]])


def test_breakdown_labels_measured_and_estimated():
    out = m.breakdown(ITERATIONS, estimated_ms={"attention": 99.0, "dense_gemm": 1.5})
    assert out == {"attention": {"ms": 5.0, "source": "measured"},
                   "grouped_gemm": {"ms": 2.0, "source": "measured"},
                   "dense_gemm": {"ms": 1.5, "source": "estimated"}}
    assert list(out) == [c for c in m.CATEGORIES if c in out]
    with pytest.raises(ValueError, match="unknown breakdown category 'gemm'"):
        m.breakdown([m.IterationRecord(0, 0, 0.0, 1.0, 1, {"gemm": 1.0})])
    with pytest.raises(ValueError, match=">= 0 ms"):
        m.breakdown([], estimated_ms={"others": -1.0})


def test_records_for_batch():
    scheduler = DwdpScheduler(_requests([3, 4], arrivals_s=[0.0, 0.5]), num_ranks=2, max_num_tokens=10,
                              max_batch_size=4)
    batch = scheduler.next_batch(1, 1.0)
    iteration, requests = m.records_for_batch(batch, 1.0, 1.25)
    assert iteration == m.IterationRecord(1, 0, 1.0, 1.25, 7)
    assert [(r.request_id, r.queue_s, r.ttft_s, r.rank) for r in requests] == [(0, 1.0, 1.25, 1), (1, 0.5, 0.75, 1)]


# ------------------------------------------------------------------------------------------------------------ figures

def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _synthetic_results(root: Path) -> None:
    def entry(ms, source="measured"):
        return {"ms": ms, "source": source}

    _write_json(root / "context_bench" / "tiny.json", {
        "experiment": "context_bench", "run": "tiny", "environment": {"device_kind": "cpu"},
        "breakdown": {"dep": {"attention": entry(2.7), "grouped_gemm": entry(3.4), "communication": entry(1.3),
                              "synchronization": entry(1.6, "estimated")},
                      "dwdp": {"attention": entry(3.2), "grouped_gemm": entry(3.3), "p2p_exposed_wait": entry(0.2)}}})
    _write_json(root / "context_bench" / "no_breakdown.json", {"experiment": "context_bench", "run": "no_breakdown"})
    marks = [["issue", -1, 0.0], ["copy_start", 0, 0.01], ["copy_end", 0, 40.0], ["copy_start", 1, 40.0],
             ["copy_end", 1, 80.0], ["wait_arrive", -1, 200.0], ["wait_resume", -1, 200.01]]
    _write_json(root / "context_bench" / "timeline.json", {
        "experiment": "context_bench", "run": "timeline",
        "raw": {"dwdp": {"pull_timeline": [{"rank": r, "marks": marks, "step_ms": 300.0, "exposed_wait_ms": 0.01}
                                           for r in range(2)]}}})
    for isl, tps in ((1024, 120.0), (8192, 111.0)):
        _write_json(root / "ablations" / f"isl_{isl}.json", {
            "run": f"isl_{isl}", "config": {"sweep": "isl", "point": {"isl": isl}},
            "metrics": {"dwdp": {"tps_per_gpu": tps, "ttft_p50_s": 1.0}, "dep": {"tps_per_gpu": 100.0,
                                                                                 "ttft_p50_s": 1.2}}})


def marks_of(results):
    return json.loads((results / "context_bench" / "timeline.json").read_text())["raw"]["dwdp"]["pull_timeline"][0][
        "marks"]


def test_figure_scripts_write_png_pdf_and_markdown(tmp_path):
    from experiments.figures import fig_ablations, fig_breakdown

    results, figures = tmp_path / "results", tmp_path / "figures"
    _synthetic_results(results)
    written = fig_breakdown.main(results, figures)
    assert sorted(p.name for p in written) == ["breakdown_tiny.pdf", "breakdown_tiny.png"]
    from experiments.figures import fig_pull_timeline

    written = fig_pull_timeline.main(results, figures)  # only the run with a pull timeline
    assert sorted(p.name for p in written) == ["pull_timeline_timeline.pdf", "pull_timeline_timeline.png"]
    assert fig_pull_timeline._pairs(marks_of(results), "copy_start", "copy_end") == [(0, 0.01, 40.0), (1, 40.0, 80.0)]
    written = fig_ablations.main(results, figures)  # every sweep of Tables 3-4, with or without measured points
    assert {"ablation_isl.pdf", "ablation_isl.png", "ablations.md"} <= {p.name for p in written}
    assert all(p.stat().st_size > 0 for p in written)
    table = (figures / "ablations.md").read_text()
    assert "| isl=8192 | unknown device | 111 | 100 | 1.110 | 1.100 |" in table
    assert fig_ablations.paper_speedups("contention", {"input_ratio": 0.5, "max_num_tokens": 16384,
                                                       "contention_mitigation": True}) == (None, 1.081)
    empty = tmp_path / "empty"
    assert fig_breakdown.main(empty, figures) == []


def test_malformed_breakdown_names_the_run(tmp_path):
    from experiments.figures import fig_breakdown

    _write_json(tmp_path / "context_bench" / "bad.json", {
        "run": "bad", "breakdown": {"dep": {"attention": {"ms": 1.0, "source": "guessed"}}}})
    with pytest.raises(ValueError, match="run bad: breakdown.dep.attention: source"):
        fig_breakdown.main(tmp_path, tmp_path / "figures")


def test_figures_command_runs_every_script(tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    _synthetic_results(results)
    done = subprocess.run([sys.executable, "-m", "experiments.figures", f"--results={results}",
                           f"--figures={figures}", "--nosimulate"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fig_breakdown: " in done.stdout and "breakdown_tiny.png" in done.stdout
    assert (figures / "ablation_isl.pdf").exists()


def test_dep_request_balance_ablation_keeps_token_imbalance():
    """balance="requests" spreads requests by count in FCFS order (no token balancing); "tokens" is LPT."""
    lengths = [90, 10, 80, 20, 70, 30, 60, 40]
    by_tokens = DepScheduler(_requests(lengths), num_ranks=2, max_num_tokens=1000, max_batch_size=8).next_step(0.0)
    by_count = DepScheduler(_requests(lengths), num_ranks=2, max_num_tokens=1000, max_batch_size=8,
                            balance="requests").next_step(0.0)
    assert [len(b.requests) for b in by_count] == [4, 4]
    assert [b.num_tokens for b in by_count] == [90 + 80 + 70 + 60, 10 + 20 + 30 + 40]
    assert abs(by_tokens[0].num_tokens - by_tokens[1].num_tokens) <= 10
    with pytest.raises(ValueError, match="balance"):
        DepScheduler(_requests(lengths), num_ranks=2, max_num_tokens=1000, max_batch_size=8, balance="nope")
