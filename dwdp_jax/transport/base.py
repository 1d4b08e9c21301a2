"""The transport interface: how a DWDP rank gets the remote experts of a MoE layer into one of its two slots.

Protocol per rank (DESIGN.md, execution model), slot = MoE layer index % 2, in the order the engine calls it:
  pull(rank, layer, slot)   request the asynchronous copy of `layer`'s remote experts into `slot`
  acquire(rank, slot)       the slabs of that slot for the MoE that reads them (read-after-write is the backend's job)
  release(rank, slot)       once the program reading the slot is built: the slot may be refilled after that program
                            has read it (write-after-read is the backend's job)
  seal(rank)                the pulls requested so far start from the next program the rank launches
  hook(rank)                None, or the in-program fences that program takes (`stages`: wait before the MoE reads
                            its slot, issue the sealed pulls after it)
A rank only ever waits for its own pulls; the owners' weights are immutable after setup, so no pull needs any
cooperation from the owner's worker.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.placement import Placement
from models.experts import ExpertSlab


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """`slices`: split every pull into this many pieces issued round-robin over the owners (the paper's
    copy-engine contention mitigation; 1 = off). `poison`: fill a slot with NaN whenever it is released or about
    to be pulled into, so any read of a stale or unfinished slot shows up in the results. `timeline`: record
    device timestamps of every copy and fence (transports that can: the copy engine on GPU). `slice_bytes`: the
    copy engine's 1-2 MiB slicing (each copy cut into pieces issued round-robin over the owners)."""

    slices: int = 1
    poison: bool = False
    timeline: bool = False
    slice_bytes: int = 0  # copy engine: memcpy pieces of at most this many bytes, round-robin over owners (0 = whole)

    def __post_init__(self):
        if not isinstance(self.slices, int) or self.slices < 1:
            raise ValueError(f"TransportOptions.slices must be an integer >= 1 (1 = contention mitigation off), "
                             f"got {self.slices!r}")
        if not isinstance(self.slice_bytes, int) or self.slice_bytes < 0:
            raise ValueError(f"TransportOptions.slice_bytes must be an integer >= 0 (0 = whole copies), "
                             f"got {self.slice_bytes!r}")


