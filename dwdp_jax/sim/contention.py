"""Copy-engine contention in a DWDP group (paper section 4.3, Table 2), computed exactly.

Why: asynchronous ranks pull from whichever peer their serial pull loop has reached, so several destinations can hit
one source copy engine at once and each of their pulls slows down. The paper models a rank's current source as
uniform over its N - 1 peers, independently across ranks; the N - 2 other destinations that could pick the same
source (the source itself never pulls from itself) each do so with probability 1/(N - 1), so the contention level
C = 1 + X with X ~ Binomial(N - 2, 1/(N - 1)), and a pull at level C takes about C times its ideal time tau.
"""

from __future__ import annotations

import math

# Paper Table 2, Pr[C = c] in percent, as printed (strings keep the printed precision). DWDP12 and DWDP16 are
# truncated in the paper after the listed levels.
PAPER_TABLE2 = {
    3: ("50", "50"),
    4: ("44.44", "44.44", "11.11"),
    6: ("40.96", "40.96", "15.36", "2.56", "0.16"),
    8: ("39.66", "39.66", "16.52", "3.67", "0.46", "0.03", "0.00085"),
    12: ("38.55", "38.55", "17.35", "4.63", "0.81", "0.097"),
    16: ("38.06", "38.06", "17.67", "5.05", "0.99", "0.14", "0.015"),
}


def _check_group(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 3:
        raise ValueError(f"group_size must be an integer >= 3 (with 2 ranks there is never contention), "
                         f"got {group_size!r}")


def contention_pmf(group_size: int) -> list[float]:
    """[Pr[C = 1], ..., Pr[C = N - 1]] for a DWDP group of N ranks (probabilities, not percent)."""
    _check_group(group_size)
    others, p = group_size - 2, 1.0 / (group_size - 1)
    return [math.comb(others, x) * p ** x * (1 - p) ** (others - x) for x in range(others + 1)]


def expected_slowdown(group_size: int) -> float:
    """E[C]: the mean stretch of a pull under the model (1 + (N - 2)/(N - 1))."""
    return sum((c + 1) * pr for c, pr in enumerate(contention_pmf(group_size)))


def printed_decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def matches_paper(group_size: int) -> list[dict]:
    """Each printed entry of Table 2 for this N against the computed value rounded to the printed precision."""
    pmf = contention_pmf(group_size)
    rows = []
    for level, text in enumerate(PAPER_TABLE2[group_size], start=1):
        decimals = printed_decimals(text)
        ours = round(100 * pmf[level - 1], decimals)
        rows.append({"level": level, "paper_percent": text, "computed_percent": 100 * pmf[level - 1],
                     "computed_rounded": ours, "match": math.isclose(ours, float(text), abs_tol=10 ** -(decimals + 6))})
    return rows


def measured_levels(intervals) -> dict[int, float]:
    """Pr[C = c] measured from pull spans, as the simulator counts it: at a random moment of a random pull, the
    number of pulls (itself included) reading from the same source.

    intervals: (destination, source, start, end) tuples on one clock (`CopyEngineTransport.source_intervals`
    without the layer). Time-weighted: while k pulls read one source, each of the k is at level k.
    """
    by_source: dict[int, list[tuple[float, int]]] = {}
    for dst, src, start, end in intervals:
        if end < start or dst == src:
            raise ValueError(f"bad pull span {dst} <- {src}: [{start}, {end}]")
        by_source.setdefault(src, []).extend(((start, 1), (end, -1)))
    level_time: dict[int, float] = {}
    for edges in by_source.values():
        edges.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant: touching is not overlap
        active, last = 0, None
        for at, change in edges:
            if active and at > last:
                level_time[active] = level_time.get(active, 0.0) + active * (at - last)
            active, last = active + change, at
    total = sum(level_time.values())
    return {c: t / total for c, t in sorted(level_time.items())} if total else {}
