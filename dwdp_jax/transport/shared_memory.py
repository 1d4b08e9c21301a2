"""Expert slabs shared across processes: each owner's local slabs live in memory its peers map, and a pull copies
the remote rows out of the owner's memory into the puller's own.

`SlabShare` is the start-up protocol. Per owner rank this process holds: lay out every MoE layer's slab arrays in
one segment, write them layer by layer, and publish the segment's descriptor (where it is, the layout) through the
`exchange` (the coordination service's key-value store across processes; a dict in one process). The owner's
programs then read its slabs from the segment itself (`slabs[owner]`: JAX arrays over it, zero copy), so the
weights are held once. Every process maps the segments of the owners its ranks pull from, checks each layout
against its own, and reports the outcome; if any process failed to map a segment, every process raises, naming
the owner and the segment. The memory is the subclass's: `SharedMemoryShare` (CPU: POSIX shared memory, /dev/shm
files mapped read-only by the peers) and `vmm.VmmShare` (GPU: CUDA VMM allocations).

Two transports pull from a share. `SliceTransport` slices the rows out of the owner's arrays onto the rank's device
(a fresh buffer per pull, like `device_put`: write-after-read is automatic and three slot buffers can be alive at
once). `copy_engine.CopyEngineTransport`, given the share's slabs, copies them into persistent slots from inside
the rank's programs exactly as within one process. An owner's weights never change after start-up, so a pull needs
nothing from the owner's process.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import mmap
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from dwdp_jax.transport import zero_copy
from dwdp_jax.transport.base import Transport, TransportOptions, slice_bounds
from models.experts import ExpertSlab

ALIGN = 256


class HandleError(RuntimeError):
    """A published slab segment that cannot be mapped here (gone, wrong size, wrong layout, refused handle)."""


def layout_of(template: ExpertSlab, num_layers: int) -> list[dict]:
    """Where each (layer, array) of an owner's slabs sits in its segment: byte offset, shape, dtype (every MoE
    layer's slab has the template's shapes)."""
    entries, offset = [], 0
    for layer in range(num_layers):
        for index, a in enumerate(template.arrays()):
            entries.append(dict(layer=layer, index=index, offset=offset, shape=list(a.shape),
                                dtype=jnp.dtype(a.dtype).name))
            offset += -(-zero_copy.size_of(a.shape, a.dtype) // ALIGN) * ALIGN
    return entries


def segment_bytes(layout: list[dict]) -> int:
    last = layout[-1]
    return last["offset"] + zero_copy.size_of(last["shape"], last["dtype"])


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


class SlabShare:
    """The start-up protocol (module docstring); subclasses own the memory (`_create`, `_attach`, `close`).

    `slabs[owner]`: per MoE layer, the owner's slab as JAX arrays over its segment, for the owners this process
    holds (on the owner's device) and those its ranks pull from (on this process's first device). `segments[owner]`:
    the (address, bytes) of the owner's segment in this process."""

    def __init__(self, placement, local_slabs, devices, exchange=None, tag: str | None = None):
        """local_slabs[owner]: a sequence of that owner's slabs per MoE layer, read once each in layer order (they
        may be produced on demand), or None for an owner in another process; devices[rank]: None for a rank in
        another process. `tag` names this group's segments (every process of the group passes the same one)."""
        if len(local_slabs) != placement.num_ranks or len(devices) != placement.num_ranks:
            raise ValueError(f"local_slabs and devices need one entry per rank ({placement.num_ranks}), got "
                             f"{len(local_slabs)} and {len(devices)}")
        self.placement, self.devices = placement, devices
        self.exchange = LocalExchange() if exchange is None else exchange
        self.tag = tag or f"dwdp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.local_ranks = [r for r, d in enumerate(devices) if d is not None]
        self.slabs: dict[int, list[ExpertSlab]] = {}
        self.segments: dict[int, tuple[int, int]] = {}
        self._owned: dict[int, object] = {}
        self._expected = None
        for owner, slabs in enumerate(local_slabs):
            if slabs is None:
                continue
            layers = iter(slabs)
            template = next(layers)  # layer 0 lays out the segment and is written first: each layer is read once
            self._template, self._expected = template, layout_of(template, len(slabs))
            descriptor, arrays = self._create(owner, self._expected, itertools.chain([template], layers),
                                              devices[owner])
            self.slabs[owner] = self._as_slabs(arrays, template.start)
            self.exchange.set(f"{self.tag}/slabs/{owner}", json.dumps(descriptor))
        error = None
        owners = sorted({p.owner for r in self.local_ranks for p in placement.pulls(r)} - set(self.slabs))
        device = devices[self.local_ranks[0]]
        try:
            for owner in owners:
                descriptor = json.loads(self.exchange.get(f"{self.tag}/slabs/{owner}", owner))
                self._check_layout(owner, descriptor["layout"])
                arrays = self._attach(owner, descriptor, device)
                self.slabs[owner] = self._as_slabs(arrays, placement.local_range(owner)[0])
        except HandleError as e:
            error = str(e)
        atexit.register(self.close)  # before the check: a failed start-up frees its segments too
        self.exchange.all_ok("mapping the peers' expert slabs", error)
        self._all_mapped()

    def _as_slabs(self, arrays: list[jax.Array], start: int) -> list[ExpertSlab]:
        per_layer = len(self._template.arrays())
        return [self._template.with_arrays(arrays[i:i + per_layer], start=start)
                for i in range(0, len(arrays), per_layer)]

    def _check_layout(self, owner: int, layout: list[dict]) -> None:
        for mine, theirs in zip(self._expected, layout):
            for field in ("shape", "dtype", "offset"):
                if mine[field] != theirs[field]:
                    raise HandleError(f"owner {owner}'s slab of MoE layer {theirs['layer']} array {theirs['index']} "
                                      f"has {field} {theirs[field]}, this process expects {mine[field]}")
        if len(layout) != len(self._expected):
            raise HandleError(f"owner {owner} published {len(layout)} slab arrays, this process expects "
                              f"{len(self._expected)}")

    def local_slabs(self) -> list[list[ExpertSlab] | None]:
        """Per rank: its slabs in this process (held or mapped), else None; the transports' `local_slabs`."""
        return [self.slabs.get(r) for r in range(self.placement.num_ranks)]

    def holds(self, owner: int, a: jax.Array) -> bool:
        """Whether array `a` lies in `owner`'s segment (the check that the weights are held once)."""
        start, size = self.segments[owner]
        return start <= a.unsafe_buffer_pointer() < start + size

    # -- the memory ---------------------------------------------------------------------------------------------

    def _create(self, owner: int, layout: list[dict], slabs, device) -> tuple[dict, list[jax.Array]]:
        """A segment for `owner` with `slabs` written into it: (its descriptor, the arrays over it in layout
        order, on `device`)."""
        raise NotImplementedError

    def _attach(self, owner: int, descriptor: dict, device) -> list[jax.Array]:
        """The arrays of a peer's segment (layout order) mapped into this process, on `device`."""
        raise NotImplementedError

    def _all_mapped(self) -> None:
        """Every process has mapped the segments it reads (they passed the start-up check)."""

    def close(self) -> None:
        """Frees this process's own segments (peers' mappings go with the arrays over them)."""


