"""When and in what pieces a DWDP rank pulls the experts it lacks: the choices the runtime, the simulator and the
ablations share (no JAX here, so the simulator imports it without a backend)."""

# Where the pull of a later layer starts: at the end of layer m's program ("after_moe": layer m + 2's pull, which
# overlaps the next attention first) or between layer m's attention and MoE ("after_attention": layer m + 1's pull,
# which overlaps the grouped GEMM first).
PULL_ISSUES = ("after_moe", "after_attention")

# The sliced copy engine's piece size (contention mitigation): the paper's 2 MiB, the one value the simulator's
# round-robin pulls, its studies and configs, and the copy-engine ablations use.
SLICE_BYTES = 2 << 20
