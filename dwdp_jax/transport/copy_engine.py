"""The copy-engine transport: persistent slots, pulls issued from inside the rank's own programs.

Each rank owns two persistent slots, one buffer per contiguous remote expert range (the experts below its slab and
those above it), so the MoE sees at most three slabs. A pull is a list of row-range copies from the owners' local
slabs (read in place through their raw device pointers: no export copies, no work on the owner) into a slot.

Ordering comes from two fences that XLA runs inside the rank's programs (`jax.experimental.buffer_callback`, which
hands a Python callback XLA's stream, on the program's own launch order):
  wait  (in the MoE program, before the grouped GEMM reads its slot): XLA's stream waits for the slot's last copy
        (read-after-write); the view's arrays pass an optimization barrier with the fence's token, so nothing
        reads them earlier.
  issue (after the MoE output, and at the start of the dense front to prime two layers): the pulls sealed for this
        program start on the rank's side stream once XLA's stream has reached this point, i.e. after every read of
        the slot they overwrite (write-after-read), and overlap the next layer's attention and MoE.
The host requests pulls (`pull`) and seals them before launching the program that issues them (`seal`); the
callbacks pop the sealed batches and read slots in program order, so host run-ahead cannot reorder them.

Copiers do the bytes: `CudaCopier` (GPU) with cudaMemcpyAsync over unified addresses (not cudaMemcpyPeerAsync: see
`CudaCopier.issue`) on a non-blocking side stream per rank, events
created once and reused (two done events, one fence event per rank; timing events only with `timeline`), never
captured into CUDA graphs; `HostCopier` (CPU devices) copies synchronously inside the callback, which exercises the
same schedule, in-place slots and poisoning in tests.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from dwdp_jax.transport.base import Transport, TransportOptions, slice_bounds
from models.experts import ExpertSlab



@dataclasses.dataclass(frozen=True)
class Copy:
    """rows [src_row, src_row + rows) of `src` into rows [dst_row, ...) of `dst` (same row shape and dtype)."""

    src: jax.Array
    src_rank: int
    src_row: int
    dst: jax.Array
    dst_row: int
    rows: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.src.shape[1:])) * self.src.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclasses.dataclass(frozen=True)
class PullBatch:
    """The copies of one layer into one slot, planned once (`plan`): `pieces` in issue order (`chunks`),
    `addresses` each piece's (destination, source) device byte addresses, `spans` each source's first and last
    piece (the timeline's per-source marks), `targets` the slot's buffers (poisoned first when asked).

    The addresses are read here, while no program runs, so the issuing callback (inside the launch of the rank's
    program) only walks integers; `unsafe_buffer_pointer` there was suspected of a per-step stall, whose
    cause turned out to be the copy call (`CudaCopier.issue`)."""

    layer: int
    slot: int
    copies: tuple[Copy, ...]
    targets: tuple[jax.Array, ...]
    pieces: tuple[tuple[Copy, int, int], ...]
    addresses: tuple[tuple[int, int], ...]
    spans: dict[int, tuple[int, int]]

    @classmethod
    def plan(cls, layer: int, slot: int, copies, targets, slice_bytes: int) -> "PullBatch":
        pieces = tuple(chunks(tuple(copies), slice_bytes))
        bases = {id(a): a.unsafe_buffer_pointer() for c in copies for a in (c.dst, c.src)}
        addresses = tuple((bases[id(c.dst)] + c.dst_row * c.row_bytes + off,
                           bases[id(c.src)] + c.src_row * c.row_bytes + off) for c, off, _ in pieces)
        spans: dict[int, tuple[int, int]] = {}
        for i, (c, _, _) in enumerate(pieces):
            spans[c.src_rank] = (spans.get(c.src_rank, (i, i))[0], i)
        return cls(layer, slot, tuple(copies), tuple(targets), pieces, addresses, spans)


def chunks(copies: tuple[Copy, ...], slice_bytes: int) -> list[tuple[Copy, int, int]]:
    """(copy, byte offset, bytes) pieces in issue order: whole copies, or (slice_bytes > 0) pieces of at most
    slice_bytes issued round-robin over the source ranks, so every source's copy engine serves the pull at once
    (the paper's contention mitigation)."""
    if slice_bytes <= 0:
        return [(c, 0, c.nbytes) for c in copies]
    by_source: dict[int, list[tuple[Copy, int, int]]] = {}
    for c in copies:
        by_source.setdefault(c.src_rank, []).extend(
            (c, off, min(slice_bytes, c.nbytes - off)) for off in range(0, c.nbytes, slice_bytes))
    queues = list(by_source.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def remote_ranges(placement, rank: int) -> tuple[tuple[int, int], ...]:
    """The rank's remote experts as contiguous global ranges [start, stop): below and above its local slab."""
    start, stop = placement.local_range(rank)
    return tuple(r for r in ((0, start), (stop, placement.num_experts)) if r[1] > r[0])


class HostCopier:
    """CPU devices: the copy runs synchronously in the issuing callback, into the slot buffers in place (host
    memory: the planned device addresses are host addresses). `moved[rank]`: bytes copied to the rank so far."""

    def __init__(self, num_ranks: int):
        self.moved = [0] * num_ranks

    @staticmethod
    def _writable(a: jax.Array) -> np.ndarray:
        # The slot is a persistent array that only this transport writes, as the GPU copier does through its pointer.
        raw = (ctypes.c_char * a.nbytes).from_address(a.unsafe_buffer_pointer())
        return np.frombuffer(raw, dtype=a.dtype).reshape(a.shape)

    def issue(self, rank, ctx, batches, poison):
        del ctx
        for b in batches:
            if poison:
                for t in b.targets:
                    self._writable(t)[...] = np.nan
            for (_, _, n), (dst, src) in zip(b.pieces, b.addresses):  # the addresses the GPU copier uses
                ctypes.memmove(dst, src, n)
                self.moved[rank] += n

    def wait(self, rank, ctx, slot):
        del rank, ctx, slot

    def reset(self, rank):
        del rank

    def timeline(self, rank):
        raise NotImplementedError("HostCopier records no device timeline (the copy is synchronous)")

    source_intervals = clear_intervals = timeline


class CudaCopier:
    """GPU: peer copies on one non-blocking side stream per destination rank, fenced by CUDA events; ranks whose
    device is None run in another process. `moved[rank]`: bytes issued to the rank so far."""

    def __init__(self, devices, timeline: bool = False, cupy=None):
        if cupy is None:  # tests pass a stand-in runtime
            import cupy

        self.cp = cupy
        self.rt = cupy.cuda.runtime
        self.ordinals = [None if d is None else d.local_hardware_id for d in devices]
        self.moved = [0] * len(devices)
        self.record_timeline = timeline
        self.side, self.fence, self.done, self.events, self.marks = [], [], [], [], []
        self.anchor, self.intervals, self.harvested = [], [], []
        no_timing = self.rt.eventDisableTiming
        for ordinal in self.ordinals:
            if ordinal is None:
                for pool in (self.side, self.fence, self.done, self.anchor, self.events, self.marks, self.intervals,
                             self.harvested):
                    pool.append(None)
                continue
            with cupy.cuda.Device(ordinal):
                self.side.append(self.rt.streamCreateWithFlags(self.rt.streamNonBlocking))
                self.fence.append(self.rt.eventCreateWithFlags(no_timing))
                self.done.append([self.rt.eventCreateWithFlags(no_timing) for _ in range(2)])
                self.anchor.append(self.rt.eventCreate() if timeline else None)
            self.events.append([])  # timing-event pool, reused every step
            self.marks.append([])  # (label, layer, event index, source rank) recorded since the last `reset`
            self.intervals.append([])  # (source, layer, start_s, end_s) on the host clock, over all steps
            self.harvested.append(False)

    def __del__(self):
        try:
            for r, ordinal in enumerate(self.ordinals):
                if ordinal is None:
                    continue
                with self.cp.cuda.Device(ordinal):
                    for ev in [self.fence[r], *self.done[r], *self.events[r]] + (
                            [self.anchor[r]] if self.anchor[r] is not None else []):
                        self.rt.eventDestroy(ev)
                    self.rt.streamDestroy(self.side[r])
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass

    def _mark(self, rank: int, label: str, layer: int, stream: int, source: int = -1) -> None:
        if not self.record_timeline:
            return
        pool, marks = self.events[rank], self.marks[rank]
        if len(marks) == len(pool):
            pool.append(self.rt.eventCreate())
        self.rt.eventRecord(pool[len(marks)], stream)
        marks.append((label, layer, len(marks), source))

    def issue(self, rank, ctx, batches, poison):
        if not batches:
            return
        rt, side, stream = self.rt, self.side[rank], ctx.stream
        with self.cp.cuda.Device(self.ordinals[rank]):
            # Write-after-read: the side stream starts where XLA's stream is now, after the slot's last reader.
            self._mark(rank, "issue", -1, stream)
            rt.eventRecord(self.fence[rank], stream)
            rt.streamWaitEvent(side, self.fence[rank], 0)
            for b in batches:
                self._mark(rank, "copy_start", b.layer, side)
                if poison:
                    for t in b.targets:
                        rt.memsetAsync(t.unsafe_buffer_pointer(), 0xFF, t.nbytes, side)  # all-ones bits: NaN
                for i, ((c, _, n), (dst, src)) in enumerate(zip(b.pieces, b.addresses)):
                    first, last = b.spans[c.src_rank]
                    if i == first:
                        self._mark(rank, "source_start", b.layer, side, c.src_rank)
                    # A plain async copy over unified addresses (XLA enables peer access). With
                    # cudaMemcpyPeerAsync, every step's first pulls took 400-700 ms on the device against 30-40 ms
                    # with this, same host issue times (R1 width, depth 8, 4x H200): iterations 1.12 s
                    # against 0.74 s. Presumably the peer call orders against the owner's work; not measured why.
                    rt.memcpyAsync(dst, src, n, rt.memcpyDefault, side)
                    self.moved[rank] += n
                    if i == last:
                        self._mark(rank, "source_end", b.layer, side, c.src_rank)
                self._mark(rank, "copy_end", b.layer, side)
                rt.eventRecord(self.done[rank][b.slot], side)

    def wait(self, rank, ctx, slot):
        stream = ctx.stream
        with self.cp.cuda.Device(self.ordinals[rank]):
            self._mark(rank, "wait_arrive", -1, stream)
            self.rt.streamWaitEvent(stream, self.done[rank][slot], 0)  # read-after-write
            self._mark(rank, "wait_resume", -1, stream)

    def reset(self, rank: int) -> None:
        """A new step: the last one's device work is complete, so its source spans are read before the timing
        events are reused."""
        self._harvest(rank)
        self.marks[rank].clear()
        self.harvested[rank] = False

    def timeline(self, rank: int) -> list[tuple[str, int, float]]:
        """(label, layer, ms since the first mark) of the marks recorded since `reset`; call after a sync.
        Per-source spans are in `source_intervals`."""
        marks, pool = self.marks[rank], self.events[rank]
        if not marks:
            return []
        base = pool[marks[0][2]]
        return [(label, layer, float(self.rt.eventElapsedTime(base, pool[i]))) for label, layer, i, _ in marks
                if not label.startswith("source_")]

    def source_intervals(self, rank: int) -> list[tuple[int, int, float, float]]:
        """(source rank, layer, start s, end s) of every source's span in this rank's pulls since `clear_intervals`,
        on the host's perf_counter clock (comparable across ranks); call after a sync."""
        self._harvest(rank)
        return list(self.intervals[rank])

    def clear_intervals(self, rank: int) -> None:
        self._harvest(rank)
        self.intervals[rank].clear()

    def _harvest(self, rank: int) -> None:
        """Moves the current step's source spans to `intervals`, once. The device clock is tied to the host's by an
        event recorded now on the idle side stream: host time of the first mark = now - its elapsed time to it."""
        marks, pool, rt = self.marks[rank], self.events[rank], self.rt
        if self.harvested[rank] or not any(m[0] == "source_start" for m in marks):
            return
        with self.cp.cuda.Device(self.ordinals[rank]):
            rt.eventRecord(self.anchor[rank], self.side[rank])
            rt.eventSynchronize(self.anchor[rank])
            now_s = time.perf_counter()
            base = pool[marks[0][2]]
            base_s = now_s - rt.eventElapsedTime(base, self.anchor[rank]) / 1e3
            starts = {}
            for label, layer, i, source in marks:
                at_s = base_s + rt.eventElapsedTime(base, pool[i]) / 1e3
                if label == "source_start":
                    starts[(layer, source)] = at_s
                elif label == "source_end":
                    self.intervals[rank].append((source, layer, starts.pop((layer, source)), at_s))
        self.harvested[rank] = True


class ProgramHook:
    """The fences one rank's programs take (static arguments of the jitted stages: one compile per rank)."""

    def __init__(self, transport: "CopyEngineTransport", rank: int):
        # Weak: jit caches keep their static arguments alive, and the transport owns the slot buffers.
        self._transport, self.rank = weakref.ref(transport), rank
        token = jax.ShapeDtypeStruct((1,), jnp.int32)
        self._issue_call = buffer_callback(self._issue_cb, token, has_side_effect=True)
        self._wait_call = buffer_callback(self._wait_cb, token, has_side_effect=True)

    @property
    def transport(self) -> "CopyEngineTransport":
        transport = self._transport()
        if transport is None:
            raise RuntimeError("a program of a deleted DWDP engine ran: its copy-engine transport is gone")
        return transport

    def _issue_cb(self, ctx, out, *args):
        del out, args
        self.transport._issue(self.rank, ctx)

    def _wait_cb(self, ctx, out, *args):
        del out, args
        self.transport._fence_wait(self.rank, ctx)

    def issue_after(self, tree):
        """Issue the sealed pulls once `tree` is computed; returns `tree` (ordered after the issue)."""
        token = self._issue_call(jax.tree.leaves(tree)[0])
        return jax.lax.optimization_barrier((tree, token))[0]

    def wait_before(self, view, x):
        """`view` usable only after XLA's stream waited for its slot's copies; the wait comes after `x`."""
        token = self._wait_call(x)
        return jax.lax.optimization_barrier((view, token))[0]


class CopyEngineTransport(Transport):
    live_slots = 2
    issues_in_program = True
    slices_by_bytes = True

    def __init__(self, placement, local_slabs, devices, options=TransportOptions()):
        super().__init__(placement, local_slabs, devices, options)
        on_gpu = next(d for d in devices if d is not None).platform == "gpu"
        if self.options.timeline and not on_gpu:
            raise ValueError("TransportOptions.timeline needs GPU devices (the copy-engine timeline uses CUDA events)")
        self.copier = CudaCopier(devices, self.options.timeline) if on_gpu else HostCopier(len(devices))
        held = [slabs for slabs in local_slabs if slabs is not None]
        example, num_layers = held[0][0], len(held[0])
        self.buffers = []  # buffers[rank][slot]: one ExpertSlab per remote range, allocated once (None: elsewhere)
        for rank, device in enumerate(devices):
            if device is None:
                self.buffers.append(None)
                continue
            per_slot = []
            for _ in range(2):
                per_slot.append(tuple(
                    example.with_arrays([jax.device_put(jnp.zeros((stop - start,) + a.shape[1:], a.dtype), device)
                                         for a in example.arrays()], start=start)
                    for start, stop in remote_ranges(placement, rank)))
            self.buffers.append(per_slot)
        self._requested = [[] for _ in devices]  # pulls requested since the last seal
        self._sealed = [collections.deque() for _ in devices]  # one batch list per program that issues
        self._reads = [collections.deque() for _ in devices]  # the slot each reading program waits for
        self._hooks = [ProgramHook(self, r) for r in range(len(devices))]
        # (rank, layer, slot) -> its PullBatch, planned here while no program runs: sources and slots are
        # persistent, so the issuing callback (on XLA's stream thread) only walks the pieces and their addresses
        self._plans = {(rank, layer, slot): self._plan(rank, layer, slot) for rank, d in enumerate(devices)
                       if d is not None for layer in range(num_layers) for slot in range(2)}

    @property
    def bytes_pulled(self) -> list[int]:
        """Per rank, the bytes its pulls have copied (GPU: issued) so far."""
        return list(self.copier.moved)

    def hook(self, rank: int) -> ProgramHook:
        return self._hooks[rank]

    def _slot_layout(self, rank: int) -> tuple[ExpertSlab, ...]:
        return self.buffers[rank][0]

    def seal(self, rank: int) -> None:
        self._sealed[rank].append(tuple(self._requested[rank]))
        self._requested[rank] = []

    def begin_step(self, rank: int) -> None:
        self.copier.reset(rank)

    def timeline(self, rank: int):
        """The device timeline of the rank's last step (GPU with `timeline`): (label, layer, ms) marks."""
        return self.copier.timeline(rank)

    def source_intervals(self) -> list[tuple[int, int, int, float, float]]:
        """(destination, source, layer, start s, end s): every rank's pull spans per source since
        `clear_source_intervals`, host clock (GPU with `timeline`); the input of the measured contention."""
        return [(r, *iv) for r, d in enumerate(self.devices) if d is not None for iv in self.copier.source_intervals(r)]

    def clear_source_intervals(self) -> None:
        for r, d in enumerate(self.devices):
            if d is not None:
                self.copier.clear_intervals(r)

    def _copy(self, rank: int, layer: int, slot: int) -> tuple[ExpertSlab, ...]:
        self._requested[rank].append(self._plans[(rank, layer, slot)])
        return self.buffers[rank][slot]

    def _plan(self, rank: int, layer: int, slot: int) -> PullBatch:
        buffers = self.buffers[rank][slot]
        copies = []
        pulls = {(p.owner, p.src_offset): p for p in self.placement.pulls(rank)}
        for owner, offset, count, i in self.pull_order(rank):
            a, b = slice_bounds(count, self.options.slices)[i]
            pull = pulls[(owner, offset)]
            dst = next(s for s in buffers if s.start <= pull.global_start < s.start + s.count)
            for src_array, dst_array in zip(self.local_slabs[owner][layer].arrays(), dst.arrays(), strict=True):
                copies.append(Copy(src_array, owner, offset + a, dst_array, pull.global_start - dst.start + a, b - a))
        targets = tuple(a for s in buffers for a in s.arrays())
        return PullBatch.plan(layer, slot, copies, targets, self.options.slice_bytes)

    def _wait(self, rank: int, slot: int, slabs: tuple[ExpertSlab, ...]) -> tuple[ExpertSlab, ...]:
        self._reads[rank].append(slot)  # the reading program's wait fence pops it
        return slabs

    def _fence_wait(self, rank: int, ctx) -> None:
        self.copier.wait(rank, ctx, self._reads[rank].popleft())

    def _issue(self, rank: int, ctx) -> None:
        self.copier.issue(rank, ctx, self._sealed[rank].popleft(), self.options.poison)

    def _poison(self, rank: int, slot: int) -> None:
        """Poisoning is stream-ordered here: the issue fence fills a slot with NaN right before copying into it."""
