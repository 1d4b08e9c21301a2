"""The copy engine's per-source pull spans (GPU with `timeline`) against a stand-in CUDA runtime whose clock advances
with the bytes copied, and the measured contention levels they feed (sim.contention.measured_levels)."""

import contextlib
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.sim.contention import contention_pmf, measured_levels
from dwdp_jax.transport.copy_engine import Copy, CudaCopier, PullBatch

MS_PER_BYTE = 1e-3  # the stand-in copies 1 KB per ms


class FakeRuntime:
    """Stream-ordered enough for one side stream: records stamp the clock, peer copies advance it."""
    streamNonBlocking, eventDisableTiming, memcpyDefault = 1, 2, 4

    def __init__(self):
        self.clock_ms, self.stamps, self.ids = 0.0, {}, itertools.count(1)

    def streamCreateWithFlags(self, flags):
        return next(self.ids)

    def eventCreateWithFlags(self, flags):
        return next(self.ids)

    def eventCreate(self):
        return next(self.ids)

    def eventRecord(self, event, stream):
        self.stamps[event] = self.clock_ms

    def memcpyAsync(self, dst, src, nbytes, kind, stream):
        assert kind == self.memcpyDefault  # unified addressing: the runtime finds both devices
        self.clock_ms += nbytes * MS_PER_BYTE

    def eventElapsedTime(self, start, end):
        return self.stamps[end] - self.stamps[start]

    def streamWaitEvent(self, *args):
        pass

    def eventSynchronize(self, event):
        pass

    def eventDestroy(self, event):
        pass

    def streamDestroy(self, stream):
        pass


def fake_cupy():
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=FakeRuntime(),
                                                            Device=lambda ordinal: contextlib.nullcontext()))


def batch(layer, sources, slice_bytes, rows=4):
    """One pull into rank 0: `rows` rows of 64 fp32 (256 B each) from each source."""
    dst = jnp.zeros((rows * len(sources), 64), jnp.float32)
    copies = tuple(Copy(jnp.ones((rows, 64), jnp.float32), s, 0, dst, i * rows, rows) for i, s in enumerate(sources))
    return PullBatch.plan(layer, layer % 2, copies, (dst,), slice_bytes)


@pytest.mark.parametrize("slice_bytes", [0, 512])
def test_source_spans_follow_the_side_stream(slice_bytes):
    cp = fake_cupy()
    copier = CudaCopier(jax.devices()[:4], timeline=True, cupy=cp)
    ctx = types.SimpleNamespace(stream=0)
    copier.issue(0, ctx, [batch(0, (1, 2, 3), slice_bytes)], poison=False)
    assert [label for label, *_ in copier.timeline(0)] == ["issue", "copy_start", "copy_end"]  # no source marks
    copier.reset(0)  # the next step reads the last one's spans before reusing the events
    copier.issue(0, ctx, [batch(1, (2, 3), slice_bytes)], poison=False)
    spans = copier.source_intervals(0)
    assert copier.source_intervals(0) == spans  # read once per step
    per_source_ms = 4 * 256 * MS_PER_BYTE
    assert [(s, layer) for s, layer, _, _ in spans] == [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1)]
    if slice_bytes:  # 512 B pieces round-robin: every source of a layer spans nearly the whole pull
        for s, layer, start, end in spans:
            assert (end - start) * 1e3 == pytest.approx(per_source_ms * (len((1, 2, 3)) if layer == 0 else 2)
                                                        - per_source_ms / 2 * (2 if layer == 0 else 1))
    else:  # whole copies: the sources follow each other, each as long as its bytes
        for (_, _, start, end), (_, _, nxt, _) in zip(spans, spans[1:]):
            assert (end - start) * 1e3 == pytest.approx(per_source_ms) and nxt >= end - 1e-12
    copier.clear_intervals(0)
    assert copier.source_intervals(0) == []


def test_measured_levels_by_hand():
    spans = [(1, 0, 0.0, 2.0), (2, 0, 1.0, 3.0), (3, 0, 1.0, 2.0), (0, 1, 0.0, 1.0), (2, 1, 1.0, 2.0)]
    # source 0: alone 1 s, three at once 1 s (3 pull-seconds), alone 1 s; source 1: two touching spans, alone 2 s
    assert measured_levels(spans) == pytest.approx({1: 4 / 7, 3: 3 / 7})
    assert measured_levels([]) == {}
    with pytest.raises(ValueError, match="bad pull span 1 <- 1"):
        measured_levels([(1, 1, 0.0, 1.0)])


def test_measured_levels_recover_the_paper_model_from_independent_pulls():
    """Eight ranks pulling back-to-back unit spans from uniformly random peers with random phases: the model's
    premise, so the measured levels equal Table 2's distribution (DWDP8) within a point."""
    rng = np.random.default_rng(0)
    n, pulls = 8, 4000
    spans = []
    for dst in range(n):
        phase = rng.random()
        for i in range(pulls):
            src = rng.choice([r for r in range(n) if r != dst])
            spans.append((dst, int(src), phase + i, phase + i + 1))
    measured = measured_levels(spans)
    for c, p in enumerate(contention_pmf(n), start=1):
        assert measured.get(c, 0.0) == pytest.approx(p, abs=0.01)


def test_bench_reports_measured_contention_beside_the_model():
    from dwdp_jax import profiling

    spans = [(1, 0, 0, 5.0, 7.0), (2, 0, 0, 6.0, 8.0), (0, 1, 1, 5.0, 6.0)]
    engine = types.SimpleNamespace(num_ranks=4, transport=types.SimpleNamespace(source_intervals=lambda: spans))
    out = profiling.pull_contention(engine)
    assert out["measured"] == pytest.approx({1: 3 / 5, 2: 2 / 5})
    assert out["model"] == pytest.approx({1: 4 / 9, 2: 4 / 9, 3: 1 / 9})
    assert out["spans"][0] == (1, 0, 0, 0.0, 2.0)  # relative to the first pull
