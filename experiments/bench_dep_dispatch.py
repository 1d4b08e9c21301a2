"""DEP's two dispatch backends side by side on GPUs at DeepSeek-R1 width: which one DEP should default to.

  python -m experiments.bench_dep_dispatch                                  # every GPU, 2048 and 8192 tokens/rank
  python -m experiments.bench_dep_dispatch --tokens=16384 --fill=0.6 --skew=1.0 --num_ranks=4

Times the token movement of one MoE layer per backend ("dense" all_to_all of worst-case blocks, "ragged"
ragged_all_to_all of the real rows), each as its own jitted SPMD program over the ranks:
  dispatch    sort by expert, count exchange, the dispatch all-to-all, regroup by local expert;
  combine     the way back and the routing-weighted sum over K;
  round_trip  both in one program with identity experts: what DEP adds to a layer beyond the grouped GEMM,
              which is the same for both backends and left out (the XLA ragged_dot backend expands densely
              on GPU) unless --gemm_backend names one, which adds a "layer" row with the real experts.
Medians of --repeats after --warmup, synchronized. The floor for each row is the bytes a rank sends to other
ranks over its NVLink bandwidth; the table prints the achieved GB/s of that. Both backends' round trips are
checked equal to each other and to sum_k w_k x (identity experts). Results: results/bench_dep_dispatch/<run>.json,
with XLA_FLAGS recorded: XLA:GPU has several ragged-all-to-all implementations chosen by flag.
"""

from __future__ import annotations

import datetime
import gc
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dwdp_jax.results import write_results
from dwdp_jax.runtime import dep_dispatch as dep
from models.config import deepseek_r1
from models.deepseek_v3 import init_expert_slab

_TOKENS = flags.DEFINE_list("tokens", ["2048", "8192"], "token budget per rank (each a separate row)")
_NUM_RANKS = flags.DEFINE_integer("num_ranks", 0, "ranks (devices); 0 = every device")
_FILL = flags.DEFINE_float("fill", 1.0, "rank r holds budget * (1 - (1 - fill) * r / (N - 1)) real tokens")
_SKEW = flags.DEFINE_float("skew", 0.0, "expert popularity ~ 1 / (e + 1)^skew (0 = uniform routing)")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed repeats")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed repeats first")
_GEMM = flags.DEFINE_string("gemm_backend", "", "also time the whole layer with this grouped GEMM backend")
_RUN = flags.DEFINE_string("run", "", "results file name (default: a timestamp)")
_SEED = flags.DEFINE_integer("seed", 0, "routing and activation seed")


