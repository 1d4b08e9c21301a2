"""The DEP runtime: attention data-parallel + expert-parallel MoE, one SPMD program over N devices.

DEP is the baseline DWDP is measured against, so it must be as good as JAX allows and differ from DWDP only
in the strategy: the same Flax modules, the same grouped-GEMM and attention backends (chosen by name), the
same packed batches. Each rank runs attention on its own sequences (padded to the shared static token budget,
the padding masked), routes its tokens, sends every (token, choice) row to the rank owning the chosen expert,
runs one grouped GEMM over the experts it owns (E/N consecutive experts along the expert axis), and sends
the results back, where the routing-weighted sum over the K choices is taken. Dropless and exact: every
buffer is sized for the worst case (all T*K rows of every rank landing on one rank), no capacity factor.

The all-to-all dispatch and combine (dense and ragged backends) are in `dep_dispatch`.

Every MoE layer is a barrier (its all-to-alls need every rank), so the slowest rank sets the pace. `profile`
measures that: per-layer stage times from separately jitted stage programs, and the paper's synchronization
estimate (Figure 1), 1 - mean(rank alone)/step, where "rank alone" is the same program with the other ranks'
batches empty.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dwdp_jax import memory
from dwdp_jax.expert_source import as_source
from dwdp_jax.kernels import attention, grouped_gemm
from dwdp_jax.packing import PackedBatch
from dwdp_jax.runtime import stages, watchdog
from dwdp_jax.runtime.dep_dispatch import (AXIS, DISPATCH_BACKENDS, DISPATCHERS, RAGGED_PLATFORMS, RaggedAllToAll,
                                           ReceiveBuffer, combine_tokens, default_dispatch, dispatch_tokens,
                                           expert_ffn, shard_map)
from dwdp_jax.runtime.reference import PrefillOutput
from models.deepseek_v3 import Params
from models.experts import ExpertSlab, quantizes_tokens


def _local(device: jax.Device) -> bool:
    """Whether this process drives `device` (every device, in one process)."""
    return device.process_index == jax.process_index()


def _host(x: jax.Array) -> np.ndarray:
    """A per-rank output on the host whole: gathered from every process when some of its shards live elsewhere."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


# The ragged backend's collective and fresh-buffer fill, read at each trace: module-level so a CPU test can
# substitute an emulation of the collective and fill the buffers with NaN.
ragged_all_to_all = jax.lax.ragged_all_to_all
RECEIVE_FILL = 0.0


def get_dispatcher(name: str):
    """The dispatch backend `name`; "ragged" with this module's `ragged_all_to_all` and `RECEIVE_FILL`."""
    return RaggedAllToAll(ragged_all_to_all, RECEIVE_FILL) if name == "ragged" else DISPATCHERS[name]


@dataclasses.dataclass(frozen=True)
class DepExperts:
    """The `RoutedExperts` of one MoE layer under DEP: this rank's slab behind dispatch and combine; the layers
    of one step share `receive`."""

    slab: ExpertSlab
    num_experts: int
    dispatch: str
    backend: str
    receive: ReceiveBuffer | None = None

    def __call__(self, x_TD, ids_TK, weights_TK, valid_T=None):
        dispatcher = get_dispatcher(self.dispatch)
        x_grouped_RD, plan = dispatch_tokens(x_TD, ids_TK, valid_T, self.num_experts, dispatcher, self.receive,
                                             quantizes_tokens(self.slab, self.backend))
        y_grouped_RD = expert_ffn(x_grouped_RD, plan, self.slab, self.backend, dispatcher, x_TD.dtype)
        return combine_tokens(y_grouped_RD, plan, weights_TK, dispatcher, valid_T, self.receive)


# ---------------------------------------------------------------------------------------------------------------
# The runtime.


