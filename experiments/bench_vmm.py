"""CUDA VMM between two processes on one GPU: an owner allocates and exports, a peer imports, maps, sees the
memory as a JAX array zero copy, and pulls it into a NaN-poisoned buffer, by the copy engine (cudaMemcpyAsync
over the mapping) and by XLA (a slice of the zero-copy view). Checks the bytes, prints and writes GB/s. Both
processes on one GPU: the copy is HBM to HBM on that GPU, not NVLink.

    python -m experiments.bench_vmm --mib=1024 --out=vmm.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How long each process waits for the other's step (the handoff, the peer's done): starting JAX and CUDA in a
# process took minutes beside a test suite compiling kernels on every core.
WAIT_S = 240


def owner(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dwdp_jax.transport import vmm

    n = args.mib * (1 << 20) // 4
    alloc = vmm.Allocation.create(n * 4, 0)
    view = alloc.array(0, (n,), np.float32, jax.devices()[0])
    assert view.unsafe_buffer_pointer() == alloc.ptr, "DLPack import copied"
    pattern = jnp.arange(n, dtype=jnp.float32) % 65521.0
    import cupy

    pattern.block_until_ready()
    cupy.cuda.runtime.memcpy(alloc.ptr, pattern.unsafe_buffer_pointer(), n * 4, cupy.cuda.runtime.memcpyDeviceToDevice)
    cupy.cuda.runtime.deviceSynchronize()
    server = vmm.FdServer()
    server.fds["slab"] = alloc.export_fd()
    try:
        vmm.Allocation.create(1 << 21, 0, "fabric")
        fabric = "created"
    except vmm.VmmError as e:
        fabric = f"refused: {e}"
    with open(args.handoff + ".tmp", "w") as f:
        json.dump(dict(socket=server.path, bytes=alloc.size, fabric=fabric), f)
    os.rename(args.handoff + ".tmp", args.handoff)
    deadline = time.time() + WAIT_S
    while not os.path.exists(args.handoff + ".done") and time.time() < deadline:
        time.sleep(0.05)


def peer(args) -> dict:
    import cupy
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dwdp_jax.transport import vmm

    deadline = time.time() + WAIT_S
    while not os.path.exists(args.handoff) and time.time() < deadline:
        time.sleep(0.05)
    handoff = json.load(open(args.handoff))
    n = args.mib * (1 << 20) // 4
    alloc = vmm.Allocation.import_fd(vmm.fetch_fd(handoff["socket"], "slab"), handoff["bytes"], 0)
    view = alloc.array(0, (n,), np.float32, jax.devices()[0])
    zero_copy = view.unsafe_buffer_pointer() == alloc.ptr
    expected = jnp.arange(n, dtype=jnp.float32) % 65521.0
    rt = cupy.cuda.runtime
    stream = rt.streamCreateWithFlags(rt.streamNonBlocking)
    start, stop = rt.eventCreate(), rt.eventCreate()
    results = dict(mib=args.mib, zero_copy=zero_copy, fabric=handoff["fabric"])
    copy_s = []
    for i in range(args.repeats + 1):
        slot = jnp.full((n,), jnp.nan, jnp.float32).block_until_ready()  # poisoned destination
        rt.eventRecord(start, stream)
        rt.memcpyAsync(slot.unsafe_buffer_pointer(), alloc.ptr, n * 4, rt.memcpyDefault, stream)
        rt.eventRecord(stop, stream)
        rt.eventSynchronize(stop)
        if i:
            copy_s.append(rt.eventElapsedTime(start, stop) / 1e3)
        results["copy_engine_bytes_match"] = bool(jnp.array_equal(slot, expected))
    pulled = jax.jit(lambda a: a[: n // 2 * 2])
    xla_s = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        out = pulled(view).block_until_ready()
        if i:
            xla_s.append(time.perf_counter() - t)
    results["xla_bytes_match"] = bool(jnp.array_equal(out, expected))
    results["copy_engine_gbps"] = n * 4 / float(np.median(copy_s)) / 1e9
    results["xla_pull_gbps"] = n * 4 / float(np.median(xla_s)) / 1e9
    results["device"] = str(jax.devices()[0].device_kind)
    open(args.handoff + ".done", "w").close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--role", default="", choices=["", "owner", "peer"])
    ap.add_argument("--handoff", default="")
    args = ap.parse_args()
    if args.role == "owner":
        owner(args)
        return 0
    if args.role == "peer":
        print(json.dumps(peer(args)))
        return 0
    handoff = os.path.join(tempfile.mkdtemp(prefix="dwdp_vmm_bench_"), "handoff.json")
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3"),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "experiments.bench_vmm", f"--mib={args.mib}", f"--repeats={args.repeats}",
            f"--handoff={handoff}"]
    own = subprocess.Popen(base + ["--role=owner"], env=env, cwd=ROOT)
    out = subprocess.run(base + ["--role=peer"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=2 * WAIT_S)
    if out.returncode:  # the owner would wait out WAIT_S for a done that never comes
        own.kill()
    own.wait(60)
    if out.returncode or own.returncode:
        print(f"peer exit {out.returncode}, owner exit {own.returncode}", out.stdout, out.stderr, file=sys.stderr)
        return 1
    results = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    ok = results["zero_copy"] and results["copy_engine_bytes_match"] and results["xla_bytes_match"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
