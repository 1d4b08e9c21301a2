"""Context-only serving workloads: which requests arrive, how long their prompts are, and when they arrive.

The paper's context-only evaluation is parameterized by ISL, the input ratio r (lengths uniform in [r*ISL, ISL], the
benchmark_serving `random-range-ratio` convention) and, for the imbalance ablation, an ISL standard deviation
(TRT-LLM's `token-norm-dist`: normal lengths around ISL). Everything is deterministic by seed so that DWDP and DEP
run on exactly the same requests, and independent random streams are used for lengths, arrivals and token ids so
that changing one knob does not reshuffle the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Independent random streams derived from one seed (see module docstring).
_LENGTH_STREAM = 0
_ARRIVAL_STREAM = 1
_TOKEN_STREAM = 2


@dataclasses.dataclass(frozen=True)
class Request:
    """One context-only request. `token_ids`, when given, holds exactly `input_len` ids (int32, read-only)."""

    id: int
    input_len: int
    token_ids: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    arrival_s: float = 0.0

    def __post_init__(self):
        if isinstance(self.input_len, bool) or not isinstance(self.input_len, (int, np.integer)) or self.input_len < 1:
            raise ValueError(f"request {self.id}: input_len must be an integer >= 1, got {self.input_len!r}")
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"request {self.id}: arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.token_ids is not None:
            ids = np.array(self.token_ids, dtype=np.int32)  # a copy: freezing it must not freeze the caller's
            if ids.shape != (self.input_len,):
                raise ValueError(f"request {self.id}: token_ids has shape {ids.shape}, expected ({self.input_len},)")
            ids.setflags(write=False)
            object.__setattr__(self, "token_ids", ids)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *extra]))


def _check_num_requests(num_requests: int) -> None:
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")


def _check_rate(rate_per_s: float | None) -> None:
    if rate_per_s is not None and not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0 (or None / inf for saturation), got {rate_per_s}")


def input_lengths(num_requests: int, isl: int, *, input_ratio: float = 1.0, isl_std: float | None = None,
                  max_len: int | None = None, seed: int = 0) -> np.ndarray:
    """Prompt lengths [num_requests] (int64).

    Uniform mode (isl_std None): integers uniform in [max(1, int(isl * input_ratio)), isl], both ends inclusive, as
    benchmark_serving's `randint(int(ISL*r), ISL+1)`; the lower bound is kept >= 1 because r = 0 would otherwise allow
    empty prompts. Normal mode (isl_std given, 0 included, meaning every prompt is exactly isl): round(N(isl, isl_std))
    clipped to [1, max_len]; max_len defaults to 2*isl - 1 so the clip is symmetric and the mean stays at isl. The two
    modes are exclusive: input_ratio must be 1.0 in normal mode, because silently ignoring it would mislabel results.
    """
    _check_num_requests(num_requests)
    if isl < 1:
        raise ValueError(f"isl must be >= 1, got {isl}")
    if not 0.0 <= input_ratio <= 1.0:
        raise ValueError(f"input_ratio must be in [0, 1], got {input_ratio}")
    if isl_std is not None and not isl_std >= 0:
        raise ValueError(f"isl_std must be >= 0 (or None for uniform lengths), got {isl_std}")
    if max_len is not None and max_len < isl:
        raise ValueError(f"max_len must be >= isl ({isl}), got {max_len}")
    rng = _rng(seed, _LENGTH_STREAM)
    if isl_std is None:
        low = max(1, int(isl * input_ratio))
        return rng.integers(low, isl, size=num_requests, endpoint=True, dtype=np.int64)
    if input_ratio != 1.0:
        raise ValueError(f"input_ratio must be 1.0 when isl_std is given (normal lengths around isl), "
                         f"got {input_ratio}")
    upper = max_len if max_len is not None else 2 * isl - 1
    return np.clip(np.rint(rng.normal(isl, isl_std, size=num_requests)), 1, upper).astype(np.int64)


def arrival_times_s(num_requests: int, rate_per_s: float | None = None, *, seed: int = 0) -> np.ndarray:
    """Arrival times [num_requests] in seconds from the start of the run, non-decreasing.

    rate_per_s None or inf: saturation, everything arrives at 0 (the paper's context-only throughput runs). Otherwise a
    Poisson process: exponential inter-arrival gaps of mean 1/rate, the first request arriving after the first gap.
    """
    _check_num_requests(num_requests)
    _check_rate(rate_per_s)
    if rate_per_s is None or math.isinf(rate_per_s):
        return np.zeros(num_requests)
    return np.cumsum(_rng(seed, _ARRIVAL_STREAM).exponential(1.0 / rate_per_s, size=num_requests))


def synthetic_requests(num_requests: int, isl: int, *, input_ratio: float = 1.0, isl_std: float | None = None,
                       max_len: int | None = None, rate_per_s: float | None = None, seed: int = 0) -> list[Request]:
    """Requests with ids 0..n-1, lengths from `input_lengths` and arrivals from `arrival_times_s`, no token ids
    (draw them per batch with `request_token_ids`, so a 4096 x 32K workload does not hold 134M ids in memory)."""
    lengths = input_lengths(num_requests, isl, input_ratio=input_ratio, isl_std=isl_std, max_len=max_len, seed=seed)
    arrivals_s = arrival_times_s(num_requests, rate_per_s, seed=seed)
    return [Request(id=i, input_len=int(n), arrival_s=float(t)) for i, (n, t) in enumerate(zip(lengths, arrivals_s))]


def request_token_ids(request: Request, vocab_size: int, *, seed: int = 0) -> np.ndarray:
    """The request's token ids [input_len] (int32): its own when given (checked against vocab_size), otherwise drawn
    uniformly from [0, vocab_size) by (seed, request id), so the same request gets the same ids in every strategy."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if request.token_ids is not None:
        bad = (request.token_ids < 0) | (request.token_ids >= vocab_size)
        if bad.any():
            raise ValueError(f"request {request.id}: token id {int(request.token_ids[bad][0])} outside "
                             f"[0, {vocab_size})")
        return request.token_ids
    return _rng(seed, _TOKEN_STREAM, request.id).integers(0, vocab_size, size=request.input_len, dtype=np.int32)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _line_problem(obj: Any) -> str | None:
    """Why one parsed JSON line is not a valid request, or None when it is."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    input_len, token_ids, arrival_s = obj.get("input_len"), obj.get("token_ids"), obj.get("arrival_s")
    if input_len is None and token_ids is None:
        return "needs input_len or token_ids"
    if input_len is not None and (not _is_int(input_len) or input_len < 1):
        return f"input_len must be an integer >= 1, got {input_len!r}"
    if token_ids is not None:
        if not isinstance(token_ids, list) or not token_ids or not all(_is_int(t) and t >= 0 for t in token_ids):
            return "token_ids must be a non-empty list of integers >= 0"
        if input_len is not None and len(token_ids) != input_len:
            return f"token_ids has {len(token_ids)} entries but input_len is {input_len}"
    if arrival_s is not None and (isinstance(arrival_s, bool) or not isinstance(arrival_s, (int, float))
                                  or not math.isfinite(arrival_s) or arrival_s < 0):
        return f"arrival_s must be a finite number >= 0, got {arrival_s!r}"
    return None


def read_dataset(path: str | Path, *, rate_per_s: float | None = None, seed: int = 0) -> list[Request]:
    """Requests from a JSON-lines file, one object per line: `input_len`, optional `token_ids` (input_len derived from
    it when absent), optional `arrival_s`; other keys are ignored. Request ids are 0-based line order.

    Every malformed line (blank ones included: nothing is skipped silently) is collected and reported in one
    ValueError with its 1-based line number. Arrivals come from the file when every line has `arrival_s` (then
    rate_per_s must be None), else from `arrival_times_s(rate_per_s, seed)`; a file where only some lines have
    `arrival_s` is an error, since there is no meaningful way to merge the two.
    """
    _check_rate(rate_per_s)
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read dataset file {path}: {e}") from e
    problems, objs = [], []
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON ({e.msg})")
            continue
        problem = _line_problem(obj)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            objs.append((number, obj))
    if not lines:
        problems.append("the file has no lines")
    with_arrival = [number for number, obj in objs if "arrival_s" in obj]
    if with_arrival and len(with_arrival) != len(objs):
        missing = [number for number, obj in objs if "arrival_s" not in obj]
        problems.append(f"arrival_s is given on some lines but missing on lines {_abbreviate(missing)}")
    if with_arrival and rate_per_s is not None:
        problems.append(f"the file gives arrival_s, so rate_per_s must be None (got {rate_per_s})")
    if problems:
        raise ValueError(f"dataset file {path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    arrivals_s = ([float(obj["arrival_s"]) for _, obj in objs] if with_arrival
                  else arrival_times_s(len(objs), rate_per_s, seed=seed).tolist())
    return [Request(id=i, input_len=obj.get("input_len") or len(obj["token_ids"]), token_ids=obj.get("token_ids"),
                    arrival_s=t) for i, ((_, obj), t) in enumerate(zip(objs, arrivals_s))]


def _abbreviate(numbers: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > limit else "")


# Fields a variant may change, with their types: config.workload's, and the batch budget (max_num_tokens, one of the
# run's token buckets, so the runtimes' compiled shapes serve it).
VARIANT_FIELDS = {"num_requests": int, "isl": int, "input_ratio": float, "isl_std": float, "rate_per_s": float,
                  "seed": int, "max_num_tokens": int}


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """config.variants, "name:field=value,field=value;name2:...": further workloads served by the same warm runtimes
    (no rebuild, no recompile), each reported beside the main one. ValueError names the part that is wrong."""
    variants = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name or name in variants:
            raise ValueError(f"config.variants: {part!r} needs a new name, then ':' and field=value pairs")
        overrides = {}
        for pair in (x.strip() for x in body.split(",") if x.strip()):
            field, eq, value = (x.strip() for x in pair.partition("="))
            if not eq or field not in VARIANT_FIELDS:
                raise ValueError(f"config.variants {name!r}: {pair!r} must be field=value with a field in "
                                 f"{sorted(VARIANT_FIELDS)}")
            try:
                overrides[field] = VARIANT_FIELDS[field](value)
            except ValueError as e:
                raise ValueError(f"config.variants {name!r}: {field}={value!r} is not a "
                                 f"{VARIANT_FIELDS[field].__name__}") from e
        if not overrides:
            raise ValueError(f"config.variants {name!r}: no field=value pairs")
        variants[name] = overrides
    return variants
