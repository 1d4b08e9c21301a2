"""DWDP and DEP beyond one process: one process per device group on JAX's multi-controller runtime.

`coordination` (jax.distributed: process ids, key-value store, barriers, agreement checks), `engine` (a process's
share of a DWDP group and of a DEP mesh), `worker` (a rank process's main), `router` (groups behind one entry
point, failed groups isolated), `launch` (spawning the processes of a run on one machine).
"""
