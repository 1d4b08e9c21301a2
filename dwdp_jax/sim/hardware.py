"""Hardware specs for the roofline model and the simulator: public datasheet peaks, and specs calibrated on our GPUs.

Why two kinds: the paper's headline numbers come from GB200 NVL72, which we cannot run, so its analysis is
reproduced from datasheet peaks (`SPECS`); predictions for the machines we *can* run are made from what this project
measured on them (`calibrated`), so a model-vs-measurement comparison is not polluted by peak-vs-achieved gaps.

Conventions: every rate is per GPU, in base SI units (FLOP/s, bytes/s). Datasheet tensor-core peaks are quoted "with
sparsity"; the dense peak used here is half of that. NVLink bandwidth is per direction (the datasheets quote the
bidirectional total, e.g. 900 GB/s for NVLink4 = 450 GB/s each way). A peak of None means the precision has no tensor-
core support on that GPU (FP4 before Blackwell); asking for it raises.

Calibration results contract (`calibrated(results_root)`): files results/gpu_calibration/*.json written with
`dwdp_jax.results.write_results("gpu_calibration", ...)`. The newest file (by run name order, last wins) is used.
Its `metrics` object holds measured *achieved* rates on one GPU (or one pair of GPUs for copies):
  required  gemm_tflops        dense bf16 GEMM, TFLOP/s (large square-ish shapes)
            hbm_gbps           device memory bandwidth (a large copy or reduction), GB/s
            p2p_gbps           one peer-to-peer copy, GPU -> GPU, GB/s
  optional  fp8_gemm_tflops    dense FP8 GEMM, TFLOP/s (absent: the calibrated spec has no FP8 peak)
            grouped_gemm_tflops  the MoE grouped GEMM with the project's kernel, TFLOP/s (absent: gemm_tflops)
            grouped_gemm_down_tflops  the same for the down projection (absent: grouped_gemm_tflops)
            grouped_gemm_fp8_tflops, grouped_gemm_fp8_down_tflops  the same kernels with FP8 block-scaled experts
                               (absent: the FP8 peak); the bf16 rates above apply to bf16 experts only
            attention_tflops   the causal prefill attention kernel, TFLOP/s (absent: gemm_tflops)
            p2p_fanin_gbps     total into one GPU while all peers copy to it, GB/s (absent: p2p_gbps)
            p2p_fanout_gbps    total out of one GPU while it serves all peers, GB/s (absent: p2p_gbps)
            all2all_gbps       per-rank all-to-all bandwidth of the DEP dispatch/combine, GB/s (absent: p2p_fanout)
            memory_gb          device memory, GB (absent: 0, meaning unknown)
and `environment.device_kind` names the card.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TERA = 1e12
GIGA = 1e9

# Bytes per element of weights or activations in each precision. NVFP4: 4-bit values plus one FP8 scale per 16
# elements; FP8: DeepSeek's 128x128 fp32 block scales on weights (4 bytes per 16384 elements), negligible.
BYTES_PER_ELEMENT = {"bf16": 2.0, "fp8": 1.0 + 4.0 / 16384, "nvfp4": 0.5 + 1.0 / 16}
PRECISIONS = tuple(BYTES_PER_ELEMENT)


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One GPU as the roofline and the simulator see it. Rates per GPU, SI units; see the module docstring."""

    name: str
    bf16_flops_per_s: float
    fp8_flops_per_s: float | None
    fp4_flops_per_s: float | None
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction
    copy_bytes_per_s: float  # one peer copy (one copy-engine stream), GPU -> GPU
    copy_engines: int | None  # cudaDeviceProp.asyncEngineCount; None: not published
    memory_bytes: float  # device memory; 0: unknown (no memory check)
    source: str
    attention_flops_per_s: float | None = None  # achieved attention kernel rate; None: the precision's peak
    grouped_gemm_flops_per_s: float | None = None  # achieved MoE grouped-GEMM rate; None: the precision's peak
    grouped_gemm_down_flops_per_s: float | None = None  # its down projection (K = intermediate); None: the above
    grouped_gemm_fp8_flops_per_s: float | None = None  # the same with FP8 block-scaled experts; None: the FP8 peak
    grouped_gemm_fp8_down_flops_per_s: float | None = None  # its down projection; None: the above
    egress_bytes_per_s: float | None = None  # total a source serves to all peers; None: nvlink_bytes_per_s
    ingress_bytes_per_s: float | None = None  # total a destination receives; None: nvlink_bytes_per_s
    all_to_all_bytes_per_s: float | None = None  # per-rank DEP all-to-all; None: egress

    def __post_init__(self):
        for name in ("bf16_flops_per_s", "hbm_bytes_per_s", "nvlink_bytes_per_s", "copy_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareSpec {self.name}: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("fp8_flops_per_s", "fp4_flops_per_s", "attention_flops_per_s", "grouped_gemm_flops_per_s",
                     "grouped_gemm_down_flops_per_s", "grouped_gemm_fp8_flops_per_s",
                     "grouped_gemm_fp8_down_flops_per_s", "egress_bytes_per_s", "ingress_bytes_per_s",
                     "all_to_all_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"HardwareSpec {self.name}: {name} must be > 0 or None, got {value!r}")
        if self.memory_bytes < 0:
            raise ValueError(f"HardwareSpec {self.name}: memory_bytes must be >= 0, got {self.memory_bytes}")

    def peak_flops_per_s(self, precision: str) -> float:
        """Dense tensor-core peak for GEMM operands in `precision` (bf16 | fp8 | nvfp4)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        peak = {"bf16": self.bf16_flops_per_s, "fp8": self.fp8_flops_per_s, "nvfp4": self.fp4_flops_per_s}[precision]
        if peak is None:
            raise ValueError(f"hardware {self.name} has no {precision} tensor-core peak; choose a precision in "
                             f"{[p for p in PRECISIONS if self._has(p)]}")
        return peak

    def _has(self, precision: str) -> bool:
        return {"bf16": True, "fp8": self.fp8_flops_per_s is not None,
                "nvfp4": self.fp4_flops_per_s is not None}[precision]

    @property
    def egress(self) -> float:
        return self.egress_bytes_per_s or self.nvlink_bytes_per_s

    @property
    def ingress(self) -> float:
        return self.ingress_bytes_per_s or self.nvlink_bytes_per_s

    @property
    def all_to_all(self) -> float:
        return self.all_to_all_bytes_per_s or self.egress


# Datasheet specs. The copy rate of one peer copy is not published; it is taken as the NVLink per-direction rate,
# the assumption behind the paper's "about 5.3 ms at 900 GB/s" per DWDP4 layer (our H200 measures 301 of 450 GB/s,
# which is why predictions for machines we run come from `calibrated`).
H100_SXM = HardwareSpec(
    name="h100_sxm", bf16_flops_per_s=989.4 * TERA, fp8_flops_per_s=1978.9 * TERA, fp4_flops_per_s=None,
    hbm_bytes_per_s=3.35e12, nvlink_bytes_per_s=450 * GIGA, copy_bytes_per_s=450 * GIGA, copy_engines=3,
    memory_bytes=80e9,
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1979 / FP8 3958 TFLOPS with sparsity, HBM3 3.35 TB/s, "
           "80 GB, NVLink4 900 GB/s bidirectional; asyncEngineCount 3 (NVIDIA developer forum, H100/H20)")
H200 = HardwareSpec(
    name="h200", bf16_flops_per_s=989.4 * TERA, fp8_flops_per_s=1978.9 * TERA, fp4_flops_per_s=None,
    hbm_bytes_per_s=4.8e12, nvlink_bytes_per_s=450 * GIGA, copy_bytes_per_s=450 * GIGA, copy_engines=3,
    memory_bytes=141e9,
    source="NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1979 / FP8 3958 TFLOPS with sparsity, HBM3e 4.8 TB/s, "
           "141 GB, NVLink4 900 GB/s bidirectional; same Hopper die as H100 for copy engines")
B200 = HardwareSpec(
    name="b200", bf16_flops_per_s=2.25e15, fp8_flops_per_s=4.5e15, fp4_flops_per_s=9e15,
    hbm_bytes_per_s=8e12, nvlink_bytes_per_s=900 * GIGA, copy_bytes_per_s=900 * GIGA, copy_engines=None,
    memory_bytes=180e9,
    source="NVIDIA DGX/HGX B200 datasheet per GPU (8 GPUs): FP4 18 / FP8 9 / BF16 4.5 PFLOPS with sparsity, "
           "HBM3e 64 TB/s and 1440 GB total, NVLink5 1.8 TB/s bidirectional")
GB200 = HardwareSpec(
    name="gb200", bf16_flops_per_s=2.5e15, fp8_flops_per_s=5e15, fp4_flops_per_s=10e15,
    hbm_bytes_per_s=8e12, nvlink_bytes_per_s=900 * GIGA, copy_bytes_per_s=900 * GIGA, copy_engines=None,
    memory_bytes=186e9,
    source="NVIDIA GB200 NVL72 datasheet divided by 72 GPUs: FP4 1440 / FP8 720 / BF16 360 PFLOPS with sparsity, "
           "HBM3e 576 TB/s and 13.4 TB, NVLink 130 TB/s; the paper's Appendix A uses HBM ~8 TB/s and NVLink5 "
           "~1800 GB/s aggregate read+write (900 GB/s per direction)")

SPECS = {spec.name: spec for spec in (H100_SXM, H200, B200, GB200)}
CALIBRATION_EXPERIMENT = "gpu_calibration"


def get(name: str, results_root: str | Path | None = None) -> HardwareSpec:
    """A datasheet spec by name, or "calibrated" for the spec built from this project's measurements."""
    if name == "calibrated":
        return calibrated(results_root)
    if name not in SPECS:
        raise ValueError(f"unknown hardware {name!r}; choose one of {sorted(SPECS) + ['calibrated']}")
    return SPECS[name]


def _metric(metrics: dict, key: str, path: Path, required: bool) -> float | None:
    value = metrics.get(key)
    if value is None:
        if required:
            raise ValueError(f"calibration file {path}: metrics.{key} is required (see dwdp_jax.sim.hardware)")
        return None
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"calibration file {path}: metrics.{key} must be a number > 0, got {value!r}")
    return float(value)


