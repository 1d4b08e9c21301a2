"""DWDP expert placement: which routed experts each rank stores and which it pulls from whom, per MoE layer.

E experts over a group of N ranks, L local experts per rank, stride P, with the strict identity E = L + (N-1)P
(the paper's "Mode B"; strict because a partial slab cannot be mapped or pulled as a whole array). Rank r stores
experts [rP, rP + L). When L > P adjacent ranges overlap by L - P experts: that redundancy lets N not divide E
(DWDP3 with 256 experts) and, when memory permits, trades memory for fewer bytes pulled per layer.

Read rule (each expert of [0, E) is read from exactly one place by every rank, deterministically):
  1. An expert in the rank's own range [rP, rP + L) is read from the local slab. A rank never pulls what it stores.
  2. Every other expert e is pulled from its *lowest owning rank* owner(e) = min{r' : r'P <= e < r'P + L},
     i.e. owner(e) = 0 for e < L and 1 + (e - L) // P otherwise. Rank r' is thus the lowest owner of the
     contiguous block [0, L) for r' = 0 and [(r'-1)P + L, r'P + L) (the tail P of its slab) for r' >= 1.
  3. Consecutive remote experts with the same owner form one Pull, so there is at most one Pull per owner:
     lower owners serve part of [0, rP), higher owners part of [rP + L, E), and the lowest-owner blocks are
     contiguous in global order.
From a higher peer this is exactly its tail P (the reference implementation's rule). From lower peers it equals
the reference's "head P of each lower peer" when L == P; with redundancy (L > P) rank 0 serves up to L experts,
every lower peer r' >= 1 serves its part of its tail block, and a lower peer whose block is already covered by
rank 0 (L >= 2P) serves nothing. The total pulled is always E - L = (N-1)P per rank and layer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Pull:
    """One contiguous copy of a rank's remote experts: `count` experts from rank `owner`'s local slab.

    The experts are global ids [global_start, global_start + count), found at rows
    [src_offset, src_offset + count) of the owner's local slab.
    """

    owner: int
    src_offset: int
    count: int
    global_start: int

    @property
    def global_stop(self) -> int:
        return self.global_start + self.count


@dataclasses.dataclass(frozen=True)
class Segment:
    """One piece of a rank's view of all E experts: `count` experts read from `source` starting at row `offset`.

    `source` is "local" (the rank's own slab) or the owner rank of a pulled slab; `offset` is the row in the
    source's local slab. A rank's segments, concatenated, are experts [0, E) in global order.
    """

    source: Literal["local"] | int
    offset: int
    count: int
    global_start: int

    @property
    def global_stop(self) -> int:
        return self.global_start + self.count


@dataclasses.dataclass(frozen=True)
class Placement:
    """E = num_experts routed experts over N = num_ranks ranks; rank r stores [rP, rP + L).

    L = local_experts, P = prefetch_experts. Validated on construction so that a bad group fails at
    configuration time with the field and its valid range, not as a shape error inside a pull.
    """

    num_experts: int
    num_ranks: int
    local_experts: int
    prefetch_experts: int

    def __post_init__(self):
        for name in ("num_experts", "num_ranks", "local_experts", "prefetch_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Placement.{name} must be an integer, got {value!r}")
        e, n, l, p = self.num_experts, self.num_ranks, self.local_experts, self.prefetch_experts
        if e < 1:
            raise ValueError(f"Placement.num_experts must be >= 1, got {e}")
        if n < 2:
            raise ValueError(f"Placement.num_ranks must be >= 2 (a DWDP group has at least two ranks), got {n}")
        if not 1 <= l <= e:
            raise ValueError(f"Placement.local_experts must be in [1, num_experts={e}], got {l}")
        if not 1 <= p <= l:
            raise ValueError(f"Placement.prefetch_experts must be in [1, local_experts={l}], got {p}")
        if l + (n - 1) * p != e:
            raise ValueError(
                f"Placement coverage local_experts + (num_ranks - 1) * prefetch_experts = {l} + {n - 1} * {p} = "
                f"{l + (n - 1) * p} must equal num_experts = {e}; {_allowed_local_experts_text(e, n)}")

    @classmethod
    def uniform(cls, num_experts: int, num_ranks: int) -> Placement:
        """No redundancy: L = P = E / N, which needs N to divide E."""
        if num_ranks < 2 or num_experts % num_ranks:
            raise ValueError(f"Placement.uniform needs num_ranks >= 2 dividing num_experts={num_experts}, "
                             f"got num_ranks={num_ranks}; use Placement.for_group for a redundant placement")
        share = num_experts // num_ranks
        return cls(num_experts, num_ranks, share, share)

    @classmethod
    def for_group(cls, num_experts: int, num_ranks: int, local_experts: int | None = None) -> Placement:
        """A valid placement from (E, N) alone, or with a given L (a memory-driven choice of more local experts).

        Without `local_experts`: the smallest L >= ceil(E / N) with (E - L) divisible by N - 1 and P <= L, which
        is P = E // N, L = E - (N-1)P (larger P means smaller L, and P <= L holds iff P <= E / N). It is the
        least redundant placement: uniform when N divides E, else L - P = E mod N extra experts per rank.
        With `local_experts`: P = (E - L) / (N - 1), which must be a whole number in [1, L].
        """
        _check_group(num_experts, num_ranks)
        if local_experts is None:
            prefetch_experts = num_experts // num_ranks
            return cls(num_experts, num_ranks, num_experts - (num_ranks - 1) * prefetch_experts, prefetch_experts)
        if local_experts not in _allowed_local_experts(num_experts, num_ranks):
            raise ValueError(f"Placement.local_experts={local_experts} is invalid for num_experts={num_experts}, "
                             f"num_ranks={num_ranks}: {_allowed_local_experts_text(num_experts, num_ranks)}")
        return cls(num_experts, num_ranks, local_experts, (num_experts - local_experts) // (num_ranks - 1))

    @classmethod
    def from_memory(cls, num_experts: int, num_ranks: int, bytes_per_expert: int, budget_bytes_for_experts: int,
                    *, num_moe_layers: int) -> Placement:
        """The most redundant placement (largest valid L, fewest bytes pulled) whose expert memory fits the budget.

        `bytes_per_expert` is one expert of one layer. Per rank the experts need the local slabs of every MoE
        layer plus two prefetch slots of one layer's remote experts:
            bytes(L) = bytes_per_expert * (num_moe_layers * L + 2 * (N-1)P) = bytes_per_expert * ((M - 2) L + 2E)
        with P = (E - L) / (N - 1): the slots shrink as L grows, so with M >= 3 MoE layers memory grows with L and
        the largest fitting L is found by scanning the valid L downwards (with M <= 2 the largest L is also the
        cheapest). Raises ValueError with the numbers when even the least redundant placement does not fit.
        """
        _check_group(num_experts, num_ranks)
        if num_moe_layers < 1 or bytes_per_expert <= 0:
            raise ValueError(f"Placement.from_memory needs num_moe_layers >= 1 and bytes_per_expert > 0, got "
                             f"num_moe_layers={num_moe_layers}, bytes_per_expert={bytes_per_expert}")

        def expert_bytes(local_experts: int) -> int:
            return bytes_per_expert * (num_moe_layers * local_experts + 2 * (num_experts - local_experts))

        for local_experts in reversed(_allowed_local_experts(num_experts, num_ranks)):
            if expert_bytes(local_experts) <= budget_bytes_for_experts:
                return cls.for_group(num_experts, num_ranks, local_experts)
        least = cls.for_group(num_experts, num_ranks)
        raise ValueError(
            f"no placement of num_experts={num_experts} over num_ranks={num_ranks} fits "
            f"budget_bytes_for_experts={budget_bytes_for_experts}: the least redundant one (L={least.local_experts}, "
            f"P={least.prefetch_experts}) needs {expert_bytes(least.local_experts)} bytes = {bytes_per_expert} "
            f"bytes_per_expert x ({num_moe_layers} MoE layers x {least.local_experts} local + 2 slots x "
            f"{num_experts - least.local_experts} remote)")

    def check_devices(self, num_devices: int) -> None:
        """Each rank is one device: refuse a group larger than the devices available."""
        if self.num_ranks > num_devices:
            raise ValueError(f"Placement.num_ranks: group of {self.num_ranks} ranks needs {self.num_ranks} devices, "
                             f"have {num_devices}")

    def local_range(self, rank: int) -> tuple[int, int]:
        """Global expert ids [start, stop) stored on `rank`."""
        self._check_rank(rank)
        start = rank * self.prefetch_experts
        return start, start + self.local_experts

    def owner(self, expert: int) -> int:
        """The lowest rank storing `expert`: the one every other rank pulls it from."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert must be in [0, num_experts={self.num_experts}), got {expert}")
        if expert < self.local_experts:
            return 0
        return 1 + (expert - self.local_experts) // self.prefetch_experts

    def pulls(self, rank: int) -> tuple[Pull, ...]:
        """The remote experts of `rank`, in global order, one contiguous Pull per lowest owner (module docstring)."""
        start, stop = self.local_range(rank)
        return self._pulls_in(0, start) + self._pulls_in(stop, self.num_experts)

    def view_segments(self, rank: int) -> tuple[Segment, ...]:
        """How `rank` sees all E experts: remote pulls below its slab, its local slab, remote pulls above it."""
        start, stop = self.local_range(rank)
        local = Pull(rank, 0, self.local_experts, start)
        pulls = self._pulls_in(0, start) + (local,) + self._pulls_in(stop, self.num_experts)
        return tuple(Segment("local" if p is local else p.owner, p.src_offset, p.count, p.global_start) for p in pulls)

    def bytes_pulled_per_layer(self, rank: int, bytes_per_expert: int) -> int:
        """Bytes `rank` copies from its peers for one MoE layer: all its remote experts, whatever the routing."""
        return bytes_per_expert * sum(p.count for p in self.pulls(rank))

    def _pulls_in(self, lo: int, hi: int) -> tuple[Pull, ...]:
        """Experts [lo, hi) split at lowest-owner block boundaries, one Pull per owner."""
        pulls = []
        expert = lo
        while expert < hi:
            owner = self.owner(expert)
            owner_start, owner_stop = self.local_range(owner)
            block_stop = min(owner_stop, hi)
            pulls.append(Pull(owner, expert - owner_start, block_stop - expert, expert))
            expert = block_stop
        return tuple(pulls)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank must be in [0, num_ranks={self.num_ranks}), got {rank}")


