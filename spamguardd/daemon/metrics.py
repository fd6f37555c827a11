"""Prometheus metrics: the daemon's :class:`~spamguardd.core.statistics.Statistics`, as text.

The query path only bumps plain integers (the parts' counters, one slot of the latency
histogram); nothing here runs until something scrapes. The exposition format itself comes from
``prometheus_client``: a collector turns one :class:`Statistics` value into metric families at
scrape time and ``generate_latest`` writes them. Its metric objects (a lock per increment) and
its threaded HTTP server are not used; the HTTP endpoint is a tiny trio responder in
:mod:`spamguardd.daemon.metrics_http`. ``spamguardctl stats`` reads the same value, so the two
never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from spamguardd.core.statistics import Statistics

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class _Collector(Collector):
    def __init__(self, stats: Statistics) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        queries = CounterMetricFamily(
            "spamguardd_queries",
            "Queries answered, by verb and verdict.",
            labels=["verb", "verdict"],
        )
        for (verb, verdict), count in sorted(stats.server.queries.items()):
            queries.add_metric([verb, verdict], count)
        yield queries
        counters = (
            ("blocks", "Users blocked by the policy.", stats.effects.auto_blocks),
            ("admin_blocks", "Users blocked by an admin.", stats.effects.admin_blocks),
            (
                "volume_blocks",
                "Users blocked by the volume guard (accepted recipients), of the blocks.",
                stats.effects.volume_blocks,
            ),
            ("unblocks", "Blocks lifted (by an admin).", stats.effects.unblocks),
            (
                "warnings",
                "Early warnings given (limits.warn_at), once per user and window.",
                stats.effects.warnings,
            ),
            ("notices_sent", "Abuse notices delivered.", stats.notices.sent),
            (
                "notices_failed",
                "Abuse notices that could not be delivered after retries.",
                stats.notices.failed,
            ),
            (
                "hooks_failed",
                "Events whose hook still failed after its retries (see hook_finished).",
                stats.notices.hooks_failed,
            ),
            ("hooks_ok", "Events whose hook ran and exited 0.", stats.notices.hooks_ok),
            (
                "notices_dropped",
                "Abuse notices dropped because the notice queue was full.",
                stats.notices.dropped,
            ),
            (
                "protocol_errors",
                "Requests answered with error, or clients gone before their answer.",
                stats.server.protocol_errors,
            ),
            (
                "internal_errors",
                "Queries that hit a bug (answered error; see the log).",
                stats.server.internal_errors,
            ),
            ("busy", "Waiting connections shed with defer.", stats.server.busy),
            (
                "store_failures",
                (
                    "Block verdicts deferred and admin changes refused because the block file "
                    "could not be written (the change held in memory)."
                ),
                stats.effects.store_failures,
            ),
            (
                "journal_failures",
                "Journal entries that could not be written (the change itself stood).",
                stats.effects.journal_failures,
            ),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(f"spamguardd_{name}", documentation, value=value)
        gauges = (
            ("tracked_users", "Users being counted.", stats.policy.tracked_users),
            ("blocked_users", "Users in the block list.", stats.policy.blocked_users),
            (
                "open_connections",
                "Connections waiting for their request or for the disk.",
                stats.server.open_connections,
            ),
            (
                "block_file_ok",
                "1 while the block file takes writes; 0 while it refuses (block verdicts defer).",
                int(stats.effects.store_error is None),
            ),
            (
                "unsaved_users",
                "Users whose block or unblock is in memory but not yet in the block file.",
                stats.effects.unsaved_users,
            ),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(f"spamguardd_{name}", documentation, value=value)
        fleet = stats.cluster
        if fleet is not None:
            yield GaugeMetricFamily(
                "spamguardd_cluster_up",
                "1 while the fleet's shared store answers; 0 while counting locally (degraded).",
                value=int(fleet.up),
            )
            fleet_counters = (
                (
                    "cluster_store_counts",
                    "Failed recipients counted in the store.",
                    fleet.store_counts,
                ),
                (
                    "cluster_local_counts",
                    "Failed recipients counted locally because the store was away or slow.",
                    fleet.local_counts,
                ),
                ("cluster_outages", "Times the shared store went away.", fleet.outages),
                (
                    "cluster_timeouts",
                    "Queries that stopped waiting for the store (cluster.timeout).",
                    fleet.timeouts,
                ),
                (
                    "cluster_remote_changes",
                    "Blocks, unblocks and resets made on other relays and applied here.",
                    fleet.remote_changes,
                ),
                (
                    "cluster_pushed_blocks",
                    (
                        "Blocks this relay had and the store had not, written to it when it "
                        "came back (made here while it was away, or lost by a store that "
                        "restarted empty)."
                    ),
                    fleet.pushed,
                ),
            )
            for name, documentation, value in fleet_counters:
                yield CounterMetricFamily(f"spamguardd_{name}", documentation, value=value)
        yield HistogramMetricFamily(
            "spamguardd_query_duration_seconds",
            "Time from accepting a query to its answer written.",
            buckets=stats.latency.cumulative(),
            sum_value=stats.latency.total,
        )


def render_metrics(stats: Statistics) -> str:
    """*stats* in the Prometheus text format (for HTTP and ``spamguardctl metrics``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return generate_latest(registry).decode()
