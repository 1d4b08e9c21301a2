"""Context-only serving: workloads (`workload`), DWDP/DEP scheduling (`scheduler`) and metrics (`metrics`), and the
serve loops that drive the runtimes with them (`loop`).

The package and the three modules it exports are pure Python/numpy, no JAX: the runtimes, the simulator and the
figure pipeline all build on these. `loop` runs the runtimes, so it brings JAX and is imported on its own.
"""

from dwdp_jax.serving.metrics import IterationRecord, RequestRecord, summarize
from dwdp_jax.serving.scheduler import Batch, CountCheckError, DepScheduler, DwdpScheduler, validate_requests
from dwdp_jax.serving.workload import Request, read_dataset, request_token_ids, synthetic_requests

__all__ = [
    "Batch", "CountCheckError", "DepScheduler", "DwdpScheduler", "IterationRecord", "Request", "RequestRecord",
    "read_dataset", "request_token_ids", "summarize", "synthetic_requests", "validate_requests",
]
