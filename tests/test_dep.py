"""DEP runtime: exact against the reference on CPU virtual devices, both dispatch backends, validation before any
device work, and the collectives of the compiled program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.packing import pack
from dwdp_jax.runtime import dep, watchdog
from dwdp_jax.runtime.reference import prefill
from models.config import tiny
from models.deepseek_v3 import Params, init_model

BUDGET = 32


@pytest.fixture(scope="module")
def params():
    return Params(*init_model(tiny(n_routed_experts=8)))


@pytest.fixture(scope="module")
def dense_runs(params):
    """num_ranks -> (dense runtime, its batches, its outputs), built once per module: compiling dominates."""
    cache = {}

    def get(num_ranks):
        if num_ranks not in cache:
            runtime = dep.DepRuntime(params, num_ranks, BUDGET, dispatch="dense")
            batches = _rank_batches(num_ranks, params.model.cfg.vocab_size)
            cache[num_ranks] = runtime, batches, runtime.step(batches)
        return cache[num_ranks]

    return get


def _sequences(rng, lengths, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _rank_batches(num_ranks, vocab):
    """Different token counts per rank, one rank with no sequences, one batch packed to a larger budget than
    the runtime's (it fits, so it is re-padded)."""
    rng = np.random.default_rng(num_ranks)
    if num_ranks == 2:
        return [pack(_sequences(rng, [9, 14], vocab), budget=BUDGET), None]
    return [pack(_sequences(rng, [7, 9], vocab), budget=BUDGET), None,
            pack(_sequences(rng, [BUDGET], vocab), budget=BUDGET),
            pack(_sequences(rng, [3, 4, 5], vocab), budget=64)]


def _rel_err(outs, refs):
    a = np.concatenate([o.logits_TV for o in outs])
    b = np.concatenate([r.logits_TV for r in refs])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """jax.lax.ragged_all_to_all's documented semantics built from dense all_to_alls (XLA:CPU lacks the op):
    slice i of the sender goes to rank i // (len / N) at the receiver's offset output_offsets[i] (the sender's)."""
    rows_R = jnp.arange(operand.shape[0])
    slices_GRD = jnp.take(operand, input_offsets[:, None] + rows_R, axis=0, mode="fill", fill_value=0)
    slices_GRD = jnp.where((rows_R < send_sizes[:, None])[..., None], slices_GRD, 0)
    recv_GRD = jax.lax.all_to_all(slices_GRD, axis_name, 0, 0, tiled=True)
    offsets_G = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    target_GR = jnp.where(rows_R < recv_sizes[:, None], offsets_G[:, None] + rows_R, output.shape[0])
    return output.at[target_GR.reshape(-1)].set(recv_GRD.reshape(-1, operand.shape[1]), mode="drop")


def _all_to_all_operands(hlo: str) -> list[tuple[str, int, int]]:
    """(dtype, elements, last dimension) of each all-to-all's result in compiled HLO, a tuple's elements summed."""
    out = []
    for result in re.findall(r"%all-to-all[.\d]* = (.*?) all-to-all\(", hlo):
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", result)
        dims = [[int(x) for x in d.split(",")] for _, d in shapes]
        out.append((shapes[0][0], sum(int(np.prod(d)) for d in dims), dims[0][-1]))
    return out


