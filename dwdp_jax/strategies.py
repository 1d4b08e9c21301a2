"""The serving strategies the benchmark compares, behind one interface, and their registry.

A strategy builds its runtime from the weights on its devices and says how that runtime steps, warms up, serves,
is inspected for collectives and profiled, and what it needs of a device's memory; the driver
(`bench.run_strategy`) runs the same sequence for each, reading only the typed plan. Adding a strategy is a
`Strategy` subclass and an entry in REGISTRY.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from dwdp_jax import memory, profiling
from dwdp_jax.kernels import grouped_gemm
from dwdp_jax.packing import PackedBatch, pack
from dwdp_jax.progress import Phases, progress_bar
from dwdp_jax.run_plan import Plan
from dwdp_jax.runtime import dep as dep_lib
from dwdp_jax.runtime import reference
from dwdp_jax.runtime.dwdp import DwdpEngine, count_collectives
from dwdp_jax.serving import loop
from dwdp_jax.transport import transport_class
from dwdp_jax.verification import last_token_only
from models import config as model_config
from models.experts import tokens_quantized


class Strategy(abc.ABC):
    """One way of serving the model on a group of devices. `runtime_class` builds its runtime (a test stands a
    failing one in)."""

    name: str
    runtime_class: Callable
    # every rank runs every iteration (one SPMD program), so a rank's iterations are the run's
    lock_step: bool
    # it places experts as the plan's DWDP `Placement` says (a group of config.num_ranks >= 2)
    needs_placement = False

    def __init__(self, runtime_class: Callable | None = None):
        if runtime_class is not None:
            self.runtime_class = runtime_class

    @abc.abstractmethod
    def ranks(self, p: Plan) -> int:
        """The devices it runs on."""

    def check(self, p: Plan) -> None:
        """Raises ValueError for a plan this strategy cannot run (no backend started)."""

    def check_platform(self, p: Plan, platform: str) -> None:
        """Raises ValueError for a plan this strategy cannot run on the devices' platform."""

    @abc.abstractmethod
    def plan_memory(self, p: Plan, cfg: model_config.ModelConfig, device_bytes: int | None = None
                    ) -> memory.MemoryPlan:
        """What one of its ranks holds for model `cfg`; ValueError with the numbers when over `device_bytes`."""

    @abc.abstractmethod
    def build(self, params: reference.Params, p: Plan):
        """Its runtime on its devices."""

    @abc.abstractmethod
    def step(self, runtime, batches: list[PackedBatch | None]) -> list[reference.PrefillOutput | None]:
        """Each rank's output for its batch, logits at each sequence's last token (compiles the step)."""

    @abc.abstractmethod
    def collectives(self, runtime, batch: PackedBatch) -> dict[str, int]:
        """The collectives in its compiled programs, by program."""

    @abc.abstractmethod
    def warm_up(self, runtime, p: Plan) -> None:
        """Compiles every token bucket's programs before timing."""

    @abc.abstractmethod
    def serve(self, runtime, p: Plan, sync: bool) -> tuple[list, list, list, dict]:
        """One pass of the workload (`serving.loop.served` takes the median of several)."""

    @abc.abstractmethod
    def profile(self, runtime, batches: list[PackedBatch | None], p: Plan) -> dict[str, dict[str, Any]]:
        """Per-iteration milliseconds in the paper's categories on the first DEP step's batches."""

    def step_memory(self, runtime, p: Plan) -> dict[str, Any]:
        """Summary fields on its compiled step's memory, when it measures them."""
        return {}

    def timeline(self, runtime, p: Plan, phases: Phases) -> tuple[dict, dict]:
        """(summary fields, raw fields) of a device-clock timeline of the first step, when it records one."""
        return {}, {}


class _RankByRank(Strategy):
    """Ranks that each step alone (`step(rank, batch)`), served by one worker thread per rank."""

    lock_step = False

    def step(self, runtime, batches):
        return [runtime.step(r, b).output if b is not None else None
                for r, b in enumerate(progress_bar(batches, "step", "rank"))]

    def collectives(self, runtime, batch):
        return {k: count_collectives(t) for k, t in runtime.compiled_hlo(batch).items()}

    def warm_up(self, runtime, p):
        # programs compile per device, so on every rank
        programs = [(budget, r) for budget in p.batching.buckets for r in range(runtime.num_ranks)]
        for budget, r in progress_bar(programs, "warm-up", "program"):
            runtime.step(r, pack([[1] * budget], budget=budget))

    def serve(self, runtime, p, sync):
        return (*loop.run_rank_by_rank(runtime, p, self.name), {})

    def profile(self, runtime, batches, p):
        return profiling.rank_by_rank_breakdown(runtime, batches)


class Reference(_RankByRank):
    """Every weight on one device, nothing pulled: the single-device baseline (for models that fit one device)."""

    name = "reference"
    runtime_class = reference.ReferenceRuntime

    def ranks(self, p):
        return 1

    def plan_memory(self, p, cfg, device_bytes=None):
        return memory.plan_reference(cfg, p.batching.max_num_tokens, attention_impl="flash",
                                     device_bytes=device_bytes)

    def build(self, params, p):
        return self.runtime_class(params, p.devices[0], p.weights.gemm_backend, p.batching.max_batch_size)


