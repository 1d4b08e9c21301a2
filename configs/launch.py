"""Configs of `experiments.launch` (multi-process DWDP / DEP on one machine): `--config=configs/launch.py:NAME`.

NAME: `verify` (one group, DWDP and DEP logits per rank written for the reference), `serve` (groups behind the
router), `serve_fault` (2 groups x 2 ranks, rank 1 of group 0 killed at its first batch).
Every field of `dwdp_jax.distributed.spec.DEFAULTS` can be set: `--config.group_size=4`.
"""

from ml_collections import config_dict

from dwdp_jax.distributed.spec import DEFAULTS


def get_config(name: str = "verify") -> config_dict.ConfigDict:
    c = config_dict.ConfigDict({k: v for k, v in DEFAULTS.items() if k not in ("fault", "strategies",
                                                                                   "model_changes")})
    c.strategies = ",".join(DEFAULTS["strategies"])
    c.num_hidden_layers = DEFAULTS["model_changes"]["num_hidden_layers"]
    c.first_k_dense_replace = DEFAULTS["model_changes"]["first_k_dense_replace"]
    c.fault = ""  # "" or "GROUP,RANK,AFTER_BATCHES,KIND" (KIND: kill | stall)
    c.platform = "cpu"  # cpu: virtual devices per process; gpu: one GPU per process (CUDA_VISIBLE_DEVICES)
    c.timeout_s = 600.0
    c.run = ""  # results/launch/<run>.json; default <name>_<time>
    c.name = name
    if name == "verify":
        c.group_size, c.devices_per_process = 4, 2
    elif name == "serve":
        c.mode, c.num_groups, c.group_size, c.num_requests, c.max_batch_size = "serve", 2, 2, 32, 2
    elif name == "serve_fault":
        c.mode, c.num_groups, c.group_size, c.num_requests, c.max_batch_size = "serve", 2, 2, 32, 2
        c.fault = "0,1,0,kill"
        c.barrier_timeout_s = 5.0
    else:
        raise ValueError(f"unknown launch config {name!r}; choose verify, serve or serve_fault")
    return c
