"""DWDP engine on CPU virtual devices: exactness against the reference, slot discipline, no collectives,
split-weight consumption, and independence of the per-device workers."""

import queue
import re
import threading

import jax
import numpy as np
import pytest

from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import stages
from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions, count_collectives
from dwdp_jax.serving.workers import RankWorkers, queue_source
from dwdp_jax.runtime.reference import prefill
from models import config as C
from models import deepseek_v3 as M
from models.deepseek_v3 import Params

CFG = C.tiny(num_hidden_layers=5, first_k_dense_replace=1)
BUDGET = 32


@pytest.fixture(scope="module")
def params():
    return Params(*M.init_model(CFG, seed=3))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def batches_for(num_ranks: int):
    """Different numbers of sequences per rank; the last rank gets none."""
    rng = np.random.default_rng(num_ranks)
    out = []
    for r in range(num_ranks - 1):
        lengths = rng.integers(1, 9, size=r + 1)
        out.append([pack([rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths], budget=BUDGET)])
    out.append([])
    out[0].append(pack([[5, 6, 7, 8, 9, 10, 11]], budget=BUDGET))  # rank 0 runs two steps
    return out


def assert_matches_reference(params, batch, output):
    ref = prefill(params, batch)
    assert rel_err(output.logits_TV, ref.logits_TV) <= 1e-6
    assert np.isfinite(output.logits_TV).all()
    for ours, theirs in zip(output.expert_ids, ref.expert_ids, strict=True):
        np.testing.assert_array_equal(np.sort(ours, 1), np.sort(theirs, 1))


def run_workers(engine, per_rank, pause_rank=None):
    queues = [queue.Queue() for _ in range(engine.num_ranks)]
    for q, batches in zip(queues, per_rank):
        for b in batches:
            q.put(b)
    results, lock, done = [], threading.Lock(), [threading.Event() for _ in queues]

    def sink(rank, batch, result):
        with lock:
            results.append((rank, batch, result))
            if sum(r == rank for r, _, _ in results) == len(per_rank[rank]):
                done[rank].set()

    for r, batches in enumerate(per_rank):
        if not batches:
            done[r].set()
    workers = RankWorkers(engine, queue_source(queues), sink)
    if pause_rank is not None:
        workers.pause(pause_rank)
    workers.start()
    return workers, queues, results, done


def finish(workers, queues):
    for q in queues:
        q.put(None)
    workers.join(timeout_s=120)


@pytest.mark.parametrize("transport", ["device_put", "copy_engine"])
@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_matches_reference_with_poisoned_slots(params, num_ranks, transport):
    placement = Placement.for_group(CFG.n_routed_experts, num_ranks)
    if num_ranks == 3:
        assert placement.local_experts > placement.prefetch_experts  # redundant placement
    engine = DwdpEngine(params, placement, options=DwdpOptions(poison=True, transport=transport))
    per_rank = batches_for(num_ranks)
    workers, queues, results, _ = run_workers(engine, per_rank)
    finish(workers, queues)
    assert sorted(r for r, _, _ in results) == sorted(r for r, b in enumerate(per_rank) for _ in b)
    for _, batch, result in results:
        assert_matches_reference(params, batch, result.output)


@pytest.mark.parametrize("options", [DwdpOptions(slices=3), DwdpOptions(prefetch=False),
                                     DwdpOptions(merge_experts=True), DwdpOptions(),
                                     DwdpOptions(transport="copy_engine", slices=3, poison=True),
                                     DwdpOptions(transport="copy_engine", merge_experts=True, poison=True),
                                     DwdpOptions(transport="copy_engine", slice_bytes=1000, poison=True),
                                     DwdpOptions(pull_issue="after_attention", poison=True),
                                     DwdpOptions(transport="copy_engine", pull_issue="after_attention", poison=True),
                                     DwdpOptions(transport="copy_engine", pull_issue="after_attention", slices=2,
                                                 poison=True)],
                         ids=["sliced", "no_prefetch", "merged", "profiled", "copy_engine_sliced", "copy_engine_merged",
                              "copy_engine_byte_slices", "issue_after_attention", "copy_engine_issue_after_attention",
                              "copy_engine_issue_after_attention_profiled"])