@dataclasses.dataclass(frozen=True)
class DepProfile:
    """Timings of one set of rank batches (seconds, medians over the repeats).

    step_s: the fast path (one program). rank_alone_s[r]: the same program with only rank r's batch.
    sync_overhead: 1 - mean(rank_alone_s) / step_s (paper Figure 1). layer_stage_s[i]: stage -> seconds of
    decoder layer i from the profiled path (one program per stage, synchronized after each), whose outputs
    are `outputs`; a dispatch or combine time includes waiting for the slowest rank.
    """

    step_s: float
    rank_alone_s: tuple[float, ...]
    sync_overhead: float
    embed_s: float
    layer_stage_s: tuple[dict[str, float], ...]
    head_s: float
    outputs: list[PrefillOutput]

    @property
    def stage_total_s(self) -> dict[str, float]:
        totals = {"embed": self.embed_s, "head": self.head_s}
        for layer in self.layer_stage_s:
            for name, seconds in layer.items():
                totals[name] = totals.get(name, 0.0) + seconds
        return totals

    @property
    def profiled_step_s(self) -> float:
        return sum(self.stage_total_s.values())


def _median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


class DepRuntime:
    """DEP over the first `num_ranks` devices: replicated non-expert weights, E/N experts per rank and layer."""

    def __init__(self, params: Params, num_ranks: int, token_budget: int, dispatch: str | None = None,
                 gemm_backend: str = "xla", attention_impl: str = "xla", devices: Sequence[jax.Device] | None = None,
                 last_token_logits: int = 0, step_timeout_s: float = 600.0):
        """`last_token_logits` > 0: logits only at each sequence's last token, for up to that many sequences per
        rank batch (serving); 0: every token's logits. `step_timeout_s`: a step (its compilation included) that
        has not returned by then exits the process (`watchdog`: a rank that failed leaves the others waiting in a
        collective forever); 0: no deadline."""
        cfg = params.model.cfg
        available = list(jax.devices() if devices is None else devices)
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be an integer >= 1, got {num_ranks!r}")
        if num_ranks > len(available):
            raise ValueError(f"num_ranks={num_ranks} exceeds the {len(available)} available devices; "
                             f"allowed range [1, {len(available)}]")
        if cfg.n_routed_experts % num_ranks:
            raise ValueError(f"n_routed_experts ({cfg.n_routed_experts}) must be divisible by num_ranks ({num_ranks}): "
                             "DEP shards every MoE layer's experts evenly along the expert axis")
        if not isinstance(step_timeout_s, (int, float)) or step_timeout_s < 0:
            raise ValueError(f"step_timeout_s must be a number >= 0 (0: no deadline), got {step_timeout_s!r}")
        if not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget must be an integer >= 1, got {token_budget!r}")
        source = as_source(params.experts)
        if source.num_layers < cfg.num_moe_layers:
            raise ValueError(f"params.experts has {source.num_layers} layers of experts, expected one per MoE layer "
                             f"({cfg.num_moe_layers})")
        platform = available[0].platform
        dispatch = default_dispatch(platform) if dispatch is None else dispatch
        if dispatch not in DISPATCH_BACKENDS:
            raise ValueError(f"dispatch must be one of {DISPATCH_BACKENDS}, got {dispatch!r}")
        if dispatch == "ragged" and platform not in RAGGED_PLATFORMS:
            raise ValueError(f"dispatch='ragged' needs ragged_all_to_all, which XLA:{platform.upper()} does not "
                             f"implement (platforms with it: {RAGGED_PLATFORMS}); use dispatch='dense'")
        grouped_gemm.get_backend(gemm_backend)
        attention.get_backend(attention_impl)

        self.cfg, self.num_ranks, self.token_budget = cfg, num_ranks, token_budget
        self.dispatch, self.gemm_backend, self.attention_impl = dispatch, gemm_backend, attention_impl
        self.mesh = Mesh(np.asarray(available[:num_ranks]), (AXIS,))
        self._replicated = NamedSharding(self.mesh, P())
        self._by_rank = NamedSharding(self.mesh, P(AXIS))
        graphdef, state = nnx.split(stages.with_attention_impl(params.model, attention_impl))
        self._graphdef, self._state = graphdef, jax.device_put(state, self._replicated)
        self._layers = [nnx.split(layer) for layer in nnx.merge(graphdef, self._state).layers]
        self._slabs = tuple(self._shard_layer(source, m) for m in range(cfg.num_moe_layers))
        self.last_token_logits, self.step_timeout_s = last_token_logits, step_timeout_s
        self._forward = self._spmd(self._forward_rank, (P(), P(AXIS), P(AXIS)))
        self._programs: dict = {}
        self._compiled_full = None
        self._memory_checked = False

    # -- building programs --------------------------------------------------------------------------------------

    def _spmd(self, per_rank: Callable, in_specs) -> Callable:
        """jit(shard_map(per_rank)); every output is per rank, concatenated along axis 0."""
        return jax.jit(shard_map(per_rank, self.mesh, in_specs, P(AXIS)))

    def _experts(self, slab: ExpertSlab, receive: ReceiveBuffer | None = None) -> DepExperts:
        return DepExperts(slab, self.cfg.n_routed_experts, self.dispatch, self.gemm_backend, receive)

    def _shard_layer(self, source, layer: int) -> ExpertSlab:
        """One MoE layer's experts sharded E/N per rank, each shard produced on its own device (never whole); with
        several processes, each produces its own devices' shards only."""
        per_rank = self.cfg.n_routed_experts // self.num_ranks
        shards = [source.rows(layer, r * per_rank, (r + 1) * per_rank, d) for r, d in enumerate(self.mesh.devices)
                  if _local(d)]

        def stack(parts):
            shape = (self.cfg.n_routed_experts,) + parts[0].shape[1:]
            return jax.make_array_from_single_device_arrays(shape, self._by_rank, list(parts))

        return shards[0].with_arrays([stack(parts) for parts in zip(*(s.arrays() for s in shards))], start=0)

    def _forward_rank(self, state, slabs, batch):
        tokens_T, segment_ids_T, positions_T, *rows = batch
        model = nnx.merge(self._graphdef, state)
        receive = ReceiveBuffer()  # one per trace of the step
        return model(tokens_T, segment_ids_T, positions_T, [self._experts(slab, receive) for slab in slabs],
                     rows[0] if rows else None)

    # -- inputs and outputs -------------------------------------------------------------------------------------

    def _check_batches(self, batches: Sequence[PackedBatch | None]) -> None:
        if len(batches) != self.num_ranks:
            raise ValueError(f"got {len(batches)} batches, expected one per rank (num_ranks={self.num_ranks}); "
                             "pass None for a rank with no sequences")
        for r, batch in enumerate(batches):
            if batch is not None and not isinstance(batch, PackedBatch):
                raise ValueError(f"batches[{r}] must be a PackedBatch or None, got {type(batch).__name__}")
            if batch is not None and batch.num_tokens > self.token_budget:
                raise ValueError(f"batches[{r}] has {batch.num_tokens} tokens; allowed range [0, token_budget="
                                 f"{self.token_budget}]")
            if batch is not None and self.last_token_logits and len(batch.lengths) > self.last_token_logits:
                raise ValueError(f"batches[{r}] has {len(batch.lengths)} sequences; allowed range "
                                 f"[0, last_token_logits={self.last_token_logits}]")

    def _step_budget(self, batches: Sequence[PackedBatch | None]) -> int:
        """Tokens per rank in this step: the largest padded batch (its bucket), at most the token budget. Every
        rank computes that many rows: SPMD pads light ranks up to the heaviest one."""
        return min(max([b.budget for b in batches if b is not None] or [1]), self.token_budget)

    def _device_inputs(self, batches: Sequence[PackedBatch | None]):
        """Each rank's batch re-padded to the shared token budget, concatenated and split over the ranks."""
        self._check_batches(batches)
        b = self._step_budget(batches)
        tokens = np.zeros(self.num_ranks * b, np.int32)
        segments = np.full(self.num_ranks * b, -1, np.int32)
        positions = np.zeros(self.num_ranks * b, np.int32)
        for r, batch in enumerate(batches):
            if batch is not None:
                n = batch.num_tokens
                tokens[r * b:r * b + n] = batch.tokens_T[:n]
                segments[r * b:r * b + n] = batch.segment_ids_T[:n]
                positions[r * b:r * b + n] = batch.positions_T[:n]
        if not self.last_token_logits:
            return jax.device_put((tokens, segments, positions), self._by_rank)
        rows = np.concatenate([stages.last_token_rows(batch, self.last_token_logits) if batch is not None
                               else np.zeros(self.last_token_logits, np.int32) for batch in batches])
        return jax.device_put((tokens, segments, positions, rows), self._by_rank)

    def _outputs(self, batches, hidden_TD, logits_TV, expert_ids) -> list[PrefillOutput]:
        # Serving (last-token logits) leaves the hidden states on the devices: [N*T, D] is GBs at R1 width.
        hidden = None if self.last_token_logits else _host(hidden_TD)
        logits = _host(logits_TV).astype(np.float32)
        ids = [_host(i) for i in expert_ids]
        b, per_rank_logits = self._step_budget(batches), self.last_token_logits
        outs = []
        for r, batch in enumerate(batches):
            rows = slice(r * b, r * b + (batch.num_tokens if batch is not None else 0))
            logit_rows = rows if not per_rank_logits else slice(
                r * per_rank_logits, r * per_rank_logits + (len(batch.lengths) if batch is not None else 0))
            outs.append(PrefillOutput(logits[logit_rows], [i[rows] for i in ids],
                                      None if hidden is None else hidden[rows]))
        return outs

    # -- public API ---------------------------------------------------------------------------------------------

    def step(self, batches: Sequence[PackedBatch | None]) -> list[PrefillOutput]:
        """One prefill step: batches[r] is rank r's packed batch (None: no sequences). Per-rank outputs, real
        tokens only, in input order."""
        if not self._memory_checked:  # GPU: refuse a step that cannot allocate before any rank enters a collective
            if any(memory.largest_free_block(d) is not None for d in self.mesh.devices.flat if _local(d)):
                self.check_memory()
            self._memory_checked = True
        with watchdog.Deadline(self.step_timeout_s, f"a DEP{self.num_ranks} step"):
            hidden_TD, logits_TV, expert_ids = self._forward(self._state, self._slabs, self._device_inputs(batches))
            return self._outputs(batches, hidden_TD, logits_TV, expert_ids)

    def _compiled(self):
        """The fast path compiled for the full token budget (the largest step)."""
        if self._compiled_full is None:
            batch = jax.ShapeDtypeStruct((self.num_ranks * self.token_budget,), jnp.int32, sharding=self._by_rank)
            rows = jax.ShapeDtypeStruct((self.num_ranks * self.last_token_logits,), jnp.int32,
                                        sharding=self._by_rank)
            inputs = (batch, batch, batch) + ((rows,) if self.last_token_logits else ())
            self._compiled_full = self._forward.lower(self._state, self._slabs, inputs).compile()
        return self._compiled_full

    def compiled_hlo(self) -> str:
        """The fast path's optimized HLO (for checking its collectives)."""
        return self._compiled().as_text()

    def memory_analysis(self):
        """XLA's memory analysis of the full-budget step (temporaries, outputs, arguments per device)."""
        return self._compiled().memory_analysis()

    def check_memory(self, available_bytes: Sequence[int | None] | None = None) -> int:
        """Bytes the full-budget step allocates per device beyond its inputs (XLA's buffer assignment);
        memory.DoesNotFit when that exceeds a device's largest free block (default: what each device's allocator
        reports; another process's devices are that process's to check)."""
        analysis = self.memory_analysis()
        need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        if available_bytes is None:
            available_bytes = [memory.largest_free_block(d) if _local(d) else None for d in self.mesh.devices.flat]
        memory.check_program_fits(f"the DEP{self.num_ranks} step at {self.token_budget} tokens per rank", need,
                                  available_bytes)
        return need

    def profile(self, batches: Sequence[PackedBatch | None], repeats: int = 3, warmup: int = 1) -> DepProfile:
        """Stage times per layer and the synchronization estimate; see `DepProfile`."""
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
        step_s, alone_s = self.sync_times(batches, repeats, warmup)
        inputs = self._device_inputs(batches)
        kept: list[dict] = []
        for i in range(warmup + repeats):
            times: dict = {}
            result = self._profiled_step(inputs, times)
            if i >= warmup:
                kept.append(times)
        med = {key: _median([s[key] for s in kept]) for key in kept[0]}
        layer_stage_s = tuple({stage: seconds for (layer, stage), seconds in med.items() if layer == i}
                              for i in range(self.cfg.num_hidden_layers))
        return DepProfile(step_s=step_s, rank_alone_s=alone_s, sync_overhead=1.0 - float(np.mean(alone_s)) / step_s,
                          embed_s=med[(None, "embed")], layer_stage_s=layer_stage_s, head_s=med[(None, "head")],
                          outputs=self._outputs(batches, *result))

    # -- measurement --------------------------------------------------------------------------------------------

    def sync_times(self, batches: Sequence[PackedBatch | None], repeats: int = 1,
                   warmup: int = 0) -> tuple[float, tuple[float, ...]]:
        """(the step's seconds, each rank's seconds with its batch alone and the others empty): the synchronization
        estimate (paper Fig. 1) is 1 - mean(alone) / step. Medians of `repeats` after `warmup` fast-path runs.
        A rank without a batch computes nothing alone: 0 s (timing it would run, and compile, an all-empty step)."""
        self._check_batches(batches)
        step_s = self._time_fast(self._device_inputs(batches), repeats, warmup)
        alone_s = tuple(0.0 if batches[r] is None else
                        self._time_fast(self._device_inputs([b if i == r else None for i, b in enumerate(batches)]),
                                        repeats, warmup) for r in range(self.num_ranks))
        return step_s, alone_s

    def _time_fast(self, inputs, repeats: int, warmup: int) -> float:
        samples = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            jax.block_until_ready(self._forward(self._state, self._slabs, inputs))
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        return _median(samples)

    def _program(self, name: str, per_rank: Callable, in_specs, *static) -> Callable:
        """A cached stage program, per_rank(*static, *args); layers of equal structure share one (their graphdefs
        compare equal)."""
        key = (name, *static)
        if key not in self._programs:
            self._programs[key] = self._spmd(functools.partial(per_rank, *static), in_specs)
        return self._programs[key]

    def _profiled_step(self, inputs, times: dict):
        """The forward step as one program per stage, each synchronized and timed into times[(layer, stage)];
        the same modules and MoE stages as the fast path, in the order of DeepseekV3/DecoderLayer/MoE. The router
        and shared-expert stages run `DecoderLayer.ffn` itself around stand-in routed experts (the latter recomputes
        the post-attention norm, a few elementwise ops, rather than take it as an input)."""
        rep, split = P(), P(AXIS)
        dispatcher = get_dispatcher(self.dispatch)
        quantize = bool(self._slabs) and quantizes_tokens(self._slabs[0], self.gemm_backend)
        tokens_T, segment_ids_T, positions_T, *rows = inputs

        def run(key, program, *args):
            start = time.perf_counter()
            out = jax.block_until_ready(program(*args))
            times[key] = time.perf_counter() - start
            return out

        x_TD = run((None, "embed"), self._program("embed", _embed_rank, (rep, split), self._graphdef),
                   self._state, tokens_T)
        expert_ids = []
        for i, (graphdef, state) in enumerate(self._layers):
            x_TD = run((i, "attention"), self._program("attention", _attention_rank, (rep,) + (split,) * 3, graphdef),
                       state, x_TD, segment_ids_T, positions_T)
            if not self.cfg.is_moe_layer(i):
                x_TD = run((i, "dense_mlp"), self._program("dense_mlp", _dense_mlp_rank, (rep, split), graphdef),
                           state, x_TD)
                continue
            h_TD, weights_TK, ids_TK = run((i, "router"), self._program("router", _router_rank, (rep, split), graphdef),
                                           state, x_TD)
            x_grouped_RD, plan = run(
                (i, "dispatch"),
                self._program("dispatch", _dispatch_rank, (split,) * 3, self.cfg.n_routed_experts, dispatcher,
                              quantize), h_TD, ids_TK, segment_ids_T)
            y_grouped_RD = run((i, "moe_gmm"), self._program("moe_gmm", _gmm_rank, (split,) * 3, self.gemm_backend,
                                                             dispatcher, h_TD.dtype),
                               self._slabs[len(expert_ids)], x_grouped_RD, plan)
            y_TD = run((i, "combine"), self._program("combine", _combine_rank, (split,) * 3, dispatcher),
                       y_grouped_RD, plan, weights_TK)
            x_TD = run((i, "shared_expert"), self._program("shared_expert", _shared_rank, (rep,) + (split,) * 2,
                                                           graphdef), state, x_TD, y_TD)
            expert_ids.append(ids_TK)
        if rows:
            logits_TV = run((None, "head"), self._program("head_rows", _head_rows_rank, (rep, split, split),
                                                          self._graphdef), self._state, x_TD, rows[0])
        else:
            logits_TV = run((None, "head"), self._program("head", _head_rank, (rep, split), self._graphdef),
                            self._state, x_TD)
        return x_TD, logits_TV, expert_ids


