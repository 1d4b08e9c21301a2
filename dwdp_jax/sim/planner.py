"""The planner: which simulated serving point meets a TTFT target at the highest output TPS/GPU, and which DWDP groups
fit device memory at all."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dwdp_jax.sim import roofline
from dwdp_jax.sim.config import ContextConfig
from dwdp_jax.sim.hardware import HardwareSpec
from models.config import ModelConfig


def fits_memory(cfg: ModelConfig, hw: HardwareSpec, ctx: ContextConfig, fraction: float = 0.9) -> bool:
    """Whether a DWDP rank's weights fit `fraction` of device memory (always True when memory is unknown or DEP)."""
    if ctx.strategy != "dwdp" or not hw.memory_bytes:
        return True
    return roofline.weights_bytes_per_rank(cfg, ctx.placement(cfg), ctx.precision) <= fraction * hw.memory_bytes


@dataclasses.dataclass(frozen=True)
class PlanChoice:
    ttft_target_s: float
    best: dict | None  # the summary of the chosen point, None when no point meets the target
    candidates: list[dict]


def plan(points: Sequence[dict], ttft_targets_s: Sequence[float]) -> list[PlanChoice]:
    """For each TTFT target, the simulated point (an E2EResult summary) with the highest output TPS/GPU whose median
    TTFT meets the target."""
    out = []
    for target in ttft_targets_s:
        if not target > 0:
            raise ValueError(f"TTFT target must be > 0 s, got {target}")
        ok = [p for p in points if p["ttft_p50_s"] <= target]
        out.append(PlanChoice(target, max(ok, key=lambda p: p["output_tps_per_gpu"]) if ok else None, ok))
    return out