def newest_calibration(results_root: str | Path | None = None) -> tuple[Path, dict]:
    """(path, document) of the newest results/gpu_calibration/*.json; ValueError when there is none."""
    folder = Path(results_root or "results") / CALIBRATION_EXPERIMENT
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise ValueError(f"no GPU calibration results in {folder}: run the GPU calibration benchmark first, or pick a "
                         f"datasheet spec ({sorted(SPECS)})")
    return paths[-1], json.loads(paths[-1].read_text())


def calibrated(results_root: str | Path | None = None) -> HardwareSpec:
    """The spec measured on our own GPUs, from the newest results/gpu_calibration/*.json (contract in the module
    docstring). Raises ValueError when there is no such file or a required metric is missing."""
    path, doc = newest_calibration(results_root)
    metrics = doc.get("metrics") or {}

    def rate(key, scale, required=False):
        value = _metric(metrics, key, path, required)
        return None if value is None else value * scale

    gemm = rate("gemm_tflops", TERA, required=True)
    p2p = rate("p2p_gbps", GIGA, required=True)
    fanin, fanout = rate("p2p_fanin_gbps", GIGA), rate("p2p_fanout_gbps", GIGA)
    device = doc.get("environment", {}).get("device_kind", "unknown")
    return HardwareSpec(
        name=f"calibrated:{device}", bf16_flops_per_s=gemm, fp8_flops_per_s=rate("fp8_gemm_tflops", TERA),
        fp4_flops_per_s=None, hbm_bytes_per_s=rate("hbm_gbps", GIGA, required=True),
        nvlink_bytes_per_s=max(p2p, fanin or 0.0, fanout or 0.0), copy_bytes_per_s=p2p, copy_engines=None,
        memory_bytes=rate("memory_gb", GIGA) or 0.0, source=f"measured: {path}",
        attention_flops_per_s=rate("attention_tflops", TERA),
        grouped_gemm_flops_per_s=rate("grouped_gemm_tflops", TERA),
        grouped_gemm_down_flops_per_s=rate("grouped_gemm_down_tflops", TERA),
        grouped_gemm_fp8_flops_per_s=rate("grouped_gemm_fp8_tflops", TERA),
        grouped_gemm_fp8_down_flops_per_s=rate("grouped_gemm_fp8_down_tflops", TERA),
        egress_bytes_per_s=fanout or p2p, ingress_bytes_per_s=fanin or p2p,
        all_to_all_bytes_per_s=rate("all2all_gbps", GIGA))
