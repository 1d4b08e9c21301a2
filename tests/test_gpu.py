"""GPU-only tests (`pytest -m gpu`): kernels against the XLA references, strategies against the reference runtime
on real GPUs. Skipped on CPU."""

import concurrent.futures
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs NVIDIA GPUs")]


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_each(kernel, candidates, args: tuple, static: dict, dynamic: dict | None = None) -> list:
    """kernel(*args, blocks=b, **static, **dynamic) for every candidate b, compiled all at once: XLA compiles
    outside the GIL, and compiling the sweeps' kernels one after another took most of the GPU suite's time."""
    dynamic = dynamic or {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(candidates)) as pool:
        compiled = list(pool.map(lambda b: kernel.lower(*args, blocks=b, **static, **dynamic).compile(), candidates))
    return [c(*args, **dynamic) for c in compiled]


def covering(candidates, kernel: str, k: int, n: int, fused: bool) -> list:
    """The candidates run on the GPU: the fewest (greedily) that between them take every value each blocks field
    takes in the benchmark's list, plus every cached entry this card serves at this K, N and fused. The CPU suite
    lowers every candidate for CUDA and runs its schedule in interpret mode; here each option meets the hardware."""
    from dwdp_jax.kernels import tuning

    options = lambda b: {(f.name, getattr(b, f.name)) for f in dataclasses.fields(b)}  # noqa: E731
    missing, chosen = set().union(*map(options, candidates)), []
    while missing:
        best = max(candidates, key=lambda b: len(options(b) & missing))
        chosen.append(best)
        missing -= options(best)
    kind = jax.devices()[0].device_kind
    cached = [type(candidates[0])(**e["blocks"]) for e in tuning.read() if (e["kernel"], e["device_kind"], e["k"],
              e["n"], e["fused"]) == (kernel, kind, k, n, fused)]
    return chosen + [b for b in dict.fromkeys(cached) if b not in chosen]


@pytest.mark.parametrize("kind", ["uniform", "skewed", "empty"])
def test_pallas_grouped_ffn_matches_xla(kind):
    from dwdp_jax.measure import gpu_bench
    from dwdp_jax.kernels import grouped_gemm

    g, d, f = 16, 512, 256
    sizes = {"uniform": np.full(g, 128), "skewed": gpu_bench.skewed_group_sizes(2048, g, 6.0),
             "empty": np.where(np.arange(g) % 3 == 0, 200, 0)}[kind].astype(np.int32)
    rows = int(sizes.sum()) + 64  # trailing rows outside every group must come back zero
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(jnp.bfloat16)
    w_gate, w_up = (0.05 * jax.random.normal(k, (g, d, f), jnp.float32) for k in keys[1:3])
    w_down = 0.05 * jax.random.normal(keys[3], (g, f, d), jnp.float32)
    bf = [w.astype(jnp.bfloat16) for w in (w_gate, w_up, w_down)]
    ours = grouped_gemm.get_backend("pallas_mgpu")(x, jnp.asarray(sizes), *bf)
    ref = grouped_gemm.get_backend("xla")(x.astype(jnp.float32), jnp.asarray(sizes),
                                          *(w.astype(jnp.float32) for w in bf))
    assert rel(ours, ref) < 2e-2
    assert not np.asarray(ours[int(sizes.sum()):]).any()


