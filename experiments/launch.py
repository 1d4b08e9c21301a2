"""Multi-process DWDP / DEP on one machine: spawns every rank process (one per `devices_per_process` devices, one
multi-controller world per group), runs the router in serve mode, and writes results/launch/<run>.json.

    python -m experiments.launch --config=configs/launch.py:verify
    python -m experiments.launch --config=configs/launch.py:serve_fault

Exit 0: verify mode, every process finished; serve mode, every request completed exactly once (a failed group
is recorded under serving.failures). Exit 1 otherwise; exit 2 on a bad config before any process starts.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from ml_collections import config_flags

from dwdp_jax import results
from dwdp_jax.distributed import launch
from dwdp_jax.distributed.spec import DEFAULTS, Spec

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "launch.py"))


def spec_from(c) -> Spec:
    fields = {k: c[k] for k in DEFAULTS if k in c and k not in ("fault", "strategies", "model_changes")}
    fields["strategies"] = [s for s in c.strategies.split(",") if s]
    fields["model_changes"] = dict(num_hidden_layers=c.num_hidden_layers, first_k_dense_replace=c.first_k_dense_replace)
    if c.fault:
        parts = c.fault.split(",")
        if len(parts) != 4:
            raise ValueError(f"config.fault={c.fault!r}; allowed: '' or 'GROUP,RANK,AFTER_BATCHES,KIND'")
        fields["fault"] = dict(group=int(parts[0]), rank=int(parts[1]), after_batches=int(parts[2]), kind=parts[3])
    return Spec.of(**fields)


def main(argv) -> int:
    del argv
    c = _CONFIG.value
    try:
        spec = spec_from(c)
        if c.platform not in ("cpu", "gpu"):
            raise ValueError(f"config.platform={c.platform!r}; allowed: cpu, gpu")
    except ValueError as e:
        print(f"bad config: {e}", file=sys.stderr)
        return 2
    run = c.run or f"{c.name}_{time.strftime('%Y%m%d_%H%M%S')}"
    out_dir = os.path.join("results", "launch", run + "_files")
    outcome = launch.run(spec, out_dir, timeout_s=c.timeout_s, platform=c.platform)
    completed = outcome.pop("completed", {})
    serving = outcome.get("serving")
    if serving is not None:
        ok = serving["completed"] == serving["requests"] and not serving["served_twice"]
        metrics = dict(per_group=serving["per_group"], overall=serving["overall"])
        outcome["served_by"] = {rid: dict(group=r["group"], rank=r["rank"], batch=r["batch"])
                                for rid, r in sorted(completed.items())}
    else:
        ok = outcome["finished"] and all(p["exit"] == 0 for p in outcome["processes"])
        metrics = {}
    path = results.write_results("launch", run, config=c.to_dict(), raw=outcome, metrics=metrics,
                                 with_devices=False, failures=(serving or {}).get("failures", []))
    summary = dict(ok=ok, wall_s=round(outcome["wall_s"], 1),
                   processes=[(p["group"], p["process"], p["exit"], p["signal"]) for p in outcome["processes"]])
    if serving is not None:
        summary.update(completed=serving["completed"], requests=serving["requests"], lost=serving["lost"],
                       served_twice=serving["served_twice"], failures=[f["reason"] for f in serving["failures"]],
                       per_group={g: (v["requests"] if "requests" in v else 0)
                                  for g, v in serving["per_group"].items()})
    print(json.dumps(summary, indent=1))
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
