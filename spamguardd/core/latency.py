"""Latency percentiles from a fixed-bucket histogram: one list increment per query. Pure.

The query path records each latency in the fixed buckets of
:class:`spamguardd.daemon.metrics.LatencyHistogram` (one bisection, one increment); percentiles
are read off the cumulative counts when ``stats`` asks. The answer is the bucket's upper bound, so a
percentile is exact to the bucket's width. :func:`percentiles` works on any ``bounds`` and
``counts`` (one count per bound, then one for anything slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

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