# Per-rank stage programs of the profiled path (static arguments first).


def _embed_rank(graphdef, state, tokens_T):
    return nnx.merge(graphdef, state).embed(tokens_T)


def _attention_rank(graphdef, state, x_TD, segment_ids_T, positions_T):
    return nnx.merge(graphdef, state).attention(x_TD, segment_ids_T, positions_T)


def _dense_mlp_rank(graphdef, state, x_TD):
    return nnx.merge(graphdef, state).ffn(x_TD)[0]


class _RoutedInputs:
    """The routed experts of the router stage: keep what `DecoderLayer.ffn` hands them (its normed input and
    routing) and return zeros; the stage returns only what was kept, so XLA drops the rest of the layer."""

    def __call__(self, x_TD, ids_TK, weights_TK, valid_T=None):
        self.h_TD, self.ids_TK, self.weights_TK = x_TD, ids_TK, weights_TK
        return jnp.zeros_like(x_TD)


@dataclasses.dataclass(frozen=True)
class _RoutedOutputs:
    """The routed experts of the shared-expert stage: their output, computed by the dispatch, GEMM and combine
    stages (XLA drops the routing the layer computes for them)."""

    y_TD: jax.Array

    def __call__(self, x_TD, ids_TK, weights_TK, valid_T=None):
        return self.y_TD


