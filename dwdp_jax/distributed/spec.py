"""What every process of a run must agree on: the launch spec (a plain dict, JSON on the command line of each
process), its checks, and what it derives (model, placement, which ranks a process drives)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dwdp_jax.packing import pack
from dwdp_jax.placement import Placement
from models import config as C

MODES = ("verify", "serve")
FAULT_KINDS = ("kill", "stall", "bad_handle")  # bad_handle: that rank publishes a segment nobody can map

DEFAULTS: dict[str, Any] = dict(
    mode="verify",  # verify: logits of fixed batches per rank written for the oracle; serve: requests via the router
    strategies=("dwdp", "dep"),  # verify mode
    model="tiny", model_changes=dict(num_hidden_layers=4, first_k_dense_replace=1), seed=3,
    num_groups=1, group_size=4, devices_per_process=1, local_experts=0,  # 0: no redundancy (E / group_size)
    token_budget=32, max_batch_size=4,
    num_requests=16, min_len=3, max_len=12, request_seed=0,
    start_timeout_s=30.0, barrier_timeout_s=10.0, step_deadline_s=60.0, heartbeat_s=5,
    transport="copy_engine",  # DWDP's pulls from the peers' mapped slabs: copy_engine | device_put (XLA slices)
    poison=True,
    fault=None,  # serve: dict(group, rank, after_batches, kind in FAULT_KINDS)
)


@dataclasses.dataclass(frozen=True)
class Spec:
    fields: dict

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def of(cls, **changes) -> "Spec":
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown launch field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        fields = {**DEFAULTS, **changes}
        fields["strategies"] = list(fields["strategies"])
        spec = cls(fields)
        spec.check()
        return spec

    def check(self) -> None:
        def need(ok, field, allowed):
            if not ok:
                raise ValueError(f"launch field {field}={self.fields[field]!r}; allowed: {allowed}")

        need(self.mode in MODES, "mode", MODES)
        need(set(self.strategies) <= {"dwdp", "dep"} and self.strategies, "strategies", "a non-empty subset of "
             "('dwdp', 'dep')")
        need(isinstance(self.num_groups, int) and self.num_groups >= 1, "num_groups", "an integer >= 1")
        need(isinstance(self.devices_per_process, int) and self.devices_per_process >= 1, "devices_per_process",
             "an integer >= 1")
        need(isinstance(self.group_size, int) and self.group_size >= 1
             and self.group_size % self.devices_per_process == 0, "group_size",
             f"a positive multiple of devices_per_process ({self.devices_per_process})")
        need(self.mode == "serve" or self.num_groups == 1, "num_groups", "1 in verify mode")
        need(self.transport in ("copy_engine", "device_put"), "transport", "'copy_engine' or 'device_put'")
        need(isinstance(self.token_budget, int) and self.token_budget >= self.max_len, "token_budget",
             f"an integer >= max_len ({self.max_len})")
        need(isinstance(self.min_len, int) and 1 <= self.min_len <= self.max_len, "min_len", "[1, max_len]")
        need(isinstance(self.num_requests, int) and self.num_requests >= 1, "num_requests", "an integer >= 1")
        for field in ("start_timeout_s", "barrier_timeout_s", "step_deadline_s"):
            need(isinstance(self.fields[field], (int, float)) and self.fields[field] > 0, field, "a number > 0")
        if self.fault is not None:
            f = self.fault
            need(isinstance(f, dict) and set(f) == {"group", "rank", "after_batches", "kind"}, "fault",
                 "None or dict(group, rank, after_batches, kind)")
            need(f["kind"] in FAULT_KINDS and 0 <= f["group"] < self.num_groups and 0 <= f["rank"] < self.group_size
                 and f["after_batches"] >= 0, "fault", f"kind in {FAULT_KINDS}, group in [0, {self.num_groups - 1}], "
                 f"rank in [0, {self.group_size - 1}], after_batches >= 0")
        self.placement()  # the group's placement is valid

    @property
    def processes_per_group(self) -> int:
        return self.group_size // self.devices_per_process

    def model_config(self):
        return C.get_preset(self.model, **self.model_changes)

    def placement(self) -> Placement:
        experts = self.model_config().n_routed_experts
        return Placement.for_group(experts, self.group_size, self.local_experts or None)

    def ranks_of(self, process: int) -> list[int]:
        """The group ranks a process drives: consecutive, devices_per_process of them."""
        return list(range(process * self.devices_per_process, (process + 1) * self.devices_per_process))

    def agreed(self, group: int) -> dict:
        """What every process of a group must hold identically (its own process id excepted)."""
        p = self.placement()
        return {**self.fields, "group": group,
                "placement": [list(p.local_range(r)) for r in range(p.num_ranks)]}

    def requests(self) -> list[tuple[int, list[int]]]:
        rng = np.random.default_rng(self.request_seed)
        vocab = self.model_config().vocab_size
        return [(i, rng.integers(0, vocab, int(rng.integers(self.min_len, self.max_len + 1))).tolist())
                for i in range(self.num_requests)]


def verify_batches(spec: Spec, rank: int):
    """The fixed batches rank `rank` runs in verify mode: different sequence counts per rank, two steps each."""
    rng = np.random.default_rng(1000 + rank)
    vocab = spec.model_config().vocab_size
    out = []
    for step in range(2):
        lengths = rng.integers(1, 9, size=1 + (rank + step) % 3)
        out.append(pack([rng.integers(0, vocab, int(n)).tolist() for n in lengths], budget=spec.token_budget))
    return out
