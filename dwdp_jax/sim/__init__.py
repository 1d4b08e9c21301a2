"""Roofline model and discrete-event simulator of DWDP vs DEP at scales we cannot run (GB200 NVL72).

hardware: GPU specs (datasheet and calibrated); roofline: per-op costs and the paper's T_DWDP / T_DEP analysis;
contention: the copy-engine contention distribution (paper Table 2); workload: a simulated workload (the serving
sampler's requests); config: what a simulation runs; engine: the fluid discrete-event engine; pulls: DWDP's pulls
(source disciplines, prefetch streams, contention statistics); servers: the context servers, batched by the serving
scheduler; generation: the generation servers of disaggregated serving; simulate: context-only and disaggregated runs
and their results; planner: the TTFT-target planner; studies: the experiments that turn those into results files;
calibration: the studies of measured runs (calibrated predictions, the Table 4 grid).
"""