def test_ablations_stay_exact(params, options):
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4), options=options)
    batch = pack([[1, 2, 3], [4, 5, 6, 7, 8, 9]], budget=BUDGET)
    profile = options in (DwdpOptions(), DwdpOptions(transport="copy_engine", merge_experts=True, poison=True),
                          DwdpOptions(transport="copy_engine", pull_issue="after_attention", slices=2, poison=True))
    for rank in range(4):
        result = engine.step(rank, batch, profile=profile)
        assert_matches_reference(params, batch, result.output)
        assert bool(result.stages_s) == profile
        if profile:
            assert set(result.stages_s) == {"embed", "attention", "dense_mlp", "moe", "pull_wait", "head", "host"}
            assert all(v >= 0 for v in result.stages_s.values())
            assert min(result.stages_s[k] for k in ("attention", "dense_mlp", "moe")) > 0


def test_last_token_logits(params):
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2), options=DwdpOptions(last_token_logits=4))
    batch = pack([[1, 2, 3], [4, 5, 6, 7, 8, 9]], budget=BUDGET)
    ref = prefill(params, batch)
    out = engine.step(1, batch).output
    assert out.logits_TV.shape == (2, CFG.vocab_size)
    assert rel_err(out.logits_TV, ref.logits_TV[batch.last_token_index()]) <= 1e-6
    with pytest.raises(ValueError, match="more than last_token_logits"):
        engine.step(1, pack([[1]] * 5, budget=BUDGET))
    # the refusal came before any pull: the same engine keeps working
    assert rel_err(engine.step(1, batch).output.logits_TV, ref.logits_TV[batch.last_token_index()]) <= 1e-6


def test_poisoned_stale_slot_is_visible(params):
    """The poison is live: a view built from a released slot reads NaN."""
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4), options=DwdpOptions(poison=True))
    t = engine.transport
    t.pull(1, 0, 0)
    t.release(1, 0)
    stale = t.slots[1][0][1]
    assert stale and all(np.isnan(np.asarray(s.w_gate_EDF)).all() for s in stale)
    with pytest.raises(RuntimeError, match="holds nothing"):
        t.acquire(1, 0, 0)


def test_slot_protocol_refuses_overwrite_before_release(params):
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2))
    engine.transport.pull(0, 0, 0)
    with pytest.raises(RuntimeError, match="write-after-read"):
        engine.transport.pull(0, 2, 0)


def expert_weight_concats(hlo: str) -> list[str]:
    d, f = CFG.hidden_size, CFG.moe_intermediate_size
    shapes = re.findall(r"= \w+\[(\d+),(\d+),(\d+)\][^ ]* concatenate\(", hlo)
    return [s for s in shapes if (int(s[1]), int(s[2])) in ((d, f), (f, d))]


@pytest.mark.parametrize("transport", ["device_put", "copy_engine"])
def test_programs_have_no_collectives_and_no_weight_merge(params, transport):
    batch = pack([[1, 2, 3]], budget=BUDGET)
    split = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4),
                       options=DwdpOptions(transport=transport)).compiled_hlo(batch, rank=1)
    assert set(split) == {"front", "moe_layer", "head"}
    assert all(count_collectives(text) == 0 for text in split.values())
    assert expert_weight_concats(split["moe_layer"]) == []
    merged = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4),
                        options=DwdpOptions(merge_experts=True)).compiled_hlo(batch, rank=1)
    assert expert_weight_concats(merged["moe_layer"])  # the detector sees a merge when there is one


def test_workers_progress_while_rank0_is_paused(params):
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4))
    per_rank = [[pack([[1, 2, 3, 4]], budget=BUDGET)]] + [
        [pack([[r, 7, 9], [11 + i]], budget=BUDGET) for i in range(3)] for r in range(1, 4)]
    workers, queues, results, done = run_workers(engine, per_rank, pause_rank=0)
    for r in range(1, 4):
        assert done[r].wait(timeout=120), f"rank {r} did not finish while rank 0 was paused"
    assert not any(r == 0 for r, _, _ in results)
    for _, batch, result in results:
        assert_matches_reference(params, batch, result.output)
    workers.resume(0)
    assert done[0].wait(timeout=120)
    finish(workers, queues)
    assert_matches_reference(params, per_rank[0][0], next(res for r, _, res in results if r == 0).output)