def _check_group(num_experts: int, num_ranks: int) -> None:
    """A placement needs N >= 2 and P >= 1 with P <= L, hence E >= N."""
    if num_ranks < 2:
        raise ValueError(f"Placement.num_ranks must be >= 2 (a DWDP group has at least two ranks), got {num_ranks}")
    if num_experts < num_ranks:
        raise ValueError(f"Placement.num_experts must be >= num_ranks={num_ranks} (every rank pulls at least one "
                         f"expert from each peer), got {num_experts}")


def _allowed_local_experts(num_experts: int, num_ranks: int) -> range:
    """Every valid L, ascending: L = E - (N-1)P for P = E // N down to 1."""
    step = num_ranks - 1
    return range(num_experts - step * (num_experts // num_ranks), num_experts - step + 1, step)


def _allowed_local_experts_text(num_experts: int, num_ranks: int) -> str:
    if num_ranks < 2 or num_experts < num_ranks:
        return "no placement exists (needs num_ranks >= 2 and num_experts >= num_ranks)"
    allowed = _allowed_local_experts(num_experts, num_ranks)
    values = ", ".join(map(str, allowed)) if len(allowed) <= 8 else (
        f"{allowed[0]}, {allowed[1]}, ..., {allowed[-1]}")
    return (f"valid local_experts for num_experts={num_experts}, num_ranks={num_ranks} are L = E - (N-1)P with "
            f"1 <= P <= E // N = {num_experts // num_ranks}, i.e. {values} (step {allowed.step}), and "
            f"prefetch_experts = (E - L) / (N - 1)")
