"""A process's share of a DWDP group and of a DEP mesh, on the multi-controller runtime.

`ProcessDwdpEngine` is `DwdpEngine` restricted to the ranks whose devices this process drives: it places only
their weights, writes their expert slabs straight into exportable memory (`SlabShare`: shared memory on CPU, CUDA
VMM on GPU), which its ranks' programs then read in place, and maps the other processes' slabs. Its transport
pulls from those mappings: `copy_engine` (persistent slots, copies issued from inside the rank's programs, as in
one process) or `device_put` (XLA slices into fresh buffers). The step is `DwdpEngine.step` unchanged, so a rank's
programs are the single-process ones: no collective.

DEP needs no counterpart: `DepRuntime` over the global mesh (`jax.devices()`) produces only this process's expert
shards and gathers the outputs across processes (every process calls `step` with the same batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from dwdp_jax.expert_source import as_source
from dwdp_jax.placement import Placement
from dwdp_jax.runtime import stages
from dwdp_jax.runtime.dwdp import DwdpEngine, DwdpOptions
from dwdp_jax.transport.copy_engine import CopyEngineTransport
from dwdp_jax.transport.shared_memory import SharedMemoryShare, SliceTransport, SlabShare
from models.deepseek_v3 import Params
from models.experts import ExpertSlab

TRANSPORTS = ("copy_engine", "device_put")


def share_class(platform: str) -> type[SlabShare]:
    if platform == "gpu":
        from dwdp_jax.transport.vmm import VmmShare

        return VmmShare
    return SharedMemoryShare


class _LayerSlabs(Sequence):
    """A rank's slab of each MoE layer, read from the expert source when asked: the share writes each into its
    segment and drops it, so no second copy of the rank's experts is ever whole."""

    def __init__(self, source, start: int, stop: int, device: jax.Device, num_layers: int):
        self.source, self.start, self.stop, self.device, self.num_layers = source, start, stop, device, num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> ExpertSlab:
        if not 0 <= layer < self.num_layers:
            raise IndexError(layer)
        return self.source.rows(layer, self.start, self.stop, self.device)


class ProcessDwdpEngine(DwdpEngine):
    """The ranks `local_ranks` ({global rank: device}) of a DWDP group whose other ranks run in other processes."""

    def __init__(self, params: Params, placement: Placement, local_ranks: dict[int, jax.Device],
                 options: DwdpOptions = DwdpOptions(), exchange=None, tag: str | None = None):
        cfg = params.model.cfg
        if placement.num_experts != cfg.n_routed_experts:
            raise ValueError(f"placement.num_experts ({placement.num_experts}) must equal the model's "
                             f"n_routed_experts ({cfg.n_routed_experts})")
        bad = [r for r in local_ranks if not 0 <= r < placement.num_ranks]
        if not local_ranks or bad:
            raise ValueError(f"local_ranks must be a non-empty subset of [0, {placement.num_ranks - 1}], got "
                             f"{sorted(local_ranks)}")
        if options.transport not in TRANSPORTS:
            raise ValueError(f"DwdpOptions.transport={options.transport!r} across processes; allowed: {TRANSPORTS}")
        self.cfg, self.placement, self.options = cfg, placement, options
        self.devices = [local_ranks.get(r) for r in range(placement.num_ranks)]
        self.graphs, weights = stages.split_model(params.model)
        self.ranks = {r: self._place_rank(r, params, weights, local=()) for r in sorted(local_ranks)}
        source = as_source(params.experts)
        slabs = [_LayerSlabs(source, *placement.local_range(r), d, cfg.num_moe_layers) if d is not None else None
                 for r, d in enumerate(self.devices)]
        platform = next(iter(local_ranks.values())).platform
        self.share = share_class(platform)(placement, slabs, self.devices, exchange=exchange, tag=tag)
        for r in self.ranks:
            self.ranks[r] = dataclasses.replace(self.ranks[r], local=tuple(self.share.slabs[r]))
        if options.transport == "copy_engine":
            self.transport = CopyEngineTransport(placement, self.share.local_slabs(), self.devices,
                                                 options.transport_options())
        else:
            self.transport = SliceTransport(placement, self.share, self.devices, options.transport_options())

    @property
    def local_ranks(self) -> list[int]:
        return sorted(self.ranks)


class LocalRanks:
    """The engine's local ranks numbered 0..n-1, for `serving.workers.RankWorkers`."""

    def __init__(self, engine: ProcessDwdpEngine):
        self.engine, self.global_ranks = engine, engine.local_ranks
        self.num_ranks = len(self.global_ranks)

    def step(self, rank: int, batch):
        return self.engine.step(self.global_ranks[rank], batch)