def test_bad_groups_fail_before_device_work(params):
    with pytest.raises(ValueError, match="n_routed_experts"):
        DwdpEngine(params, Placement.for_group(16, 4))
    with pytest.raises(ValueError, match="needs 4 devices, have 2"):
        DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 4), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="slices"):
        DwdpOptions(slices=0)


def test_memory_budget_refuses_before_placing(params):
    with pytest.raises(ValueError, match="does not fit.*device_bytes"):
        DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                   options=DwdpOptions(device_bytes=1024, max_num_tokens=BUDGET))
    DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
               options=DwdpOptions(device_bytes=1 << 30, max_num_tokens=BUDGET))


def test_synthetic_experts_and_streaming_reference(params):
    """Experts generated on each device from (seed, layer, expert) equal the same rows generated anywhere else, and
    DWDP over synthetic experts equals the streaming reference (all experts of a layer in one slab)."""
    from dwdp_jax.expert_source import SyntheticExperts
    from dwdp_jax.runtime.reference import prefill_streaming

    source = SyntheticExperts(CFG, seed=11)
    devices = jax.devices()
    whole = source.rows(1, 0, 8, devices[0])
    part = source.rows(1, 3, 6, devices[2])
    np.testing.assert_array_equal(np.asarray(part.w_down_EFD), np.asarray(whole.w_down_EFD)[3:6])
    assert part.start == 3
    synthetic = Params(params.model, source)
    batch = pack([[3, 1, 4, 1, 5], [9, 2, 6]], budget=BUDGET)
    ref = prefill_streaming(params.model, source, batch, devices[1])
    full = prefill(Params(params.model, tuple(source.rows(m, 0, 8, devices[0]) for m in range(CFG.num_moe_layers))),
                   batch)
    assert rel_err(ref.logits_TV, full.logits_TV) <= 1e-6
    engine = DwdpEngine(synthetic, Placement.for_group(CFG.n_routed_experts, 3))
    for rank in range(3):
        out = engine.step(rank, batch).output
        assert rel_err(out.logits_TV, ref.logits_TV) <= 1e-6


def test_eight_ranks_dwdp_and_dep_match_reference():
    """Group size 8 (the 8-GPU issue's shape) on 8 CPU virtual devices, both strategies, contention slicing on."""
    from dwdp_jax.runtime.dep import DepRuntime

    cfg = C.tiny(num_hidden_layers=3, n_routed_experts=16)
    params = Params(*M.init_model(cfg, seed=8))
    batches = [pack([[r + 1] * (r + 2), [7, 8]], budget=16) if r % 3 else None for r in range(8)]
    engine = DwdpEngine(params, Placement.for_group(16, 8), options=DwdpOptions(slices=2, poison=True))
    dep_outs = DepRuntime(params, 8, 16, dispatch="dense").step(batches)
    for r, batch in enumerate(batches):
        if batch is None:
            continue
        assert_matches_reference(params, batch, engine.step(r, batch).output)
        assert_matches_reference(params, batch, dep_outs[r])


def test_copy_engine_moves_each_remote_byte_once_and_keeps_no_state(params):
    """Per layer, the copies cover exactly the rank's remote experts (the placement's bytes, every expert once,
    into its own rows of the persistent slots), and after steps no sealed pull or pending read is left behind."""
    placement = Placement.for_group(CFG.n_routed_experts, 3)  # redundant: uneven pulls per owner
    engine = DwdpEngine(params, placement, options=DwdpOptions(transport="copy_engine", slices=2))
    t = engine.transport
    slot_ids = [id(s.w_gate_EDF) for slot in t.buffers[1] for s in slot]
    for _ in range(3):
        engine.step(1, pack([[1, 2, 3, 4]], budget=BUDGET))
    assert [id(s.w_gate_EDF) for slot in t.buffers[1] for s in slot] == slot_ids  # persistent: allocated once
    assert not t._sealed[1] and not t._reads[1] and not t._requested[1]
    t.pull(1, 0, 0)
    (batch,) = t._requested[1]
    expert_bytes = sum(int(np.prod(getattr(params.experts[0], w).shape[1:])) * 4 for w in
                       ("w_gate_EDF", "w_up_EDF", "w_down_EFD"))
    assert sum(c.nbytes for c in batch.copies) == placement.bytes_pulled_per_layer(1, expert_bytes)
    gate_start = {id(s.w_gate_EDF): s.start for s in t.buffers[1][0]}
    covered = [gate_start[id(c.dst)] + c.dst_row + r for c in batch.copies if id(c.dst) in gate_start
               for r in range(c.rows)]
    start, stop = placement.local_range(1)
    assert sorted(covered) == [e for e in range(CFG.n_routed_experts) if not start <= e < stop]