class Dwdp(_RankByRank):
    """One engine per device, each rank serving its own batches and pulling the remote experts it lacks."""

    name = "dwdp"
    runtime_class = DwdpEngine
    needs_placement = True

    def ranks(self, p):
        return p.dwdp.num_ranks

    def plan_memory(self, p, cfg, device_bytes=None):
        return memory.plan_dwdp(cfg, p.placement, p.batching.max_num_tokens, attention_impl="flash",
                                device_bytes=device_bytes,
                                live_slots=transport_class(p.dwdp.options.transport).live_slots,
                                row_align=grouped_gemm.row_alignment(p.weights.gemm_backend))

    def build(self, params, p):
        return self.runtime_class(params, p.placement, p.devices[:p.dwdp.num_ranks], p.dwdp.options)

    def serve(self, runtime, p, sync):
        if runtime.options.timeline:
            runtime.transport.clear_source_intervals()
        reqs, iters, assignments, _ = super().serve(runtime, p, sync)
        return reqs, iters, assignments, ({"pull_contention": profiling.pull_contention(runtime)}
                                          if runtime.options.timeline else {})

    def timeline(self, runtime, p, phases):
        if not runtime.options.timeline:
            return {}, {}
        phases.begin(f"{self.name}: copy-engine pull timeline of the first step")
        pulls = profiling.pull_timeline(runtime, profiling.first_step_batches(p))
        phases.lap(f"{self.name}.timeline")
        return {k: pulls[k] for k in ("pull_gbps_median", "exposed_wait_fraction_mean")}, \
            {"pull_timeline": pulls["ranks"]}


class Dep(Strategy):
    """Every rank in one SPMD step: replicated non-expert weights, the experts sharded, tokens all-to-all."""

    name = "dep"
    runtime_class = dep_lib.DepRuntime
    lock_step = True

    def ranks(self, p):
        return p.dep.num_ranks

    def check(self, p):
        if p.cfg.n_routed_experts % p.dep.num_ranks:
            raise ValueError(f"config.dep.num_ranks: DEP's {p.dep.num_ranks} ranks must divide the model's "
                             f"{p.cfg.n_routed_experts} experts (DEP shards every MoE layer evenly)")

    def check_platform(self, p, platform):
        if p.dep.dispatch == "ragged" and platform not in dep_lib.RAGGED_PLATFORMS:
            raise ValueError(f"config.dep.dispatch='ragged': XLA:{platform.upper()} has no ragged_all_to_all "
                             f"(platforms with it: {dep_lib.RAGGED_PLATFORMS}); use 'dense' or 'auto'")

    def plan_memory(self, p, cfg, device_bytes=None):
        return memory.plan_dep(cfg, p.dep.num_ranks, p.batching.max_num_tokens, attention_impl="flash",
                               device_bytes=device_bytes, fp8_dispatch=tokens_quantized(
                                   cfg.fp8_experts, p.weights.gemm_backend, cfg.hidden_size))

    def build(self, params, p):
        return self.runtime_class(
            params, p.dep.num_ranks, p.batching.max_num_tokens, dispatch=p.dep.dispatch,
            gemm_backend=p.weights.gemm_backend, attention_impl=p.weights.attention_impl,
            devices=p.devices[:p.dep.num_ranks], last_token_logits=p.batching.max_batch_size)

    def step(self, runtime, batches):
        return [None if b is None else last_token_only(o, b) for o, b in zip(runtime.step(batches), batches)]

    def collectives(self, runtime, batch):
        return {"step": count_collectives(runtime.compiled_hlo())}

    def warm_up(self, runtime, p):
        for budget in progress_bar(p.batching.buckets, "warm-up", "program"):
            runtime.step([pack([[1] * budget], budget=budget)] * runtime.num_ranks)

    def serve(self, runtime, p, sync):
        return loop.run_dep(runtime, p, sync)

    def profile(self, runtime, batches, p):
        return profiling.dep_breakdown(runtime, batches, p.cfg)

    def step_memory(self, runtime, p):
        # XLA's temporaries of the full-budget step beside the plan's estimate
        plan = self.plan_memory(p, p.cfg)
        return {"step_memory_gib": {"compiled": runtime.check_memory([None] * p.dep.num_ranks) / 2**30,
                                    "planned": (plan.all_to_all_bytes + plan.activation_bytes) / 2**30}}


# in the order the strategies run and are reported
REGISTRY: dict[str, type[Strategy]] = {s.name: s for s in (Reference, Dwdp, Dep)}
NAMES = tuple(REGISTRY)


def get(name: str, runtime_class: Callable | None = None) -> Strategy:
    """The strategy `name` (one of NAMES), its runtime built by `runtime_class` when given."""
    return REGISTRY[name](runtime_class)


def devices_of(p: Plan) -> int:
    """The devices the run needs: those of its largest strategy."""
    return max(get(name).ranks(p) for name in p.strategies)

