"""Zero-copy JAX arrays over project-allocated memory, and a DWDP group whose slabs live in a shared segment, in
one process on CPU devices: the owner's programs read the segment itself, and the copy-engine transport pulls
from it into poisoned slots, equal to the reference."""

import gc
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwdp_jax.placement import Placement
from dwdp_jax.runtime.dwdp import DwdpOptions
from dwdp_jax.runtime.reference import prefill
from dwdp_jax.distributed.engine import ProcessDwdpEngine
from dwdp_jax.packing import pack
from dwdp_jax.transport import zero_copy
from models import config as C
from models import deepseek_v3 as M
from models.deepseek_v3 import Params


def _aligned(buf: np.ndarray, align: int = 256) -> int:
    base = buf.ctypes.data
    return base + (-base) % align


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn, jnp.int32])
def test_array_at_adopts_the_bytes_in_place(dtype):
    buf = np.zeros(1 << 14, np.uint8)
    address = _aligned(buf)
    host = np.ndarray((4, 16), dtype, buf, address - buf.ctypes.data)
    host[...] = np.arange(64).reshape(4, 16) % 16  # exact in every dtype here
    a = zero_copy.array_at(address, (4, 16), dtype, jax.devices()[1], buf)
    assert a.dtype == jnp.dtype(dtype) and a.devices() == {jax.devices()[1]}
    assert a.unsafe_buffer_pointer() == address
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.arange(64).reshape(4, 16) % 16)
    host[0, 0] = 7  # the same bytes, not a copy
    assert float(a[0, 0]) == 7


def test_the_memory_outlives_every_array_over_it():
    class Owner:
        freed = False

        def __del__(self):
            Owner.freed = True

    buf = np.zeros(4096, np.uint8)
    owner = Owner()
    owner.buf = buf
    a = zero_copy.array_at(_aligned(buf), (8,), jnp.float32, jax.devices()[0], owner)
    del owner
    gc.collect()
    assert not Owner.freed
    del a
    gc.collect()
    assert Owner.freed


def test_bad_zero_copy_requests_are_refused():
    buf = np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match="64-byte aligned"):
        zero_copy.array_at(_aligned(buf) + 8, (4,), jnp.float32, jax.devices()[0], buf)
    with pytest.raises(ValueError, match="dtypes .* got complex64"):
        zero_copy.array_at(_aligned(buf), (4,), jnp.complex64, jax.devices()[0], buf)


def test_a_group_on_shared_segments_reads_them_in_place_and_equals_the_reference():
    cfg = C.tiny(num_hidden_layers=3, first_k_dense_replace=1, dtype="float32")
    params = Params(*M.init_model(cfg, seed=5))
    placement = Placement.for_group(cfg.n_routed_experts, 2)
    engine = ProcessDwdpEngine(params, placement, {0: jax.devices()[0], 1: jax.devices()[1]},
                               DwdpOptions(transport="copy_engine", poison=True))
    for rank in (0, 1):
        for slab in engine.ranks[rank].local:
            assert all(engine.share.holds(rank, a) for a in slab.arrays())
    # once every process holds its mappings the segments' names are gone: a killed run leaves nothing in /dev/shm
    assert not glob.glob(f"/dev/shm/{engine.share.tag}*")
    batch = pack([list(range(3, 12)), list(range(20, 27))], budget=32)
    ref = prefill(params, batch)
    for rank in (0, 1):
        out = engine.step(rank, batch).output
        err = np.linalg.norm(out.logits_TV - ref.logits_TV) / np.linalg.norm(ref.logits_TV)
        assert err <= 1e-6, (rank, err)
        remote = sum(p.count for p in placement.pulls(rank))
        assert engine.transport.bytes_pulled[rank] == cfg.num_moe_layers * remote * 3 * cfg.hidden_size \
            * cfg.moe_intermediate_size * 4 > 0
    engine.share.close()
