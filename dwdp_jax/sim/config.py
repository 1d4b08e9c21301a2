"""What a simulation runs: the context servers of one strategy (`ContextConfig`) and, for disaggregated serving, the
generation servers beside them (`E2EConfig`). Every field is checked at construction, naming the field."""

from __future__ import annotations

import dataclasses

from dwdp_jax.placement import Placement
from dwdp_jax.prefetch import PULL_ISSUES, SLICE_BYTES
from dwdp_jax.serving.scheduler import DwdpScheduler
from dwdp_jax.sim.roofline import GenServer, Precision
from models.config import ModelConfig

STRATEGIES = ("dep", "dwdp")
DISCIPLINES = ("fifo", "round_robin", "none")
PEER_ORDERS = ("random", "rank")
PACKINGS = DwdpScheduler.PACKINGS


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Context servers of one strategy: `num_groups` groups of `group_size` GPUs (DEP servers or DWDP groups)."""

    strategy: str
    group_size: int = 4
    num_groups: int = 1
    local_experts: int | None = None  # DWDP L; None: the least redundant valid placement
    max_num_tokens: int = 32768
    max_batch_size: int = 64
    discipline: str = "fifo"
    slice_bytes: int = SLICE_BYTES
    slice_overhead_s: float = 0.2e-6  # assumed copy-engine cost per slice; to be measured by the sliced transport
    peer_order: str = "random"
    packing: str = "lookahead"  # DWDP's batch filling (serving.scheduler.DwdpScheduler)
    compute_slowdown: float = 0.0
    attention_slowdown: float | None = None  # None: compute_slowdown
    pull_issue: str = "after_moe"
    # None: a batch costs its tokens (a runtime without static shapes, as the paper's); k: batches pad to the next
    # multiple of max_num_tokens / k (dwdp_jax.run_plan.token_buckets), DWDP ranks each to their own batch's, DEP ranks
    # all to their fullest rank's (one SPMD step)
    token_buckets: int | None = None
    precision: Precision = Precision()
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ContextConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.discipline not in DISCIPLINES:
            raise ValueError(f"ContextConfig.discipline must be one of {DISCIPLINES}, got {self.discipline!r}")
        if self.peer_order not in PEER_ORDERS:
            raise ValueError(f"ContextConfig.peer_order must be one of {PEER_ORDERS}, got {self.peer_order!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"ContextConfig.packing must be one of {PACKINGS}, got {self.packing!r}")
        for name in ("group_size", "num_groups", "max_num_tokens", "max_batch_size", "slice_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ContextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "dwdp" and self.group_size < 2:
            raise ValueError(f"ContextConfig.group_size must be >= 2 for DWDP, got {self.group_size}")
        if self.pull_issue not in PULL_ISSUES:
            raise ValueError(f"ContextConfig.pull_issue must be one of {PULL_ISSUES}, got {self.pull_issue!r}")
        if self.token_buckets is not None and not (self.token_buckets >= 1
                                                   and self.max_num_tokens % self.token_buckets == 0):
            raise ValueError(f"ContextConfig.token_buckets must be None or >= 1 and divide max_num_tokens="
                             f"{self.max_num_tokens}, got {self.token_buckets}")
        for name in ("slice_overhead_s", "compute_slowdown", "attention_slowdown"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"ContextConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def slowdowns(self) -> tuple[float, float]:
        """(attention, other compute) slowdown while the rank pulls."""
        attention = self.compute_slowdown if self.attention_slowdown is None else self.attention_slowdown
        return attention, self.compute_slowdown

    @property
    def num_gpus(self) -> int:
        return self.group_size * self.num_groups

    def padded(self, tokens: int) -> int | None:
        """The static token count a batch of `tokens` runs at (None: no padding)."""
        if self.token_buckets is None:
            return None
        step = self.max_num_tokens // self.token_buckets
        return -(-tokens // step) * step

    def placement(self, cfg: ModelConfig) -> Placement:
        return Placement.for_group(cfg.n_routed_experts, self.group_size, self.local_experts)


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    context: ContextConfig
    gen: GenServer
    num_gen_servers: int = 1
    concurrency: int | None = None  # requests in flight; None: all generation slots

    def __post_init__(self):
        if self.num_gen_servers < 1:
            raise ValueError(f"E2EConfig.num_gen_servers must be >= 1, got {self.num_gen_servers}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"E2EConfig.concurrency must be >= 1, got {self.concurrency}")

    @property
    def in_flight(self) -> int:
        return self.concurrency or self.num_gen_servers * self.gen.max_batch

    @property
    def num_gpus(self) -> int:
        return self.context.num_gpus + self.num_gen_servers * self.gen.num_gpus