def _routing(rng, n, t, cfg, fill, skew):
    """Per-rank valid masks, top-k expert ids (distinct per token) and routing weights, all [N*T, ...]."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    log_p = -skew * np.log(np.arange(e) + 1.0)
    ids = np.argsort(-(log_p + rng.gumbel(size=(n * t, e))), axis=1)[:, :k].astype(np.int32)  # Gumbel top-k
    weights = rng.random((n * t, k), np.float32)
    real = [int(round(t * (1 - (1 - fill) * r / max(n - 1, 1)))) for r in range(n)]
    valid = np.concatenate([np.arange(t) < real_r for real_r in real])
    return valid, ids, weights, real


def _offrank_bytes(valid, ids, n, t, cfg, itemsize):
    """Per backend, the most bytes any rank sends to other ranks in one direction."""
    experts_per_rank = cfg.n_routed_experts // n
    dest = ids.reshape(n, t, -1) // experts_per_rank
    mask = valid.reshape(n, t)[..., None]
    ragged = max(int(((dest != r) & mask)[r].sum()) for r in range(n))
    dense_rows = (n - 1) * t * cfg.num_experts_per_tok  # every block is worst-case sized
    return {"dense": dense_rows * cfg.hidden_size * itemsize, "ragged": ragged * cfg.hidden_size * itemsize}


def _time(fn, args, repeats, warmup):
    samples = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return samples


def _programs(mesh, cfg, dispatcher, gemm_backend):
    split = P(dep.AXIS)
    e = cfg.n_routed_experts

    def spmd(fn, num_args):
        return jax.jit(dep.shard_map(fn, mesh, (split,) * num_args, split))

    def round_trip(x, ids, weights, valid):
        x_grouped, plan = dep.dispatch_tokens(x, ids, valid, e, dispatcher)
        return dep.combine_tokens(x_grouped, plan, weights, dispatcher)

    def layer(slab, x, ids, weights, valid):
        x_grouped, plan = dep.dispatch_tokens(x, ids, valid, e, dispatcher)
        y_grouped = dep.expert_ffn(x_grouped, plan, slab, gemm_backend, dispatcher)
        return dep.combine_tokens(y_grouped, plan, weights, dispatcher)

    programs = {
        "dispatch": spmd(lambda x, ids, valid: dep.dispatch_tokens(x, ids, valid, e, dispatcher), 3),
        "combine": spmd(lambda yg, plan, weights: dep.combine_tokens(yg, plan, weights, dispatcher), 3),
        "round_trip": spmd(round_trip, 4),
    }
    if gemm_backend:
        programs["layer"] = spmd(layer, 5)
    return programs


def _bench_row(mesh, cfg, t, rng, slab):
    """Both backends at one token budget: timings, bytes and the equality checks."""
    n = mesh.devices.size
    dtype = jnp.dtype(cfg.dtype)
    valid, ids, weights, real = _routing(rng, n, t, cfg, _FILL.value, _SKEW.value)
    by_rank = NamedSharding(mesh, P(dep.AXIS))
    x = jax.device_put(jnp.asarray(rng.standard_normal((n * t, cfg.hidden_size), np.float32), dtype), by_rank)
    ids_d, weights_d, valid_d = jax.device_put((ids, weights, valid), by_rank)
    expected = np.asarray(x, np.float32) * weights.sum(1, keepdims=True) * valid[:, None]
    row = {"tokens": t, "real_tokens": real, "offrank_bytes": _offrank_bytes(valid, ids, n, t, cfg, dtype.itemsize)}
    outputs = {}
    for name in dep.DISPATCH_BACKENDS:
        programs = _programs(mesh, cfg, dep.DISPATCHERS[name], _GEMM.value)
        x_grouped, plan = programs["dispatch"](x, ids_d, valid_d)
        args = {"dispatch": (x, ids_d, valid_d), "combine": (x_grouped, plan, weights_d),
                "round_trip": (x, ids_d, weights_d, valid_d), "layer": (slab, x, ids_d, weights_d, valid_d)}
        row[name] = {stage: _time(fn, args[stage], _REPEATS.value, _WARMUP.value) for stage, fn in programs.items()}
        outputs[name] = np.asarray(programs["round_trip"](*args["round_trip"]), np.float32)
        del x_grouped, plan
        gc.collect()
    err = float(np.linalg.norm(outputs["ragged"] - expected) / np.linalg.norm(expected))
    row["verification"] = {"backends_equal": bool(np.array_equal(outputs["dense"], outputs["ragged"])),
                           "rel_err_vs_identity_experts": err, "passed": err <= 1e-2}
    return row


def _table(rows, stages):
    lines = [f"{'tokens':>7} {'stage':>10} {'dense ms':>9} {'ragged ms':>9} {'dense/ragged':>12} "
             f"{'dense GB/s':>10} {'ragged GB/s':>11}"]
    for row in rows:
        for stage in stages:
            if stage not in row["dense"]:
                continue
            d, r = (statistics.median(row[b][stage]) for b in dep.DISPATCH_BACKENDS)
            gbs = {b: row["offrank_bytes"][b] / statistics.median(row[b][stage]) / 1e9 for b in dep.DISPATCH_BACKENDS}
            lines.append(f"{row['tokens']:>7} {stage:>10} {d * 1e3:>9.3f} {r * 1e3:>9.3f} {d / r:>12.2f} "
                         f"{gbs['dense']:>10.1f} {gbs['ragged']:>11.1f}")
    return "\n".join(lines)


def main(argv):
    del argv
    if jax.default_backend() != "gpu":
        raise app.UsageError("bench_dep_dispatch needs GPUs: the ragged backend has no CPU kernel")
    devices = jax.devices()
    n = _NUM_RANKS.value or len(devices)
    cfg = deepseek_r1()
    if not 1 <= n <= len(devices) or cfg.n_routed_experts % n:
        raise app.UsageError(f"--num_ranks must be in [1, {len(devices)}] and divide {cfg.n_routed_experts}")
    mesh = Mesh(np.asarray(devices[:n]), (dep.AXIS,))
    slab = None
    if _GEMM.value:
        slab = jax.device_put(init_expert_slab(cfg, jax.random.key(0)), NamedSharding(mesh, P(dep.AXIS)))
    rng = np.random.default_rng(_SEED.value)
    rows = [_bench_row(mesh, cfg, int(t), rng, slab) for t in _TOKENS.value]
    stages = ("dispatch", "combine", "round_trip", "layer")
    print(f"{n} x {devices[0].device_kind}, D={cfg.hidden_size}, E={cfg.n_routed_experts}, "
          f"K={cfg.num_experts_per_tok}, {cfg.dtype}, fill={_FILL.value}, skew={_SKEW.value}")
    print(_table(rows, stages))
    metrics = {f"{row['tokens']}/{stage}/{b}_ms": statistics.median(row[b][stage]) * 1e3
               for row in rows for stage in stages if stage in row["dense"] for b in dep.DISPATCH_BACKENDS}
    faster = {row["tokens"]: min(dep.DISPATCH_BACKENDS, key=lambda b: statistics.median(row[b]["round_trip"]))
              for row in rows}
    metrics["faster_round_trip"] = faster
    run = _RUN.value or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config = {"num_ranks": n, "tokens": [int(t) for t in _TOKENS.value], "fill": _FILL.value, "skew": _SKEW.value,
              "repeats": _REPEATS.value, "warmup": _WARMUP.value, "gemm_backend": _GEMM.value, "seed": _SEED.value,
              "hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
              "num_experts_per_tok": cfg.num_experts_per_tok, "dtype": cfg.dtype,
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    verification = {f"tokens_{row['tokens']}": row["verification"] for row in rows}
    path = write_results("bench_dep_dispatch", run, config=config, raw=rows, metrics=metrics,
                         verification=verification)
    print(f"faster round trip per token budget: {faster}\nwrote {path}")
    if not all(v["passed"] and v["backends_equal"] for v in verification.values()):
        raise SystemExit("bench_dep_dispatch: the backends disagree or miss the identity-expert check")


if __name__ == "__main__":
    app.run(main)