def _count(op, hlo):
    """Instructions of an HLO op (sync or async start), not counting longer op names that end with it."""
    return len(re.findall(rf"(?<![\w-]){op}(?:-start)?\(", hlo))


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_dense_dep_equals_reference(params, dense_runs, num_ranks):
    cfg = params.model.cfg
    _, batches, outs = dense_runs(num_ranks)
    real = [(o, b) for o, b in zip(outs, batches) if b is not None]
    refs = [prefill(params, b) for _, b in real]
    assert _rel_err([o for o, _ in real], refs) <= 1e-6
    experts_per_rank = cfg.n_routed_experts // num_ranks
    for (out, batch), ref in zip(real, refs):
        assert out.logits_TV.shape == (batch.num_tokens, cfg.vocab_size)
        assert len(out.expert_ids) == cfg.num_moe_layers
        for ids, ref_ids in zip(out.expert_ids, ref.expert_ids):
            np.testing.assert_array_equal(ids, ref_ids)
            assert len(np.unique(ids // experts_per_rank)) > 1  # the rows really went to several ranks
    for out, batch in zip(outs, batches):
        if batch is None:
            assert out.logits_TV.shape == (0, cfg.vocab_size) and all(i.shape[0] == 0 for i in out.expert_ids)


def test_ragged_offsets_match_dense_with_emulated_collective(params, dense_runs, monkeypatch):
    """The ragged backend's offsets and sizes, checked on CPU through an emulation of the collective."""
    _, batches, dense = dense_runs(4)
    monkeypatch.setattr(dep, "ragged_all_to_all", _emulated_ragged_all_to_all)
    monkeypatch.setattr(dep, "RAGGED_PLATFORMS", dep.RAGGED_PLATFORMS + ("cpu",))
    ragged = dep.DepRuntime(params, 4, BUDGET, dispatch="ragged").step(batches)
    for d, r in zip(dense, ragged):
        np.testing.assert_array_equal(d.logits_TV, r.logits_TV)
        for a, b in zip(d.expert_ids, r.expert_ids):
            np.testing.assert_array_equal(a, b)


def test_moe_layers_share_their_all_to_all_buffers_and_never_read_past_their_rows(params, dense_runs, monkeypatch):
    """Each MoE layer's dispatch and combine write into the previous layer's buffers (XLA:GPU would keep one per
    layer), and first buffers of NaN change nothing: no stage reads the rows past a layer's received or sent total
    (padding tokens' MoE output is zeroed)."""
    _, batches, dense = dense_runs(4)
    dispatch_calls, combine_calls = [], []

    def recording(operand, output, *args, **kwargs):
        result = _emulated_ragged_all_to_all(operand, output, *args, **kwargs)
        # the dispatch fills N*M receive rows, the combine returns M rows
        (dispatch_calls if output.shape[0] > operand.shape[0] else combine_calls).append((output, result))
        return result

    monkeypatch.setattr(dep, "ragged_all_to_all", recording)
    monkeypatch.setattr(dep, "RAGGED_PLATFORMS", dep.RAGGED_PLATFORMS + ("cpu",))
    monkeypatch.setattr(dep, "RECEIVE_FILL", float("nan"))
    ragged = dep.DepRuntime(params, 4, BUDGET, dispatch="ragged").step(batches)
    num_moe = params.model.cfg.num_moe_layers
    assert num_moe >= 2 and len(dispatch_calls) == len(combine_calls) == num_moe  # one trace of the step
    for calls in (dispatch_calls, combine_calls):
        for (_, previous), (output, _) in zip(calls, calls[1:]):
            assert output is previous
    assert any(b is not None and (b.segment_ids_T < 0).any() for b in batches)  # padding tokens are in play
    for d, r in zip(dense, ragged):
        np.testing.assert_array_equal(d.logits_TV, r.logits_TV)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs 2 GPUs")
def test_ragged_equals_dense_and_reference_on_gpu(params):
    num_ranks = 4 if jax.device_count() >= 4 else 2
    batches = _rank_batches(num_ranks, params.model.cfg.vocab_size)
    ragged_runtime = dep.DepRuntime(params, num_ranks, BUDGET)
    assert ragged_runtime.dispatch == "ragged"
    ragged = ragged_runtime.step(batches)
    dense = dep.DepRuntime(params, num_ranks, BUDGET, dispatch="dense").step(batches)
    real = [i for i, b in enumerate(batches) if b is not None]
    refs = [prefill(params, batches[i]) for i in real]
    # GPU matmuls may use TF32 or split-K differently per shape: compare to the reference loosely, exactly between
    # the backends (same rows, same grouped GEMM shapes).
    assert _rel_err([ragged[i] for i in real], refs) <= 1e-2
    for d, r in zip(dense, ragged):
        np.testing.assert_array_equal(d.logits_TV, r.logits_TV)
    hlo = ragged_runtime.compiled_hlo()
    assert _count("ragged-all-to-all", hlo) == 2 * params.model.cfg.num_moe_layers
    assert _count("all-to-all", hlo) == params.model.cfg.num_moe_layers


def test_ragged_on_cpu_is_refused(params):
    with pytest.raises(ValueError, match="ragged_all_to_all.*dispatch='dense'"):
        dep.DepRuntime(params, 2, BUDGET, dispatch="ragged")


def test_bad_layouts_raise_before_device_work(params, monkeypatch):
    def no_device_work(*args, **kwargs):
        raise AssertionError("device work before validation")

    monkeypatch.setattr(jax, "device_put", no_device_work)
    with pytest.raises(ValueError, match=r"num_ranks=9 exceeds the 8 available devices; allowed range \[1, 8\]"):
        dep.DepRuntime(params, 9, BUDGET)
    with pytest.raises(ValueError, match="num_ranks must be an integer >= 1"):
        dep.DepRuntime(params, 0, BUDGET)
    with pytest.raises(ValueError, match=r"n_routed_experts \(8\) must be divisible by num_ranks \(3\)"):
        dep.DepRuntime(params, 3, BUDGET)
    with pytest.raises(ValueError, match="token_budget must be an integer >= 1"):
        dep.DepRuntime(params, 2, 0)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        dep.DepRuntime(params, 2, BUDGET, dispatch="nccl")
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        dep.DepRuntime(params, 2, BUDGET, gemm_backend="cutlass")
    with pytest.raises(ValueError, match=r"step_timeout_s must be a number >= 0 \(0: no deadline\)"):
        dep.DepRuntime(params, 2, BUDGET, step_timeout_s=-1)


def test_a_step_past_its_deadline_exits_saying_why(params, monkeypatch):
    """A hung SPMD step cannot be interrupted, so the deadline ends the process; here the exit is recorded.
    The first step compiles (seconds on CPU), far past a 1 ms deadline; a step within its deadline does not."""
    said = []
    monkeypatch.setattr(watchdog, "abort", said.append)
    batches = _rank_batches(2, params.model.cfg.vocab_size)
    dep.DepRuntime(params, 2, BUDGET, dispatch="dense", step_timeout_s=1e-3).step(batches)
    assert len(said) == 1 and said[0].startswith("a DEP2 step did not finish in 0.001 s") and "exiting" in said[0]
    said.clear()
    dep.DepRuntime(params, 2, BUDGET, dispatch="dense", step_timeout_s=600).step(batches)
    assert said == []


def test_bad_batches_raise_before_device_work(params, monkeypatch):
    runtime = dep.DepRuntime(params, 2, BUDGET)
    assert runtime.dispatch == "dense"  # the CPU default

    def no_device_work(*args, **kwargs):
        raise AssertionError("device work before validation")

    monkeypatch.setattr(jax, "device_put", no_device_work)
    monkeypatch.setattr(runtime, "_forward", no_device_work)
    vocab = params.model.cfg.vocab_size
    too_big = pack(_sequences(np.random.default_rng(0), [BUDGET + 1], vocab))
    with pytest.raises(ValueError, match=r"batches\[1\] has 33 tokens; allowed range \[0, token_budget=32\]"):
        runtime.step([None, too_big])
    with pytest.raises(ValueError, match=r"got 3 batches, expected one per rank \(num_ranks=2\)"):
        runtime.step([None, None, None])
    with pytest.raises(ValueError, match=r"batches\[0\] must be a PackedBatch or None"):
        runtime.step([[1, 2, 3], None])


def test_step_that_cannot_allocate_is_refused_before_running(params, monkeypatch):
    """On a GPU one rank out of memory would leave the others in their collectives: the first step compares the
    compiled program's temporaries with every device's largest free block and refuses before running."""
    from dwdp_jax import memory

    runtime = dep.DepRuntime(params, 2, BUDGET)
    need = runtime.check_memory()
    assert need > 0

    def no_run(*args, **kwargs):
        raise AssertionError("the step ran")

    monkeypatch.setattr(runtime, "_forward", no_run)
    monkeypatch.setattr(memory, "largest_free_block", lambda device: need - 1)
    batch = pack(_sequences(np.random.default_rng(0), [5], params.model.cfg.vocab_size))
    with pytest.raises(ValueError, match=r"DEP2 step at 32 tokens per rank needs .*\(device 0: .*memory_fraction"):
        runtime.step([batch, None])
    monkeypatch.setattr(memory, "largest_free_block", lambda device: need)
    with pytest.raises(AssertionError, match="the step ran"):  # fits: the check passes and the step runs
        runtime.step([batch, None])


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_compiled_program_has_three_all_to_alls_per_moe_layer_and_no_gathers(params, dense_runs, num_ranks):
    hlo = dense_runs(num_ranks)[0].compiled_hlo()
    # Per MoE layer: the count exchange, the dispatch and the combine; expert weights never move.
    assert _count("all-to-all", hlo) == 3 * params.model.cfg.num_moe_layers
    for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "collective-broadcast"):
        assert _count(op, hlo) == 0, op


def test_profile_times_every_stage_and_reproduces_the_fast_path(params, dense_runs):
    cfg = params.model.cfg
    runtime, batches, fast = dense_runs(4)
    programs = runtime._forward._cache_size()
    prof = runtime.profile(batches, repeats=2)
    # the empty rank computes nothing alone; timing it would compile an all-empty step inside the measurement
    assert runtime._forward._cache_size() == programs
    for f, p in zip(fast, prof.outputs):
        np.testing.assert_array_equal(f.logits_TV, p.logits_TV)
    moe_stages = {"attention", "router", "dispatch", "moe_gmm", "combine", "shared_expert"}
    for i, stages in enumerate(prof.layer_stage_s):
        assert set(stages) == (moe_stages if cfg.is_moe_layer(i) else {"attention", "dense_mlp"})
        assert all(s > 0 for s in stages.values())
    assert batches[1] is None and prof.rank_alone_s[1] == 0.0
    assert len(prof.rank_alone_s) == 4 and all(s > 0 for r, s in enumerate(prof.rank_alone_s) if r != 1)
    assert prof.sync_overhead == pytest.approx(1 - np.mean(prof.rank_alone_s) / prof.step_s)
    assert prof.profiled_step_s == pytest.approx(sum(prof.stage_total_s.values()))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        runtime.profile(batches, repeats=0)


def test_dep_buckets_last_token_logits_and_synthetic_experts():
    """Per-step budgets (the fullest rank's bucket), last-token logits, and experts generated shard by shard on
    each rank's device equal the reference on the same (synthetic) weights."""
    from dwdp_jax.expert_source import SyntheticExperts
    from dwdp_jax.runtime.reference import prefill_streaming

    cfg = tiny(num_hidden_layers=3, first_k_dense_replace=1)
    model, _ = init_model(cfg, seed=4)
    source = SyntheticExperts(cfg, seed=9)
    runtime = dep.DepRuntime(Params(model, source), 4, 64, dispatch="dense", last_token_logits=3)
    batches = [pack([[1, 2, 3], [4, 5, 6, 7]], budget=16), None, pack([[9, 8, 7, 6, 5]], budget=16), None]
    outs = runtime.step(batches)
    for batch, out in zip(batches, outs):
        if batch is None:
            assert out.logits_TV.shape[0] == 0
            continue
        ref = prefill_streaming(model, source, batch, jax.devices()[0])
        last = batch.last_token_index()
        assert out.logits_TV.shape == (len(batch.lengths), cfg.vocab_size)
        err = np.linalg.norm(out.logits_TV - ref.logits_TV[last]) / np.linalg.norm(ref.logits_TV[last])
        assert err <= 1e-6
        for a, b in zip(out.expert_ids, ref.expert_ids):
            np.testing.assert_array_equal(np.sort(a, 1), np.sort(b, 1))


def test_fp8_experts_get_their_tokens_sent_quantized():
    """FP8 experts on a split backend: each token is quantized once before the dispatch, which moves its e4m3 bytes
    and fp32 scales (0.52 of the bf16 rows' bytes at hidden 256) where the combine moves bf16; the logits are those
    of the same model with the rows quantized after the dispatch (XLA's grouped GEMM), the experts chosen equal."""
    cfg = tiny(n_routed_experts=8, hidden_size=256, moe_intermediate_size=128, fp8_experts=True, dtype="bfloat16")
    params = Params(*init_model(cfg))
    batches = _rank_batches(4, cfg.vocab_size)
    split = dep.DepRuntime(params, 4, BUDGET, dispatch="dense", gemm_backend="pallas_split_interpret")
    moved = _all_to_all_operands(split.compiled_hlo())
    rows = [(dtype, size) for dtype, size, last in moved if last == cfg.hidden_size]
    scales = [(dtype, size) for dtype, size, last in moved if last == cfg.hidden_size // 128 and dtype != "s32"]
    # per MoE layer: the e4m3 rows as bytes and their scales going out, the rows coming back (f32 on XLA:CPU; the
    # counts are s32)
    assert [d for d, _ in rows] == ["u8", "f32"] * cfg.num_moe_layers, moved
    assert [d for d, _ in scales] == ["f32"] * cfg.num_moe_layers, moved
    sent = rows[0][1] + 4 * scales[0][1]
    assert sent / (2 * rows[0][1]) == pytest.approx((1 + 4 * 2 / 256) / 2)  # against bf16 rows: 0.516
    xla = dep.DepRuntime(params, 4, BUDGET, dispatch="dense", gemm_backend="xla")
    # the fast path, and the profiled path's programs (whose bf16 results differ from the fast path's by their
    # program boundaries alone: compared with the XLA backend's profiled path)
    for outs, refs in ((split.step(batches), xla.step(batches)),
                       (split.profile(batches, repeats=1).outputs, xla.profile(batches, repeats=1).outputs)):
        outs, refs = [o for o in outs if o is not None], [r for r in refs if r is not None]
        for out, ref in zip(outs, refs, strict=True):
            assert all((a == b).all() for a, b in zip(out.expert_ids, ref.expert_ids, strict=True))
        err = _rel_err(outs, refs)
        assert err <= 1e-3, err  # bf16 outputs of the same quantized operands (measured: 0 and 1e-4)