def test_copy_engine_without_its_fences_reads_poison(params, monkeypatch):
    """The fences are what fills the slots: a program that skips the issue fence reads the NaN-poisoned slot."""
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                        options=DwdpOptions(transport="copy_engine", poison=True))
    batch = pack([[1, 2, 3]], budget=BUDGET)
    assert np.isfinite(engine.step(0, batch).output.logits_TV).all()
    from dwdp_jax.transport import copy_engine
    monkeypatch.setattr(copy_engine.HostCopier, "issue", lambda self, rank, ctx, batches, poison: [
        self._writable(t).__setitem__(Ellipsis, np.nan) for b in batches for t in b.targets])
    assert np.isnan(engine.step(0, batch).output.logits_TV).all()


@pytest.mark.parametrize("pull_issue,expected", [
    # front: layers 0 and 1; each MoE program waits for its slot, then issues layer m + 2 into it
    ("after_moe", [("issue", [(0, 0), (1, 1)]), ("wait", 0), ("issue", [(2, 0)]), ("wait", 1), ("issue", [(3, 1)]),
                   ("wait", 0), ("issue", []), ("wait", 1), ("issue", [])]),
    # front: layer 0 only; MoE program m issues layer m + 1 into the other slot after its attention, then waits
    ("after_attention", [("issue", [(0, 0)]), ("issue", [(1, 1)]), ("wait", 0), ("issue", [(2, 0)]), ("wait", 1),
                         ("issue", [(3, 1)]), ("wait", 0), ("issue", []), ("wait", 1)]),
])
def test_copy_engine_issue_point(params, monkeypatch, pull_issue, expected):
    """The order in which a step's programs issue pulls (layer, slot) and wait for slots, per issue point."""
    from dwdp_jax.transport import copy_engine

    events = []
    issue, wait = copy_engine.HostCopier.issue, copy_engine.HostCopier.wait
    monkeypatch.setattr(copy_engine.HostCopier, "issue", lambda self, rank, ctx, batches, poison: (
        events.append(("issue", [(b.layer, b.slot) for b in batches])), issue(self, rank, ctx, batches, poison)))
    monkeypatch.setattr(copy_engine.HostCopier, "wait", lambda self, rank, ctx, slot: (
        events.append(("wait", slot)), wait(self, rank, ctx, slot)))
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                        options=DwdpOptions(transport="copy_engine", pull_issue=pull_issue, poison=True))
    batch = pack([[1, 2, 3, 4, 5]], budget=BUDGET)
    for _ in range(2):  # the second step reuses the slots the first one left
        events.clear()
        assert_matches_reference(params, batch, engine.step(1, batch).output)
        assert events == expected


def test_pull_issue_is_validated():
    with pytest.raises(ValueError, match=r"pull_issue must be one of \('after_moe', 'after_attention'\)"):
        DwdpOptions(pull_issue="early")
    with pytest.raises(ValueError, match="prefetch=False pulls each layer right before its MoE"):
        DwdpOptions(pull_issue="after_attention", prefetch=False)


