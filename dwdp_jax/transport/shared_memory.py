"""Pulls across processes: each owner's local slabs live in memory its peers map, and a pull copies the remote
rows out of the owner's mapping into the puller's own buffers.

Start-up, per owner rank this process holds: lay out every MoE layer's slab arrays in one segment, write them,
publish the segment's descriptor (where it is, the layout) through the `exchange` (the coordination service's
key-value store across processes; a dict in one process). Every process then maps the segments of the owners its
ranks pull from, checks each layout against its own slabs, and reports the outcome; if any process failed to map
a segment, every process raises, naming the owner and the segment.

`SharedMemoryTransport` (CPU) keeps the segments in POSIX shared memory (/dev/shm files, mapped read-only by the
peers); `vmm.VmmTransport` (GPU) in CUDA VMM allocations. Like `device_put`, a pull lands in fresh buffers, so
write-after-read is automatic and three slot buffers can be alive at once (live_slots = 3). An owner's weights
never change after start-up, so a pull needs nothing from the owner's process, which may even have exited.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.transport.base import Transport, TransportOptions, slice_bounds
from models.experts import ExpertSlab

ALIGN = 256


class HandleError(RuntimeError):
    """A published slab segment that cannot be mapped here (gone, wrong size, wrong layout, refused handle)."""


def layout_of(slabs: list[ExpertSlab]) -> list[dict]:
    """Where each (layer, array) of an owner's slabs sits in its segment: byte offset, shape, dtype."""
    entries, offset = [], 0
    for layer, slab in enumerate(slabs):
        for index, a in enumerate(slab.arrays()):
            nbytes = int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
            entries.append(dict(layer=layer, index=index, offset=offset, shape=list(a.shape),
                                dtype=jnp.dtype(a.dtype).name))
            offset += -(-nbytes // ALIGN) * ALIGN
    return entries


def segment_bytes(layout: list[dict]) -> int:
    last = layout[-1]
    return last["offset"] + int(np.prod(last["shape"])) * jnp.dtype(last["dtype"]).itemsize


class LocalExchange:
    """The exchange of a single process: descriptors in a dict."""

    def __init__(self):
        self.values: dict[str, str] = {}

    def set(self, key: str, value: str) -> None:
        self.values[key] = value

    def get(self, key: str, who) -> str:
        if key not in self.values:
            raise HandleError(f"owner {who} published no {key!r}")
        return self.values[key]

    def all_ok(self, name: str, error: str | None) -> None:
        if error:
            raise HandleError(f"{name} failed: {error}")


class MappedSlabsTransport(Transport):
    """The start-up protocol and the pulls; subclasses own the memory (`_create`, `_attach`, `_take`)."""

    live_slots = 3

    def __init__(self, placement, local_slabs, devices, options=TransportOptions(), exchange=None,
                 tag: str | None = None):
        """local_slabs[owner]: that owner's slabs per MoE layer, or None for an owner in another process;
        devices[rank]: None for a rank in another process. `tag` names this group's segments (every process of
        the group passes the same one)."""
        if len(local_slabs) != placement.num_ranks or len(devices) != placement.num_ranks:
            raise ValueError(f"local_slabs and devices need one entry per rank ({placement.num_ranks}), got "
                             f"{len(local_slabs)} and {len(devices)}")
        super().__init__(placement, local_slabs, devices, options)
        self.exchange = LocalExchange() if exchange is None else exchange
        self.tag = tag or f"dwdp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.local_ranks = [r for r, d in enumerate(devices) if d is not None]
        self.bytes_pulled = [0] * placement.num_ranks
        self.pulls_done = [0] * placement.num_ranks
        held = [r for r, s in enumerate(local_slabs) if s is not None]
        self._template = local_slabs[held[0]][0]
        self._expected = layout_of(local_slabs[held[0]])
        self._owned: dict[int, object] = {}
        for owner in held:
            descriptor = self._create(owner, local_slabs[owner])
            self.exchange.set(f"{self.tag}/slabs/{owner}", json.dumps(descriptor))
        self.sources: dict[int, list[list]] = {}  # owner -> layer -> arrays (row-sliceable views of its segment)
        error = None
        owners = sorted({p.owner for r in self.local_ranks for p in placement.pulls(r)})
        try:
            for owner in owners:
                descriptor = json.loads(self.exchange.get(f"{self.tag}/slabs/{owner}", owner))
                self._check_layout(owner, descriptor["layout"])
                self.sources[owner] = self._attach(owner, descriptor)
        except HandleError as e:
            error = str(e)
        self.exchange.all_ok("mapping the peers' expert slabs", error)
        atexit.register(self.close)

    def _check_layout(self, owner: int, layout: list[dict]) -> None:
        for mine, theirs in zip(self._expected, layout):
            for field in ("shape", "dtype", "offset"):
                if mine[field] != theirs[field]:
                    raise HandleError(f"owner {owner}'s slab of MoE layer {theirs['layer']} array {theirs['index']} "
                                      f"has {field} {theirs[field]}, this process expects {mine[field]}")
        if len(layout) != len(self._expected):
            raise HandleError(f"owner {owner} published {len(layout)} slab arrays, this process expects "
                              f"{len(self._expected)}")

    def _pieces(self, rank: int):
        for owner, offset, count, i in self.pull_order(rank):
            a, b = slice_bounds(count, self.options.slices)[i]
            start = next(p.global_start for p in self.placement.pulls(rank) if (p.owner, p.src_offset) == (owner, offset))
            yield owner, offset + a, offset + b, start + a

    def _slot_layout(self, rank: int) -> tuple[ExpertSlab, ...]:
        slabs = []
        for owner, lo, hi, start in self._pieces(rank):
            arrays = [jax.ShapeDtypeStruct((hi - lo,) + tuple(a.shape[1:]), a.dtype) for a in self.sources[owner][0]]
            slabs.append(self._template.with_arrays(list(arrays), start=start))
        return tuple(sorted(slabs, key=lambda s: s.start))

    def _copy(self, rank: int, layer: int, slot: int) -> tuple[ExpertSlab, ...]:
        device = self.devices[rank]
        slabs = []
        for owner, lo, hi, start in self._pieces(rank):
            arrays = [self._take(a, lo, hi, device) for a in self.sources[owner][layer]]
            self.bytes_pulled[rank] += sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)
            slabs.append(self._template.with_arrays(list(arrays), start=start))
        self.pulls_done[rank] += 1
        return tuple(sorted(slabs, key=lambda s: s.start))

    def _wait(self, rank, slot, slabs):
        return slabs  # the reading program waits on the copies' definition events

    def planned_bytes_per_layer(self, rank: int) -> int:
        per_expert = sum(int(np.prod(a.shape[1:])) * jnp.dtype(a.dtype).itemsize
                         for a in self.sources[self.placement.pulls(rank)[0].owner][0]) if self.placement.pulls(rank) else 0
        return self.placement.bytes_pulled_per_layer(rank, per_expert)

    def close(self) -> None:
        """Unmaps the peers' segments and frees this process's own."""

    # -- the memory ---------------------------------------------------------------------------------------------

    def _create(self, owner: int, slabs: list[ExpertSlab]) -> dict:
        raise NotImplementedError

    def _attach(self, owner: int, descriptor: dict) -> list[list]:
        raise NotImplementedError

    def _take(self, array, lo: int, hi: int, device):
        raise NotImplementedError