def _router_rank(graphdef, state, x_TD):
    """`DecoderLayer.ffn` up to its routed experts: the post-attention norm and the router."""
    routed = _RoutedInputs()
    nnx.merge(graphdef, state).ffn(x_TD, routed)
    return routed.h_TD, routed.weights_TK, routed.ids_TK


def _dispatch_rank(num_experts, dispatcher, quantize, h_TD, ids_TK, segment_ids_T):
    return dispatch_tokens(h_TD, ids_TK, segment_ids_T >= 0, num_experts, dispatcher, quantize=quantize)


def _gmm_rank(backend, dispatcher, out_dtype, slab, x_grouped_RD, plan):
    return expert_ffn(x_grouped_RD, plan, slab, backend, dispatcher, out_dtype)


def _combine_rank(dispatcher, y_grouped_RD, plan, weights_TK):
    return combine_tokens(y_grouped_RD, plan, weights_TK, dispatcher)


def _shared_rank(graphdef, state, x_TD, y_TD):
    """`DecoderLayer.ffn` from its routed experts' output: the shared expert and the residual."""
    return nnx.merge(graphdef, state).ffn(x_TD, _RoutedOutputs(y_TD))[0]


def _head_rank(graphdef, state, x_TD):
    return nnx.merge(graphdef, state).head(x_TD)


def _head_rows_rank(graphdef, state, x_TD, rows_R):
    return nnx.merge(graphdef, state).head(x_TD[rows_R])
