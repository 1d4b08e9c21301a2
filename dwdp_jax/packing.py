"""Packing variable-length sequences into one flat token axis (segment ids + per-sequence positions)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Host arrays of a packed batch padded to `tokens_T.size`; padding has segment id -1."""

    tokens_T: np.ndarray
    segment_ids_T: np.ndarray
    positions_T: np.ndarray
    lengths: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def budget(self) -> int:
        return int(self.tokens_T.size)

    def last_token_index(self) -> np.ndarray:
        return np.cumsum(self.lengths) - 1


def bucket(n: int, minimum: int = 16) -> int:
    """The static token budget for n tokens: the next power of two (bounds recompilation to log2 shapes)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def pack(sequences: Sequence[Sequence[int]], budget: int | None = None, vocab_size: int | None = None) -> PackedBatch:
    """Concatenates sequences in order; pads to `budget` (default: `bucket(total)`).

    Raises ValueError for an empty sequence, a token outside [0, vocab_size), or more tokens than the budget.
    """
    lengths = tuple(len(s) for s in sequences)
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"sequence {i} is empty; every sequence needs at least one token")
    total = sum(lengths)
    budget = bucket(total) if budget is None else budget
    if total > budget:
        raise ValueError(f"batch has {total} tokens but the token budget is {budget}")
    tokens = np.zeros(budget, np.int32)
    segments = np.full(budget, -1, np.int32)
    positions = np.zeros(budget, np.int32)
    offset = 0
    for i, seq in enumerate(sequences):
        arr = np.asarray(seq, np.int64)
        if vocab_size is not None and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"sequence {i} has token ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
        n = arr.size
        tokens[offset:offset + n] = arr
        segments[offset:offset + n] = i
        positions[offset:offset + n] = np.arange(n)
        offset += n
    return PackedBatch(tokens, segments, positions, lengths)