@pytest.mark.parametrize("kernel", ["triton", "mgpu"])
@pytest.mark.parametrize("fused", [False, True])
def test_benchmarked_options_match_ragged_dot(fused, kernel):
    """Each split kernel with every option the benchmark sweeps (Triton: launch orders, half tiles; Mosaic GPU:
    chained, wgmma in flight, swizzled stores of full tiles, two-CTA clusters) and the cached winners, at R1's K
    and N, skewed groups over two slabs."""
    from dwdp_jax.measure import gpu_bench
    from dwdp_jax.kernels.split_gemm import split_ragged_dot
    from dwdp_jax.kernels.split_gemm_mgpu import split_ragged_dot_mgpu
    from dwdp_jax.measure.kernel_sweeps import CANDIDATES, MGPU_CANDIDATES

    k, n = (7168, 2048) if fused else (2048, 7168)
    sizes = gpu_bench.skewed_group_sizes(16384, 64, 6.0).astype(np.int32)
    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (int(sizes.sum()), k), jnp.float32).astype(jnp.bfloat16)
    g, u = ((0.02 * jax.random.normal(key, (64, k, n), jnp.float32)).astype(jnp.bfloat16) for key in keys[1:])
    gs = jnp.asarray(sizes)
    ref = gpu_bench.exact_ragged_dot(x, g, sizes)
    if fused:
        ref = jax.nn.silu(ref) * gpu_bench.exact_ragged_dot(x, u, sizes)
    weights = ((g[:16], u[:16]), (g[16:], u[16:])) if fused else (g[:16], g[16:])
    run, candidates = {"triton": (split_ragged_dot, CANDIDATES),
                       "mgpu": (split_ragged_dot_mgpu, MGPU_CANDIDATES)}[kernel]
    chosen = covering(candidates[fused], f"split_{kernel}", k, n, fused)
    for blocks, out in zip(chosen, run_each(run, chosen, (x, gs, weights), dict(fused=fused))):
        assert rel(out, ref) < 1e-2, blocks


def ffn_case(kind: str, seed: int):
    """(groups, group sizes, rows, x [rows, 512] bf16, bf16 gate/up/down weights) of a 16-expert FFN whose rows
    are routed uniformly, skewed, or to every third expert only; 64 rows past the groups."""
    from dwdp_jax.measure import gpu_bench

    g, d, f = 16, 512, 256
    sizes = {"uniform": np.full(g, 128), "skewed": gpu_bench.skewed_group_sizes(2048, g, 6.0),
             "empty": np.where(np.arange(g) % 3 == 0, 200, 0)}[kind].astype(np.int32)
    rows = int(sizes.sum()) + 64
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(jnp.bfloat16)
    ws = [(0.05 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
          for k, shape in zip(keys[1:], [(g, d, f), (g, d, f), (g, f, d)])]
    return g, sizes, rows, x, ws


@pytest.mark.parametrize("backend", ["pallas_split", "pallas_split_triton", "pallas_split_mgpu"])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "empty"])
def test_split_kernel_matches_xla_over_three_slabs(kind, backend):
    from dwdp_jax.kernels import grouped_gemm
    from models.experts import ExpertSlab

    g, sizes, rows, x, ws = ffn_case(kind, seed=7)
    slabs = tuple(ExpertSlab(*(w[a:b] for w in ws), start=a) for a, b in ((0, 3), (3, 8), (8, g)))
    poisoned = jnp.full((rows + 64, x.shape[1]), jnp.nan, jnp.bfloat16).at[:rows].set(x)[:rows]
    ours = jax.jit(grouped_gemm.get_split_backend(backend))(poisoned, jnp.asarray(sizes), slabs)
    ref = grouped_gemm.get_backend("xla")(x.astype(jnp.float32), jnp.asarray(sizes),
                                          *(w.astype(jnp.float32) for w in ws))
    assert rel(ours, ref) < 2e-2
    assert not np.asarray(ours[int(sizes.sum()):]).any()