class SharedMemoryTransport(MappedSlabsTransport):
    """POSIX shared memory (CPU devices): one /dev/shm file per owner, written once, mapped read-only by peers."""

    root = "/dev/shm"

    def _create(self, owner, slabs):
        layout = layout_of(slabs)
        path = os.path.join(self.root, f"{self.tag}_r{owner}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            size = segment_bytes(layout)
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        for entry, a in zip(layout, (a for slab in slabs for a in slab.arrays())):
            view = np.ndarray(entry["shape"], jnp.dtype(entry["dtype"]), region, entry["offset"])
            view[...] = np.asarray(a)
        self._owned[owner] = (path, region)
        return dict(kind="posix_shm", path=path, bytes=size, layout=layout)

    def _attach(self, owner, descriptor):
        path = descriptor["path"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise HandleError(f"owner {owner}'s slab segment {path} cannot be opened: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            if size != descriptor["bytes"]:
                raise HandleError(f"owner {owner}'s slab segment {path} holds {size} bytes, its descriptor says "
                                  f"{descriptor['bytes']}")
            region = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        layers: list[list] = [[] for _ in range(1 + max(e["layer"] for e in descriptor["layout"]))]
        for e in descriptor["layout"]:
            layers[e["layer"]].append(np.ndarray(e["shape"], jnp.dtype(e["dtype"]), region, e["offset"]))
        return layers

    def _take(self, array, lo, hi, device):
        return jax.device_put(np.array(array[lo:hi]), device)  # np.array: the bytes leave the owner's segment here

    def close(self):
        for path, region in self._owned.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._owned.clear()
