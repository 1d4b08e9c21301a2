"""Spawning a run's processes on one machine: per group, one process per `devices_per_process` ranks, each its own
group's member of a multi-controller world; in serve mode a router in this process places the requests.

On several hosts the same worker command runs on each host by hand or by a cluster launcher (README: "Several
processes, several hosts"); this module is the one-machine convenience.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from dwdp_jax.distributed.router import Router
from dwdp_jax.distributed.spec import Spec
from dwdp_jax.distributed.worker import AUTHKEY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Process:
    group: int
    index: int
    popen: subprocess.Popen
    log: str

    @property
    def name(self) -> str:
        return f"group {self.group} process {self.index}"

    def outcome(self) -> dict:
        code = self.popen.returncode
        with open(self.log) as f:
            lines = [l.rstrip() for l in f if l.startswith(("[group", "process "))]
        said = [l for l in lines if "fault injected" not in l]
        return dict(group=self.group, process=self.index, pid=self.popen.pid, exit=code,
                    signal=signal.Signals(-code).name if code is not None and code < 0 else None,
                    said=said[-3:])


def spawn(spec: Spec, out_dir: str, router: str = "", skip: tuple[tuple[int, int], ...] = (),
          spec_of=None, platform: str = "cpu", tag: str | None = None) -> list[Process]:
    """Starts every process of the run (but those in `skip`: a launch test's missing process); `spec_of(group,
    process)` may give a process its own spec (a launch test's mismatch)."""
    tag = tag or f"dwdp_{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    gpus = gpu_count() if platform == "gpu" else 0
    procs = []
    for g in range(spec.num_groups):
        coordinator = f"127.0.0.1:{free_port()}"
        for p in range(spec.processes_per_group):
            if (g, p) in skip:
                continue
            fields = (spec_of(g, p) if spec_of else spec).fields
            log = os.path.join(out_dir, f"log_g{g}_p{p}.txt")
            first = (g * spec.processes_per_group + p) * spec.devices_per_process
            if platform == "gpu" and gpus >= spec.num_groups * spec.group_size:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(first, first + spec.devices_per_process)))
            cmd = [sys.executable, "-m", "dwdp_jax.distributed.worker", "--spec", json.dumps(fields), "--group",
                   str(g), "--process", str(p), "--coordinator", coordinator, "--router", router, "--tag", tag,
                   "--out", out_dir]
            with open(log, "w") as f:
                procs.append(Process(g, p, subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                            cwd=ROOT), log))
    return procs


def gpu_count() -> int:
    """GPUs on this machine. Fewer than the run's ranks: every process shares them (two processes on one GPU, each
    with its XLA_PYTHON_CLIENT_MEM_FRACTION, is how the VMM transport is tested on a single card)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def wait_all(procs: list[Process], timeout_s: float) -> bool:
    """True when every process exited before the deadline; the rest are killed (nothing outlives a run)."""
    deadline = time.time() + timeout_s
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    hung = [p for p in procs if p.popen.poll() is None]
    for p in hung:
        p.popen.kill()
        p.popen.wait()
    return not hung


def cleanup(tag: str) -> None:
    """Segments of this run left by processes that died before freeing them."""
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
        if name.startswith(tag + "_"):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def run(spec: Spec, out_dir: str, timeout_s: float = 300.0, **spawn_args) -> dict:
    """One whole run: its processes, the router in serve mode; returns what happened (nothing left running)."""
    os.makedirs(out_dir, exist_ok=True)
    tag = f"dwdp_{uuid.uuid4().hex[:10]}"
    start = time.time()
    router = None
    if spec.mode == "serve":
        router = Router(spec.requests(), spec.num_groups, spec.group_size, spec.token_budget, spec.max_batch_size,
                        spec.step_deadline_s, AUTHKEY)
    procs = spawn(spec, out_dir, router.address if router else "", tag=tag, **spawn_args)
    try:
        if router is not None:
            router.wait(timeout_s)
            # A failed group's processes that did not end by themselves (a stalled rank) are ended here.
            grace = spec.barrier_timeout_s + 5
            for g in router.failures:
                members = [p for p in procs if p.group == g]
                wait_all(members, grace)
        finished = wait_all(procs, max(1.0, timeout_s - (time.time() - start)))
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
        if router is not None:
            router.close()
        cleanup(tag)
    result = dict(mode=spec.mode, spec=spec.fields, wall_s=time.time() - start, finished=finished,
                  processes=[p.outcome() for p in procs])
    if router is not None:
        result["serving"] = router.summary()
        result["completed"] = router.completed
    return result
