"""Query latency in a fixed-bucket histogram, and percentiles read off it. Pure.

The query path records each latency in the fixed buckets of :class:`LatencyHistogram` (one
bisection, one increment); percentiles are read off the cumulative counts when ``stats`` asks,
and the metrics export the buckets as they are. The answer is the bucket's upper bound, so a
percentile is exact to the bucket's width. :func:`percentiles` works on any ``bounds`` and
``counts`` (one count per bound, then one for anything slower).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Final

import attrs

#: Upper bounds (seconds) of the latency buckets: a query is normally answered in tens of
#: microseconds; the top buckets catch waits for the disk (a new block is fsynced first).
LATENCY_BOUNDS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: The percentiles ``stats`` reports.
FRACTIONS: Final = (0.5, 0.9, 0.99, 0.999)


def percentile(bounds: Sequence[float], counts: Sequence[int], fraction: float) -> float | None:
    """The upper bound of the bucket holding the *fraction* quantile, in seconds.

    None when nothing was recorded; ``inf`` when the quantile lies past the last bound.
    """
    total = sum(counts)
    if not total:
        return None
    rank = max(1, round(fraction * total))
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return bounds[index] if index < len(bounds) else float("inf")
    return float("inf")  # pragma: no cover - the loop always reaches the rank


def percentiles(
    bounds: Sequence[float], counts: Sequence[int], fractions: Sequence[float] = FRACTIONS
) -> dict[str, float | None]:
    """Percentiles in milliseconds keyed ``p50``, ``p90``, ``p99``, ``p99_9``.

    Empty when nothing was recorded; a value is None when it lies beyond the last bound, which
    JSON cannot write as a number.
    """
    out: dict[str, float | None] = {}
    for fraction in fractions:
        value = percentile(bounds, counts, fraction)
        if value is not None:
            key = f"p{fraction * 100:g}".replace(".", "_")
            out[key] = None if value == float("inf") else round(value * 1000, 3)
    return out


class LatencyHistogram:
    """Counts of answers per latency bucket: one bisect and one integer add per query."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one answer that took *seconds*."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> LatencySnapshot:
        """The counts as they are now, as a value that later queries do not change."""
        return LatencySnapshot(self.bounds, tuple(self.counts), self.total)


@attrs.frozen
class LatencySnapshot:
    """The histogram at one moment: what ``stats`` and the metrics report."""

    bounds: tuple[float, ...]
    #: One count per bound, then one for anything slower.
    counts: tuple[int, ...]
    #: Sum of all observed latencies, in seconds.
    total: float

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, count of observations <= le)``, ending with +Inf."""
        out = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out
