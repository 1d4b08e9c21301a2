"""Roofline model and discrete-event simulator of DWDP vs DEP at scales we cannot run (GB200 NVL72).

hardware: GPU specs (datasheet and calibrated); roofline: per-op costs and the paper's T_DWDP / T_DEP analysis;
contention: the copy-engine contention distribution (paper Table 2); workload: a minimal request sampler;
simulate: the discrete-event simulator (context-only and disaggregated serving, the planner); studies: the
experiments that turn those into results files.
"""