def test_byte_slices_cover_every_copy_once_round_robin_over_owners():
    from dwdp_jax.transport.copy_engine import Copy, chunks

    src = [np.zeros((4, 10), np.float32), np.zeros((2, 10), np.float32)]  # 40-byte rows
    copies = (Copy(src[0], 1, 1, None, 0, 3), Copy(src[1], 2, 0, None, 3, 2), Copy(src[0], 1, 0, None, 5, 1))
    plan = chunks(copies, 50)
    assert [c.src_rank for c, _, _ in plan[:4]] == [1, 2, 1, 2]  # alternating sources
    for c in copies:
        pieces = sorted((off, n) for cc, off, n in plan if cc is c)
        assert all(n <= 50 for _, n in pieces) and sum(n for _, n in pieces) == c.nbytes
        assert [off for off, _ in pieces] == list(range(0, c.nbytes, 50))
    assert chunks(copies, 0) == [(c, 0, c.nbytes) for c in copies]


def test_byte_slices_need_the_copy_engine():
    with pytest.raises(ValueError, match="slice_bytes=2048 needs transport='copy_engine'"):
        DwdpOptions(slice_bytes=2048)
    with pytest.raises(ValueError, match="slice_bytes must be an integer >= 0"):
        DwdpOptions(transport="copy_engine", slice_bytes=-1)


def test_timeline_needs_the_copy_engine_on_gpus(params):
    with pytest.raises(ValueError, match="timeline needs transport='copy_engine'"):
        DwdpOptions(timeline=True)
    with pytest.raises(ValueError, match="timeline needs GPU devices"):
        DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                   options=DwdpOptions(transport="copy_engine", timeline=True))


def test_copy_engine_refuses_synchronous_pulls(params):
    with pytest.raises(ValueError, match="prefetch=False needs a transport that copies on request"):
        DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                   options=DwdpOptions(transport="copy_engine", prefetch=False))


def test_deleted_copy_engine_releases_its_slots(params):
    """The compiled programs keep their fences (static jit arguments) but not the transport and its slot buffers:
    a benchmark frees one strategy's memory before building the next."""
    import gc
    import weakref

    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                        options=DwdpOptions(transport="copy_engine"))
    engine.step(0, pack([[1, 2, 3]], budget=BUDGET))
    slot = weakref.ref(engine.transport.buffers[0][0][0].w_gate_EDF)
    transport = weakref.ref(engine.transport)
    del engine
    gc.collect()
    assert transport() is None and slot() is None


def _moe_layer_args(engine) -> tuple:
    """`stages.moe_layer`'s arguments for rank 0's first MoE layer over a 3-token batch (x abstract)."""
    batch = pack([[1, 2, 3]], budget=BUDGET)
    w = engine.ranks[0]
    segment_ids, positions = jax.device_put((batch.segment_ids_T, batch.positions_T), w.device)
    embed = w.weights.embed_VD
    x = jax.ShapeDtypeStruct((batch.budget, CFG.hidden_size), embed.dtype, sharding=embed.sharding)
    return (engine.graphs.moe, w.weights.moe_states[0], x, segment_ids, positions,
            engine._view(0, 0, engine.transport.remote_specs(0)))


def test_copy_engine_fences_order_the_moe_program(params):
    """The lowered MoE program: the wait fence's token passes an optimization barrier with every expert weight (no
    weight is read except through it), and the issue fence takes the layer's output (so it runs after the reads)."""
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2),
                        options=DwdpOptions(transport="copy_engine"))
    args = _moe_layer_args(engine)
    text = stages.moe_layer.lower(*args, hook=engine.transport.hook(0)).as_text()
    calls = re.findall(r"(%\d+) = stablehlo.custom_call @\w*callback\w*\((%\w+)\)", text)
    assert len(calls) == 2
    (wait_token, _), (issue_token, issued_after) = calls
    barrier = next(line for line in text.splitlines() if "optimization_barrier" in line and wait_token + " " in line)
    weights = re.findall(r"(%arg\d+)", barrier)
    assert len(weights) == 6  # local + remote slab, gate/up/down each
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("func.func public @main"))
    body = lines[start + 1:lines.index("  }", start)]  # main's body, not its signature or private functions
    for arg in weights:
        uses = [line for line in body if re.search(re.escape(arg) + r"\b", line)]
        assert uses == [barrier], f"{arg} is read outside the fenced barrier"
    returned = next(line for line in body if line.lstrip().startswith("return "))
    final = next(line for line in body if issue_token in line and "optimization_barrier" in line)
    # the issue fence takes the layer output, and the program returns that output through the fence's barrier
    assert issued_after in final and final.split("=")[0].strip().split(":")[0] + "#0" in returned
    with pytest.raises(ValueError, match=r"issue_after must be one of \('moe', 'attention'\), got 'early'"):
        stages.moe_layer.lower(*args, hook=engine.transport.hook(0), issue_after="early")


