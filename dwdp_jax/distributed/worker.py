"""One rank process: joins its group's world, checks that every process launched the same run, places its ranks'
weights, maps its peers' slabs, then verifies (fixed batches, outputs written for the oracle) or serves (batches
from the router, one thread per local rank).

Exit codes: 0 done; 2 a bad launch (the message names what differs or what is missing); 4 the group lost a peer
(the message names it); a fault injected by the spec ends the process as asked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Client

import jax
import numpy as np

from dwdp_jax.distributed.coordination import Coordination, LaunchError
from dwdp_jax.distributed.spec import Spec, verify_batches

EXIT_BAD_LAUNCH, EXIT_PEER_LOST = 2, 4
AUTHKEY = b"dwdp-router"


def say(process: str, message: str) -> None:
    print(f"[{process}] {message}", file=sys.stderr, flush=True)


def build(spec: Spec, coord: Coordination, group: int, process: int, tag: str):
    from dwdp_jax.distributed.engine import ProcessDwdpEngine
    from dwdp_jax.runtime.dwdp import DwdpOptions
    from models import deepseek_v3 as M
    from models.deepseek_v3 import Params

    params = Params(*M.init_model(spec.model_config(), seed=spec.seed))
    ranks = spec.ranks_of(process)
    local = dict(zip(ranks, jax.local_devices()[:len(ranks)]))
    options = DwdpOptions(transport=spec.transport, poison=spec.poison,
                          last_token_logits=spec.max_batch_size if spec.mode == "serve" else 0)
    fault = spec.fault if spec.fault and spec.fault["group"] == group else None
    exchange = _BadHandle(coord, fault["rank"]) if fault and fault["kind"] == "bad_handle" else coord
    engine = ProcessDwdpEngine(params, spec.placement(), local, options, exchange=exchange, tag=f"{tag}_g{group}")
    return params, engine


class _BadHandle:
    """The exchange with one owner's published segment pointing nowhere (a launch test's unmappable handle)."""

    def __init__(self, coord: Coordination, rank: int):
        self.coord, self.rank = coord, rank

    def set(self, key: str, value: str) -> None:
        if key.endswith(f"/slabs/{self.rank}"):
            value = json.dumps({**json.loads(value), "path": "/dev/shm/dwdp_missing_segment"})
        self.coord.set(key, value)

    def __getattr__(self, name):
        return getattr(self.coord, name)


def verify(spec: Spec, coord: Coordination, process: int, tag: str, out_dir: str) -> None:
    from dwdp_jax.runtime.dep import DepRuntime
    from dwdp_jax.runtime.dwdp import count_collectives

    params, engine = build(spec, coord, 0, process, tag)
    report = {"process": process, "ranks": engine.local_ranks, "devices": [str(d) for d in jax.local_devices()]}
    outputs = {}
    if "dwdp" in spec.strategies:
        collectives, pulled, planned, held_once = {}, {}, {}, {}
        for rank in engine.local_ranks:
            batches = verify_batches(spec, rank)
            for i, batch in enumerate(batches):
                out = engine.step(rank, batch).output
                outputs[f"dwdp/{rank}/{i}/logits"] = out.logits_TV
                for m, ids in enumerate(out.expert_ids):
                    outputs[f"dwdp/{rank}/{i}/ids{m}"] = ids
            collectives[rank] = sum(count_collectives(t) for t in engine.compiled_hlo(batches[0], rank).values())
            pulled[rank] = engine.transport.bytes_pulled[rank]
            held_once[rank] = all(engine.share.holds(rank, a)
                                  for slab in engine.ranks[rank].local for a in slab.arrays())
            planned[rank] = (len(batches) * spec.model_config().num_moe_layers
                             * engine.transport.planned_bytes_per_layer(rank))
        report["dwdp"] = {"collectives": collectives, "bytes_pulled": pulled, "bytes_planned": planned,
                          "transport": spec.transport, "slabs_in_shared_segment": held_once}
    coord.barrier("dwdp verified", spec.barrier_timeout_s + spec.step_deadline_s)
    if "dep" in spec.strategies:
        n = spec.group_size
        runtime = DepRuntime(params, n, spec.token_budget, devices=jax.devices(), step_timeout_s=0)
        per_rank = [verify_batches(spec, r) for r in range(n)]
        for i in range(2):
            outs = runtime.step([per_rank[r][i] for r in range(n)])
            for rank in engine.local_ranks:
                outputs[f"dep/{rank}/{i}/logits"] = outs[rank].logits_TV
                for m, ids in enumerate(outs[rank].expert_ids):
                    outputs[f"dep/{rank}/{i}/ids{m}"] = ids
        hlo = runtime.compiled_hlo()
        report["dep"] = {"all_to_all": hlo.count(" all-to-all("), "mesh_devices": len(jax.devices())}
    np.savez(os.path.join(out_dir, f"outputs_p{process}.npz"), **outputs)
    with open(os.path.join(out_dir, f"report_p{process}.json"), "w") as f:
        json.dump(report, f)
    coord.barrier("verified", spec.barrier_timeout_s + spec.step_deadline_s)


def serve(spec: Spec, coord: Coordination, group: int, process: int, tag: str, router: str, name: str) -> int:
    from dwdp_jax.distributed.engine import LocalRanks
    from dwdp_jax.packing import pack

    _, engine = build(spec, coord, group, process, tag)
    host, port = router.rsplit(":", 1)
    fault = spec.fault if spec.fault and spec.fault["group"] == group else None
    errors = []

    def loop(rank: int) -> None:
        try:
            conn = Client((host, int(port)), authkey=AUTHKEY)
            conn.send(("hello", group, rank, os.getpid()))
            served = 0
            while True:
                conn.send(("next", group, rank))
                item = conn.recv()
                if item is None:
                    conn.send(("bye", group, rank))
                    conn.close()
                    return
                batch_id, requests = item
                if fault and fault["rank"] == rank and served == fault["after_batches"]:
                    say(name, f"fault injected: rank {rank} {fault['kind']} with batch {batch_id} in hand")
                    if fault["kind"] == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(10 * spec.step_deadline_s + 3600)
                batch = pack([tokens for _, tokens in requests], budget=spec.token_budget)
                start = time.time()
                out = engine.step(rank, batch).output
                conn.send(("done", group, rank, batch_id, start, time.time(),
                           {rid: out.logits_TV[i] for i, (rid, _) in enumerate(requests)}))
                served += 1
        except Exception as e:  # reported below; the router sees the closed connection
            errors.append(f"rank {rank}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=loop, args=(r,), daemon=True) for r in LocalRanks(engine).global_ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        say(name, "; ".join(errors))
        return 1
    coord.barrier("served", spec.barrier_timeout_s)  # a dead or stalled peer fails this, naming it
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", required=True, help="the launch spec, JSON")
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--process", type=int, required=True, help="process index within the group")
    ap.add_argument("--coordinator", required=True, help="host:port of the group's coordination service")
    ap.add_argument("--router", default="", help="host:port of the router (serve mode)")
    ap.add_argument("--tag", required=True, help="names this run's shared segments")
    ap.add_argument("--out", default=".", help="where verify mode writes its outputs")
    args = ap.parse_args(argv)
    spec = Spec.of(**json.loads(args.spec))
    name = f"group {args.group} process {args.process}"
    jax.config.update("jax_num_cpu_devices", spec.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coord = Coordination(args.coordinator, args.process, spec.processes_per_group, spec.start_timeout_s)
    try:
        coord.connect(spec.heartbeat_s)
        coord.agree("the launch configuration", spec.agreed(args.group))
        if spec.mode == "verify":
            verify(spec, coord, args.process, args.tag, args.out)
            code = 0
        else:
            code = serve(spec, coord, args.group, args.process, args.tag, args.router, name)
    except LaunchError as e:
        say(name, str(e))
        lost = "did not reach barrier" in str(e) or "did not publish" in str(e)
        coord.leave(EXIT_PEER_LOST if lost and spec.mode == "serve" else EXIT_BAD_LAUNCH)
    coord.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