@pytest.mark.parametrize("fused", [False, True])
def test_fp8_options_match_the_dequantized_product(fused):
    """The FP8 path with every option its benchmark sweeps and the cached winners, at R1's K and N, skewed groups
    over two slabs, against the fp32 product of the same quantized operands (only summation order and the bf16
    output differ)."""
    from dwdp_jax.measure import gpu_bench
    from dwdp_jax.kernels import fp8
    from dwdp_jax.measure.kernel_sweeps import FP8_CANDIDATES
    from dwdp_jax.kernels.split_gemm import split_ragged_dot

    k, n = (7168, 2048) if fused else (2048, 7168)
    sizes = gpu_bench.skewed_group_sizes(16384, 64, 6.0).astype(np.int32)
    keys = jax.random.split(jax.random.key(6), 3)
    x_q, x_scale = fp8.quantize_rows(jax.random.normal(keys[0], (int(sizes.sum()), k), jnp.float32))
    g, u = (fp8.quantize_weights_kn(0.02 * jax.random.normal(key, (64, k, n), jnp.float32)) for key in keys[1:])
    gs = jnp.asarray(sizes)
    ref = gpu_bench.exact_ragged_dot((x_q, x_scale), g, sizes)
    if fused:
        ref = jax.nn.silu(ref) * gpu_bench.exact_ragged_dot((x_q, x_scale), u, sizes)
    half = lambda w, a, b: (w[0][a:b], w[1][a:b])  # noqa: E731
    weights = (((half(g, 0, 16), half(u, 0, 16)), (half(g, 16, 64), half(u, 16, 64))) if fused
               else (half(g, 0, 16), half(g, 16, 64)))
    chosen = covering(FP8_CANDIDATES, "split_triton_fp8", k, n, fused)
    outs = run_each(split_ragged_dot, chosen, (x_q, gs, weights), dict(fused=fused), dict(x_scale_SM=x_scale))
    for blocks, out in zip(chosen, outs):
        assert rel(out, ref) < 1e-2, blocks


@pytest.mark.parametrize("kind", ["uniform", "skewed", "empty"])
def test_fp8_experts_match_bf16_within_e4m3_rounding(kind):
    """The split backend with FP8 expert slabs against the XLA FFN on the unquantized weights; rows outside every
    group come back zero, poisoned inputs there notwithstanding."""
    from dwdp_jax.kernels import fp8, grouped_gemm
    from models.experts import ExpertSlab

    g, sizes, rows, x, ws = ffn_case(kind, seed=8)
    slabs = tuple(ExpertSlab(*(fp8.quantize_weights_kn(w[a:b]) for w in ws), start=a) for a, b in ((0, 3), (3, g)))
    poisoned = x.at[int(sizes.sum()):].set(jnp.nan)
    ours = jax.jit(grouped_gemm.get_split_backend("pallas_split"))(poisoned, jnp.asarray(sizes), slabs)
    ref = grouped_gemm.get_backend("xla")(x.astype(jnp.float32), jnp.asarray(sizes),
                                          *(w.astype(jnp.float32) for w in ws))
    assert rel(ours, ref) < 0.08
    assert not np.asarray(ours[int(sizes.sum()):]).any()


@pytest.mark.parametrize("impl,lengths", [("cudnn", (300, 77, 500)), ("cudnn_mla_1seq", (700,))])
def test_cudnn_mla_attention_matches_xla(impl, lengths):
    from dwdp_jax.kernels import attention
    from dwdp_jax.packing import pack

    batch = pack([list(range(n)) for n in lengths], budget=1024)
    t, h = batch.budget, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q, k = (jax.random.normal(kk, (t, h, 192), jnp.float32).astype(jnp.bfloat16) for kk in keys[:2])
    v = jax.random.normal(keys[2], (t, h, 128), jnp.float32).astype(jnp.bfloat16)
    seg, pos = jnp.asarray(batch.segment_ids_T), jnp.asarray(batch.positions_T)
    ours = jax.jit(lambda q, k, v: attention.get_backend(impl)(q, k, v, seg, pos, scale=192 ** -0.5))(q, k, v)
    ref = attention.get_backend("xla")(*(a.astype(jnp.float32) for a in (q, k, v)), seg, pos, scale=192 ** -0.5)
    n = batch.num_tokens
    assert rel(ours[:n], ref[:n]) < 2e-2
    assert not np.asarray(ours[n:]).any()


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_strategies_agree_on_gpus(num_ranks):
    from dwdp_jax.packing import pack
    from dwdp_jax.placement import Placement
    from dwdp_jax.runtime.dep import DepRuntime
    from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
    from dwdp_jax.runtime.reference import prefill
    from models.deepseek_v3 import Params
    from models import config as C
    from models import deepseek_v3 as M

    if len(jax.devices()) < num_ranks:
        pytest.skip(f"needs {num_ranks} GPUs")
    cfg = C.tiny(num_hidden_layers=4, n_routed_experts=16, hidden_size=64)
    params = Params(*M.init_model(cfg, seed=5))
    batches = [pack([[1, 2, 3, 4, 5, 6], [7, 8, 9]], budget=64), pack([[10, 11, 12, 13]], budget=64)]
    batches += [None] * (num_ranks - len(batches))
    refs = [prefill(params, b) if b is not None else None for b in batches]
    engines = [DwdpEngine(params, Placement.for_group(16, num_ranks), options=DwdpOptions(poison=True, **o))
               for o in (dict(transport="device_put"), dict(transport="copy_engine"),
                         dict(transport="copy_engine", slice_bytes=1 << 14))]
    dep_outs = {d: DepRuntime(params, num_ranks, 64, dispatch=d).step(batches) for d in ("dense", "ragged")}
    for r, (b, ref) in enumerate(zip(batches, refs)):
        if b is None:
            continue
        for engine in engines:
            for _ in range(2):  # the second step reuses the copy engine's persistent (poisoned) slots
                assert rel(engine.step(r, b).output.logits_TV, ref.logits_TV) < 1e-4
        for outs in dep_outs.values():
            assert rel(outs[r].logits_TV, ref.logits_TV) < 1e-4