class SharedMemoryShare(SlabShare):
    """POSIX shared memory (CPU devices): one /dev/shm file per owner, written once, mapped read-only by peers."""

    root = "/dev/shm"

    def _create(self, owner, layout, slabs, device):
        path = os.path.join(self.root, f"{self.tag}_r{owner}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            size = segment_bytes(layout)
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._owned[owner] = path
        per_layer = len(self._template.arrays())
        for i, slab in enumerate(slabs):
            for entry, a in zip(layout[i * per_layer:(i + 1) * per_layer], slab.arrays()):
                np.ndarray(entry["shape"], jnp.dtype(entry["dtype"]), region, entry["offset"])[...] = np.asarray(a)
        return dict(kind="posix_shm", path=path, bytes=size, layout=layout), self._arrays(owner, region, layout, device)

    def _attach(self, owner, descriptor, device):
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
        return self._arrays(owner, region, descriptor["layout"], device)

    def _arrays(self, owner, region, layout, device):
        base = np.frombuffer(region, np.uint8).ctypes.data  # mmap regions are page aligned
        self.segments[owner] = (base, len(region))
        return [zero_copy.array_at(base + e["offset"], e["shape"], e["dtype"], device, region) for e in layout]

    def _all_mapped(self):
        # Every mapping outlives the segment's name: with the names gone, no exit, however abrupt, leaves a
        # segment behind in /dev/shm.
        self.close()

    def close(self):
        for path in self._owned.values():
            try:
                os.unlink(path)  # the mappings stay valid until the last array over them is gone
            except FileNotFoundError:
                pass
        self._owned.clear()


class SliceTransport(Transport):
    """Pulls that slice the remote rows out of a share's arrays onto the rank's device, in fresh buffers (XLA's
    copy, on the puller's stream)."""

    live_slots = 3

    def __init__(self, placement, share: SlabShare, devices, options=TransportOptions()):
        super().__init__(placement, share.local_slabs(), devices, options)
        self.share = share
        self.bytes_pulled = [0] * placement.num_ranks

    def _pieces(self, rank: int):
        for owner, offset, count, i in self.pull_order(rank):
            a, b = slice_bounds(count, self.options.slices)[i]
            start = next(p.global_start for p in self.placement.pulls(rank)
                         if (p.owner, p.src_offset) == (owner, offset))
            yield owner, offset + a, offset + b, start + a

    def _slot_layout(self, rank: int) -> tuple[ExpertSlab, ...]:
        slabs = []
        for owner, lo, hi, start in self._pieces(rank):
            source = self.local_slabs[owner][0]
            arrays = [jax.ShapeDtypeStruct((hi - lo,) + a.shape[1:], a.dtype) for a in source.arrays()]
            slabs.append(source.with_arrays(arrays, start=start))
        return tuple(sorted(slabs, key=lambda s: s.start))

    def _copy(self, rank: int, layer: int, slot: int) -> tuple[ExpertSlab, ...]:
        device = self.devices[rank]
        slabs = []
        for owner, lo, hi, start in self._pieces(rank):
            source = self.local_slabs[owner][layer]
            arrays = [jax.device_put(_rows(a, lo, hi), device) for a in source.arrays()]
            self.bytes_pulled[rank] += sum(a.nbytes for a in arrays)
            slabs.append(source.with_arrays(arrays, start=start))
        return tuple(sorted(slabs, key=lambda s: s.start))

    def _wait(self, rank, slot, slabs):
        return slabs  # the reading program waits on the copies' definition events


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rows(a, lo, hi):
    return a[lo:hi]
