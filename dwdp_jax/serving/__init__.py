"""Context-only serving: workloads (`workload`), DWDP/DEP scheduling (`scheduler`) and metrics (`metrics`).

Pure Python/numpy, no JAX: the runtimes, the simulator and the figure pipeline all build on these.
"""

from dwdp_jax.serving.metrics import IterationRecord, RequestRecord, summarize
from dwdp_jax.serving.scheduler import Batch, CountCheckError, DepScheduler, DwdpScheduler, validate_requests
from dwdp_jax.serving.workload import Request, read_dataset, request_token_ids, synthetic_requests

__all__ = [
    "Batch", "CountCheckError", "DepScheduler", "DwdpScheduler", "IterationRecord", "Request", "RequestRecord",
    "read_dataset", "request_token_ids", "summarize", "synthetic_requests", "validate_requests",
]
