"""Roofline and simulator study configs (`--config=configs/simulate.py:STUDY`), one per study.

STUDY: `contention` (default; paper Table 2), `sync_cv` (DEP sync overhead vs CV, paper Fig. 1), `roofline` (blog
Table 1), `pareto` (e2e TPS/GPU vs TPS/user, Tables 5-6), `planner` (context GPUs per TTFT target), `calibration`
(predicted vs measured DWDP/DEP, needs results/gpu_calibration and context_bench runs), `grid` (Table 4's grid at N
GPUs, calibrated), `memory` (which DWDP and DEP groups hold full-depth R1, FP8 experts or bf16, on which card),
`projection` (full-depth R1 as released, DWDP8 against DEP8 on the calibrated card, context only).
Every study that takes `hardware` also takes measured rates that replace the spec's (`fp8_gemm_tflops`,
`fp8_grouped_gemm_tflops`, `fp8_grouped_gemm_down_tflops`, `attention_tflops`: unset keeps the spec's). Override any
field with `--config.field=value`; lists are comma-separated strings. Every field is checked before any simulation
runs: a bad one exits 2 naming it.
"""

from ml_collections import config_dict

from dwdp_jax.prefetch import SLICE_BYTES
from dwdp_jax.sim.studies import paper_bands

STUDIES = ("contention", "sync_cv", "roofline", "pareto", "planner", "calibration", "grid", "memory", "projection")


def _context(c: config_dict.ConfigDict) -> None:
    """The DWDP context servers' settings of the e2e studies (sim.config.ContextConfig)."""
    c.discipline = "fifo"  # fifo | round_robin | none
    c.slice_bytes = SLICE_BYTES  # round_robin slice size
    c.packing = "lookahead"  # DWDP batch filling: DEP's window one rank at a time, or strict fcfs (serving.scheduler)
    c.compute_slowdown = 0.0  # DWDP compute slowdown while pulling (0.05 = 5%)
    c.attention_slowdown = config_dict.placeholder(float)  # None: compute_slowdown
    # where a DWDP rank issues the next pull: after_moe (two layers ahead) or after_attention (one layer ahead)
    c.pull_issue = "after_moe"


def _e2e(c: config_dict.ConfigDict) -> None:
    c.isl = 8192
    c.osl = 1024
    c.input_ratio = 0.8  # input lengths uniform in [ratio * ISL, ISL]
    c.cycles = 5  # requests = cycles x concurrency
    c.mtp_acceptance = 0.8  # generation: acceptance of each MTP draft token
    _context(c)


def get_config(name: str = "contention") -> config_dict.ConfigDict:
    if name not in STUDIES:
        raise ValueError(f"unknown simulate study {name!r}; choose from {', '.join(STUDIES)}")
    c = config_dict.ConfigDict()
    c.study = name
    c.hardware = "gb200"  # a spec of dwdp_jax.sim.hardware.SPECS, or calibrated
    c.model = "deepseek_r1"  # models.config.PRESETS
    c.results_root = "results"
    c.run = ""  # results file name; default: the hardware's name (calibration: calibrated)
    c.seed = 0
    c.moe_precision = "nvfp4"  # routed/shared experts: bf16 | fp8 | nvfp4
    c.dense_precision = "bf16"  # MLA projections, dense MLP, LM head
    c.attention_precision = "bf16"  # attention core
    # measured rates replacing the hardware spec's, TFLOP/s (None: the spec's): dense FP8 GEMM, the FP8 grouped GEMM
    # (gate/up, down), the attention kernel
    c.fp8_gemm_tflops = config_dict.placeholder(float)
    c.fp8_grouped_gemm_tflops = config_dict.placeholder(float)
    c.fp8_grouped_gemm_down_tflops = config_dict.placeholder(float)
    c.attention_tflops = config_dict.placeholder(float)
    if name == "roofline":
        c.isls = "1024,2048,4096,8192,16384,32768,65536"
        c.batches = "1,2,4,8"  # sequences per rank
        c.group_size = 4
        c.local_experts = 0  # DWDP L per rank; 0: the least redundant placement
    elif name == "contention":
        c.group_sizes = "3,4,6,8,12,16"
        c.disciplines = "none,fifo,round_robin"
        c.min_pulls = 80000  # pulls simulated per group size, at least
    elif name == "sync_cv":
        c.isl = 8192
        c.input_ratio = 0.8
        c.group_size = 4
        c.max_num_tokens = 32768  # DEP tokens per rank per step
        c.loads = "0.3,0.5,0.7,0.8,0.9,1.0"  # arrival rates over DEP capacity
        c.seeds = "0,1"  # workload seeds
        c.num_requests = 2000  # per (load, seed)
    elif name == "pareto":
        c.bands = ",".join(b.name for b in paper_bands())  # the paper's TPS/user bands to simulate
        c.group_size = 4
        _e2e(c)
    elif name == "planner":
        c.band = "60-80"  # the generation configuration (a pareto band)
        c.ttft_targets = "0.5,1,2,5"  # median TTFT targets, seconds
        c.group_sizes = "3,4,6,8"  # DWDP group sizes
        c.max_ctx_gpus = 32
        _e2e(c)
    elif name == "memory":
        c.models = "deepseek_r1_fp8,deepseek_r1"  # full depth, FP8 experts as released and bf16
        c.cards = "h100_sxm,h200,b200"
        c.group_sizes = "4,8,16,32"
        c.max_num_tokens = "16384,32768"
        c.memory_fraction = 0.9  # of each card's memory a rank may plan for (the runtime and allocator keep the rest)
    elif name == "projection":
        c.hardware, c.model = "calibrated", "deepseek_r1_released"
        c.moe_precision = c.dense_precision = "fp8"
        c.group_size = 8
        c.max_num_tokens = 16384  # what a DWDP8 rank of the released model holds (the memory study)
        c.max_batch_size = 64
        c.num_requests = 256
        c.isl = 8192
        c.workloads = "uniform_r0.8,std4096"  # ISL uniform in [0.8 ISL, ISL]; normal(ISL, 4096), clipped
        c.memory_fraction = 0.9
        _context(c)
    elif name == "calibration":
        c.tolerance = 0.10  # allowed relative error of the predicted DWDP/DEP ratio
        c.projection_requests = "256"  # request counts each measured run is also projected at
    else:
        c.group_size = 4
    return c