def slice_bounds(count: int, slices: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges splitting `count` experts into min(slices, count) near-equal pieces."""
    edges = np.linspace(0, count, min(slices, count) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def export_pieces(local_slab: ExpertSlab, placement: Placement, owner: int, slices: int,
                  device: jax.Device) -> dict[tuple[int, int], tuple[ExpertSlab, ...]]:
    """The arrays `owner` serves to its peers for one layer: {(src_offset, count): slices}, built once at setup.

    When a piece is the owner's whole slab and unsliced (the uniform L == P case) the local slab itself is
    served: no extra memory.
    """
    wanted = {(p.src_offset, p.count) for r in range(placement.num_ranks) if r != owner
              for p in placement.pulls(r) if p.owner == owner}
    pieces = {}
    for offset, count in sorted(wanted):
        chunks = []
        for a, b in slice_bounds(count, slices):
            if (offset + a, b - a) == (0, local_slab.count):
                chunks.append(local_slab)
                continue
            chunks.append(jax.device_put(local_slab.rows(offset + a, offset + b), device))
        pieces[(offset, count)] = tuple(chunks)
    return pieces


def poisoned_like(slabs: tuple[ExpertSlab, ...], device: jax.Device) -> tuple[ExpertSlab, ...]:
    def nan(a):
        return jax.device_put(jnp.full(a.shape, jnp.nan, a.dtype), device)

    return tuple(s.with_arrays([nan(a) for a in s.arrays()]) for s in slabs)


class Transport(abc.ABC):
    """Two slots per rank; subclasses implement the copy."""

    # Slot buffers of one layer's remote experts alive at once per rank (the memory planner's `live_slots`).
    live_slots = 2
    # True: a pull starts from the program launched after its seal, so it cannot serve that program's own read.
    issues_in_program = False
    # True: honours TransportOptions.slice_bytes (cuts copies by size); the rest slice by count only.
    slices_by_bytes = False

    def __init__(self, placement: Placement, local_slabs: list[list[ExpertSlab]], devices: list[jax.Device],
                 options: TransportOptions = TransportOptions()):
        """local_slabs[owner][layer]: the owner's local experts of that MoE layer, on the owner's device."""
        self.placement = placement
        self.local_slabs = local_slabs
        self.devices = devices
        self.options = options
        # slots[rank][slot] = (layer or None when free, slabs); each rank's entry is touched only by its own worker.
        self.slots: list[list[tuple[int | None, tuple[ExpertSlab, ...]]]] = [[(None, ()), (None, ())] for _ in devices]

    def pull(self, rank: int, layer: int, slot: int) -> None:
        held = self.slots[rank][slot][0]
        if held is not None:
            raise RuntimeError(f"rank {rank} pulls layer {layer} into slot {slot} still holding layer {held}: "
                               f"release it first (write-after-read)")
        self._poison(rank, slot)
        self.slots[rank][slot] = (layer, self._copy(rank, layer, slot))

    def acquire(self, rank: int, slot: int, layer: int) -> tuple[ExpertSlab, ...]:
        held, slabs = self.slots[rank][slot]
        if held != layer:
            raise RuntimeError(f"rank {rank} reads layer {layer} from slot {slot}, which holds "
                               f"{'nothing' if held is None else f'layer {held}'}")
        return self._wait(rank, slot, slabs)

    def release(self, rank: int, slot: int) -> None:
        """Called once the MoE reading the slot is enqueued; that MoE keeps its own references to the buffers."""
        self.slots[rank][slot] = (None, self.slots[rank][slot][1])
        self._poison(rank, slot)

    def begin_step(self, rank: int) -> None:
        """A new forward step of `rank` starts (its previous step's device work is complete)."""

    def seal(self, rank: int) -> None:
        """Transports that issue pulls from inside programs start the pulls requested so far from the next one."""

    def hook(self, rank: int):
        """The in-program fences of `rank`'s programs (None: the transport needs none)."""
        return None

    def remote_specs(self, rank: int) -> tuple[ExpertSlab, ...]:
        """Abstract shapes (with the rank's sharding) of what `acquire` returns: for compiling programs."""
        on_rank = jax.sharding.SingleDeviceSharding(self.devices[rank])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_rank),
                            self._slot_layout(rank))

    @abc.abstractmethod
    def _slot_layout(self, rank: int) -> tuple[ExpertSlab, ...]:
        """Arrays laid out as what `acquire` returns to `rank` (any layer): the slabs' shapes and order."""

    def _poison(self, rank: int, slot: int) -> None:
        if self.options.poison and self.slots[rank][slot][1]:
            self.slots[rank][slot] = (None, poisoned_like(self.slots[rank][slot][1], self.devices[rank]))

    def pull_order(self, rank: int) -> list[tuple[int, int, int]]:
        """(owner, piece offset, piece count, slice index) in issue order: slice-major, round-robin over owners."""
        pulls = self.placement.pulls(rank)
        order = []
        for i in range(self.options.slices):
            for p in pulls:
                if i < len(slice_bounds(p.count, self.options.slices)):
                    order.append((p.owner, p.src_offset, p.count, i))
        return order

    def planned_bytes_per_layer(self, rank: int) -> int:
        """The bytes one layer's pulls move to `rank` (its remote experts' values and scales)."""
        pulls = self.placement.pulls(rank)
        if not pulls:
            return 0
        per_expert = sum(a.nbytes // a.shape[0] for a in self.local_slabs[pulls[0].owner][0].arrays())
        return self.placement.bytes_pulled_per_layer(rank, per_expert)

    @abc.abstractmethod
    def _copy(self, rank: int, layer: int, slot: int) -> tuple[ExpertSlab, ...]:
        """Start (or request) the copies of `layer`'s remote experts to `rank`; returns the destination slabs."""

    @abc.abstractmethod
    def _wait(self, rank: int, slot: int, slabs: tuple[ExpertSlab, ...]) -> tuple[ExpertSlab, ...]:
        """Make the slabs safe to read by the rank's next program (read-after-write)."""