def _lowered_moe_layer(params):
    """Rank 0's MoE program (DWDP over 2 ranks) as an MLIR module, and an op's name path (`jit(moe_layer)/...`)."""
    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2))
    module = stages.moe_layer.lower(*_moe_layer_args(engine)).compiler_ir()
    return module, lambda op: re.search(r'loc\("([^"]+)"', str(op.location)).group(1)


def test_every_rms_norm_of_the_moe_layer_is_the_norm_stage(params):
    """The layer's RMSNorms (input, post-attention, and q_a's and kv_a's inside mla_proj) are named under `norm`:
    on GPU each is a fusion of its own, which a trace's breakdown otherwise counts as `other` (0.32 ms each at
    32768 tokens of R1's width in bf16)."""
    from dwdp_jax import stage_trace

    module, name_of = _lowered_moe_layer(params)

    def walk(ops):
        for op in ops:
            yield op
            yield from (o for r in op.regions for b in r.blocks for o in walk(b.operations))

    names = [name_of(op) for op in walk(module.body.operations) if op.name == "stablehlo.rsqrt"]
    assert len(names) == 4 and {stage_trace.stage_of(n) for n in names} == {"norm"}, names


def test_the_staged_embedding_and_logits_are_the_embed_and_lm_head_stages(params):
    """The staged runtime's first and last programs (the reference's and DWDP's) name the embedding's gather `embed`
    and the logits GEMM `lm_head`, as the model's own methods do: on GPU each (0.38 and 0.60 ms at R1's width, 32768
    tokens) counted as `other`."""
    from dwdp_jax import stage_trace

    engine = DwdpEngine(params, Placement.for_group(CFG.n_routed_experts, 2))
    w = engine.ranks[0].weights
    batch = pack([[1, 2, 3]], budget=BUDGET)
    tokens, segment_ids, positions = jax.device_put((batch.tokens_T, batch.segment_ids_T, batch.positions_T),
                                                    engine.ranks[0].device)
    x = jax.ShapeDtypeStruct((BUDGET, CFG.hidden_size), w.embed_VD.dtype, sharding=w.embed_VD.sharding)
    programs = {
        "stablehlo.gather": stages.front.lower(engine.graphs.dense, w.dense_states, w.embed_VD, tokens, segment_ids,
                                               positions),
        "stablehlo.dot_general": stages.head.lower(engine.graphs.norm, w.norm_state, w.lm_head_DV, x)}
    for (op_kind, lowered), stage in zip(programs.items(), ("embed", "lm_head")):
        main = next(op for op in lowered.compiler_ir().body.operations
                    if str(op.attributes["sym_name"]) == '"main"')
        ops = [op for op in main.regions[0].blocks[0].operations if op.name == op_kind]
        names = [re.search(r'loc\("([^"]+)"', str(op.location)).group(1) for op in ops]
        assert names and {stage_trace.stage_of(n) for n in names} == {stage}, (op_kind, names)


def test_the_moe_layers_residual_add_is_the_combine_stage(params):
    """The MoE layer's output, the residual add that XLA fuses the combine's weighted sum into (on GPU the fusion
    takes the add's name), is named under `moe_combine`, so a trace's breakdown counts that fusion as the combine
    instead of `other`."""
    from dwdp_jax import stage_trace

    module, name_of = _lowered_moe_layer(params)
    main = next(op for op in module.body.operations if str(op.attributes["sym_name"]) == '"main"')
    body = main.regions[0].blocks[0].operations
    returned = body[len(body) - 1]
    out = returned.operands[0].owner
    name = name_of(out)
    assert out.name == "stablehlo.add" and stage_trace.stage_of(name) == "moe_combine", (out.name, name)