def test_copy_engine_timeline_orders_copies_and_fences():
    """On the device clock: every MoE read resumes only after its slot's copy ended (read-after-write), each copy
    starts after the program that last read its slot issued it, and many steps leave no events or memory behind."""
    from dwdp_jax.packing import pack
    from dwdp_jax.placement import Placement
    from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
    from models.deepseek_v3 import Params
    from models import config as C
    from models import deepseek_v3 as M

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 GPUs")
    cfg = C.tiny(num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=16, hidden_size=1024,
                 moe_intermediate_size=1024, dtype="bfloat16")
    params = Params(*M.init_model(cfg, seed=1))
    engine = DwdpEngine(params, Placement.for_group(16, 2), options=DwdpOptions(transport="copy_engine", timeline=True))
    batch = pack([list(range(1, 200))], budget=256)
    t = engine.transport
    before_s = time.perf_counter()
    for _ in range(3):
        engine.step(1, batch)
    after_s = time.perf_counter()
    marks = t.timeline(1)
    n_moe = cfg.num_moe_layers
    copies = {layer: (s, e) for (label_s, layer, s), (label_e, _, e) in zip(marks, marks[1:])
              if label_s == "copy_start" and label_e == "copy_end"}
    assert sorted(copies) == list(range(n_moe))
    waits = [(a, r) for (la, _, a), (lr, _, r) in zip(marks, marks[1:]) if la == "wait_arrive" and lr == "wait_resume"]
    assert len(waits) == n_moe
    issues = [ms for label, _, ms in marks if label == "issue"]
    assert len(issues) == n_moe - 1  # the front primes two layers, programs 0 .. n_moe - 3 issue one each
    for m, (_, resume) in enumerate(waits):
        assert resume >= copies[m][1] - 1e-3
        if m >= 2:  # issued at the end of program m - 2, the last reader of its slot
            assert copies[m][0] >= issues[m - 1] - 1e-3 and issues[m - 1] >= waits[m - 2][1] - 1e-3
    # per-source spans on the host clock (the measured contention's input): every layer of the three steps, from
    # rank 0, inside the steps' wall time, in issue order
    spans = t.source_intervals()
    assert [(d, src, layer) for d, src, layer, _, _ in spans] == [(1, 0, m) for _ in range(3) for m in range(n_moe)]
    assert all(before_s <= a < b <= after_s for *_, a, b in spans)
    assert all(b1 <= a2 + 1e-4 for (*_, b1), (*_, a2, _) in zip(spans, spans[1:]))
    pool = len(t.copier.events[1])
    mem = jax.devices()[1].memory_stats()["bytes_in_use"]
    for _ in range(20):
        engine.step(1, batch)
    assert len(t.copier.events[1]) == pool
    assert jax.devices()[1].memory_stats()["bytes_in_use"] <= mem
