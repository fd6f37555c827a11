"""Prometheus metrics: cheap counting on the query path, text exposition on demand.

The query path only bumps plain integers (the server's counters, and one slot of
:class:`LatencyHistogram`); nothing here runs until something scrapes. The exposition format
itself comes from ``prometheus_client``: a collector turns the daemon's own counters into metric
families at scrape time and ``generate_latest`` writes them. Its metric objects (a lock per
increment) and its threaded HTTP server are not used; the HTTP endpoint is a tiny trio
responder in :mod:`spamguardd.daemon.metrics_http`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from spamguardd.core.policy import PolicyStatistics

if TYPE_CHECKING:
    from spamguardd.daemon.query_server import ServerStatistics

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

#: Event counters other parts of the daemon feed, present (at zero) from the start so that
#: dashboards and alerts never see them appear out of nowhere. Add a name here to add one.
EVENT_COUNTERS: Final = {
    "unblocks": "Blocks lifted (by an admin).",
    "notices_sent": "Abuse notices delivered.",
    "notices_failed": "Abuse notices that could not be delivered after retries.",
    "notices_dropped": "Abuse notices dropped because the notice queue was full.",
}

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


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

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, count of observations <= le)``, ending with +Inf."""
        out = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class _Collector(Collector):
    def __init__(
        self,
        policy: PolicyStatistics,
        server: ServerStatistics,
        latency: LatencyHistogram,
        auto_blocks: int,
        events: Mapping[str, int],
    ) -> None:
        self.policy = policy
        self.server = server
        self.latency = latency
        self.auto_blocks = auto_blocks
        self.events = events

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "spamguardd_queries",
            "Queries answered, by verb and verdict.",
            labels=["verb", "verdict"],
        )
        for (verb, verdict), count in sorted(self.server.queries.items()):
            queries.add_metric([verb, verdict], count)
        yield queries
        yield CounterMetricFamily(
            "spamguardd_blocks", "Users blocked by the policy.", value=self.auto_blocks
        )
        for name, documentation in EVENT_COUNTERS.items():
            yield CounterMetricFamily(
                f"spamguardd_{name}", documentation, value=self.events.get(name, 0)
            )
        yield CounterMetricFamily(
            "spamguardd_protocol_errors",
            "Requests answered with error, or clients gone before their answer.",
            value=self.server.protocol_errors,
        )
        yield CounterMetricFamily(
            "spamguardd_internal_errors",
            "Queries that hit a bug (answered error; see the log).",
            value=self.server.internal_errors,
        )
        yield CounterMetricFamily(
            "spamguardd_busy", "Connections turned away with defer.", value=self.server.busy
        )
        yield CounterMetricFamily(
            "spamguardd_store_failures",
            "Block-list writes that failed (the block held in memory).",
            value=self.server.store_failures,
        )
        yield GaugeMetricFamily(
            "spamguardd_tracked_users", "Users being counted.", value=self.policy.tracked_users
        )
        yield GaugeMetricFamily(
            "spamguardd_blocked_users", "Users in the block list.", value=self.policy.blocked_users
        )
        yield GaugeMetricFamily(
            "spamguardd_open_connections",
            "Connections waiting for their request or for the disk.",
            value=self.server.open_connections,
        )
        yield HistogramMetricFamily(
            "spamguardd_query_duration_seconds",
            "Time from accepting a query to its decision.",
            buckets=self.latency.cumulative(),
            sum_value=self.latency.total,
        )


def render_metrics(
    policy: PolicyStatistics,
    server: ServerStatistics,
    latency: LatencyHistogram,
    *,
    auto_blocks: int = 0,
    events: Mapping[str, int] | None = None,
) -> str:
    """The current metrics in the Prometheus text format (for HTTP and ``spamguardctl``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(policy, server, latency, auto_blocks, events or {}))
    return generate_latest(registry).decode()
