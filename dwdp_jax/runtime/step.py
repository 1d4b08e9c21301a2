"""What a runtime's step returns, and the clock of a step that runs its stages as separate programs."""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import numpy as np


class PrefillOutput(NamedTuple):
    logits_TV: np.ndarray  # float32, real tokens only, in input order
    expert_ids: list[np.ndarray]  # per MoE layer [T, top-k], real tokens only
    hidden_TD: np.ndarray | None  # None from the serving runtimes (last-token logits): no host copy of [T, D]


@dataclasses.dataclass
class StepResult:
    output: PrefillOutput
    start_s: float
    end_s: float
    stages_s: dict[str, float]  # profiled steps only: seconds per stage, summed over layers


class StageClock:
    """Seconds per stage of one step. Profiling, each `lap` waits for its stage's outputs, which serializes the
    rank's pipeline: a profiled step measures, it does not serve. Otherwise a lap costs nothing."""

    STAGES = ("embed", "attention", "dense_mlp", "moe", "pull_wait", "head", "host")

    def __init__(self, profile: bool):
        self.profile = profile
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.start_s = self._mark = time.perf_counter()

    def lap(self, stage: str, tree) -> None:
        if self.profile:
            jax.block_until_ready(tree)
            now = time.perf_counter()
            self.seconds[stage] += now - self._mark
            self._mark = now

    def result(self, output: PrefillOutput) -> StepResult:
        """The step's result; what followed the last lap (the outputs' copies to the host) is `host`, none of the
        paper's categories."""
        end_s = time.perf_counter()
        self.seconds["host"] = end_s - self._mark
        return StepResult(output, self.start_s, end_s, self.seconds if self.profile else {})
