"""The portable transport: `jax.device_put` of the owners' pre-split arrays (CPU virtual devices and GPUs).

On GPUs PJRT runs the copy as a copy-engine peer memcpy on the source's D2D stream, asynchronously to the host,
and the destination's next program waits on the copy's definition event (read-after-write, no host sync). The
destination buffer is freshly allocated and only becomes usable once the destination's compute stream reaches the
allocation point, so a pull waits for the work already queued on its own device: the engine therefore issues the
pull of layer m + 2 right after the MoE of layer m is enqueued, and the copy overlaps layer m + 1. Fresh buffers
also make write-after-read automatic: the MoE that read the old slot holds its buffers until it finishes, so three
slot buffers are alive while it does (live_slots = 3).

Owners export their experts as whole pre-split arrays, one per (layer, pull, slice), so a pull never slices a
peer array (slicing would run work on the peer's compute stream).
"""

from __future__ import annotations

import jax

from dwdp_jax.transport.base import Transport, TransportOptions, export_pieces
from models.experts import ExpertSlab


class DevicePutTransport(Transport):
    live_slots = 3

    def __init__(self, placement, local_slabs, devices, options=TransportOptions()):
        super().__init__(placement, local_slabs, devices, options)
        # exports[owner][layer]: that owner's pieces of one MoE layer (export_pieces)
        self.exports = [[export_pieces(slab, placement, owner, self.options.slices, devices[owner])
                         for slab in layers] for owner, layers in enumerate(local_slabs)]

    def _slot_layout(self, rank: int) -> tuple[ExpertSlab, ...]:
        pieces = tuple(self.exports[owner][0][(offset, count)][i] for owner, offset, count, i in self.pull_order(rank))
        return tuple(sorted(pieces, key=lambda s: s.start))

    def _copy(self, rank: int, layer: int, slot: int) -> tuple[ExpertSlab, ...]:
        device = self.devices[rank]
        slabs = []
        for owner, offset, count, i in self.pull_order(rank):
            src = self.exports[owner][layer][(offset, count)][i]
            slabs.append(jax.device_put(src, device))
        return tuple(sorted(slabs, key=lambda s: s.start))

    def _wait(self, rank: int, slot: int, slabs: tuple[ExpertSlab, ...]) -> tuple[ExpertSlab, ...]:
        return slabs  # the consuming program waits on the copies' definition events on the device

