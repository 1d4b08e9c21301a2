"""DEP's full-budget step memory at R1 width, compile only: XLA's temporaries per MoE depth beside the plan.

  python -m experiments.dep_step_memory --depths=6,8        # on the GPUs at hand (DEP over all of them)

For each depth (num_hidden_layers; the preset's 3 dense layers first), builds the DEP runtime of the
`r1_width_4gpu` context_bench preset with synthetic weights and reads the compiled step's memory analysis
(temporaries, outputs, arguments) and each device's largest free block; nothing runs. This is how DEP4's per-layer
14 GiB receive buffers were found. Results: results/dep_step_memory/<run>.json.
"""

from __future__ import annotations

import gc
import sys

import jax
from absl import app, flags

from configs.context_bench import get_config
from dwdp_jax import bench, memory
from dwdp_jax.results import write_measurements

_DEPTHS = flags.DEFINE_list("depths", ["6", "8"], "num_hidden_layers to compile, each a row")
_RESULTS = flags.DEFINE_string("results", "results", "results root")

GIB = 2**30


def step_memory(depth: int) -> dict[str, float]:
    """GiB of the DEP step's temporaries, outputs and arguments at `depth`, the plan's step estimate, and the
    smallest largest-free-block over the devices."""
    c = get_config("r1_width_4gpu")
    c.strategies, c.num_ranks, c.model.num_hidden_layers = "dep", jax.device_count(), depth
    p = bench.plan(c)
    runtime = bench.make_runtime("dep", bench.build_params(p), p)
    analysis = runtime.memory_analysis()
    plan = memory.plan_dep(p.cfg, c.num_ranks, c.max_num_tokens, attention_impl="flash")
    free = min(memory.largest_free_block(d) or 0 for d in p.devices)
    del runtime
    gc.collect()
    return {"temp_gib": analysis.temp_size_in_bytes / GIB, "output_gib": analysis.output_size_in_bytes / GIB,
            "argument_gib": analysis.argument_size_in_bytes / GIB,
            "planned_gib": (plan.all_to_all_bytes + plan.activation_bytes) / GIB, "largest_free_gib": free / GIB}


def main(argv):
    del argv
    if jax.devices()[0].platform != "gpu":
        print("dep_step_memory: needs GPUs (XLA:CPU has no ragged_all_to_all and other buffers)", file=sys.stderr)
        sys.exit(2)
    rows = {int(d): step_memory(int(d)) for d in _DEPTHS.value}
    metrics = {f"depth{d}_{k}": v for d, row in rows.items() for k, v in row.items()}
    write_measurements("dep_step_memory", config={"depths": sorted(rows), "num_ranks": jax.device_count()},
                       raw=rows, metrics=metrics, root=_RESULTS.value)


if __name__ == "__main__":
    app.run(main)
