"""The daemon's counters as one value: what ``stats`` shows and what the metrics export. Pure.

Each part of the daemon counts its own events with plain integers (cheap on the query path) and
gives a frozen snapshot of them through ``statistics()``, in the manner of trio's
``statistics()`` methods; :class:`Statistics` gathers the snapshots of one moment, and both the
admin ``stats`` reply and the Prometheus exposition are rendered from it, so the two never
disagree.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from spamguardd.core.latency import LatencySnapshot
from spamguardd.core.policy import PolicyStatistics


@attrs.frozen
class ServerStatistics:
    """The query server's counters."""

    #: Answers by (verb, verdict).
    queries: Mapping[tuple[str, str], int]
    protocol_errors: int
    internal_errors: int
    busy: int
    open_connections: int


@attrs.frozen
class EffectStatistics:
    """What the effects executor carried out (blocks, unblocks, resets) and what failed."""

    auto_blocks: int
    admin_blocks: int
    unblocks: int
    resets: int
    would_blocks: int
    #: Block-list writes that failed (the change held in memory).
    store_failures: int
    #: Journal entries that could not be written (the change itself stands).
    journal_failures: int
    #: Users whose block or unblock is in memory but not yet in the block file.
    unsaved_users: int = 0
    #: While block-file writes fail: the last error, and the wall-clock time they began to.
    store_error: str | None = None
    store_failing_since: float | None = None
    #: Early warnings (``limits.warn_at``) given.
    warnings: int = 0
    #: Of the automatic blocks, those made by the volume guard.
    volume_blocks: int = 0


@attrs.frozen
class NoticeStatistics:
    """The notice queue's counters."""

    queued: int
    sent: int
    failed: int
    dropped: int
    unsent: int
    retries: int
    hooks_ok: int
    hooks_failed: int


@attrs.frozen
class ClusterStatistics:
    """Fleet mode: the shared store's state as this relay sees it, and what went through it."""

    #: This relay's name in the fleet.
    relay: str
    #: The store's address (never its password).
    store: str
    #: Whether the store answers; False means degraded (counting locally).
    up: bool
    #: Wall-clock time the store went away, None while it is up.
    down_since: float | None
    #: Times the store went away since the start.
    outages: int
    #: Failed recipients counted in the store, and locally because it was away or slow.
    store_counts: int
    local_counts: int
    #: Queries that gave up waiting for the store (``cluster.timeout``), and store errors.
    timeouts: int
    errors: int
    #: Blocks, unblocks and resets made on other relays and applied here.
    remote_changes: int
    #: Blocks made here while the store was away, pushed to it when it came back.
    pushed: int


@attrs.frozen
class ExpiryStatistics:
    """Blocks that expire (``block.expire``): the setting and what was done with it."""

    #: The steps as configured (``24h, 7d, forever``) and the span they escalate within.
    steps: str
    repeat_within: float
    #: Blocks lifted because their time was up, since the start.
    lifted: int
    #: Users with automatic blocks in the span (the history escalation counts).
    repeat_users: int
    #: Wall-clock time of the next lift to look at; None when no block expires.
    next_at: float | None


@attrs.frozen
class Statistics:
    """Everything ``stats`` and the metrics report, taken at one moment."""

    version: str
    #: Wall-clock time the daemon started, seconds since the epoch.
    started_at: float
    #: Wall-clock time of this snapshot.
    now: float
    mode: str
    policy: PolicyStatistics
    server: ServerStatistics
    effects: EffectStatistics
    notices: NoticeStatistics
    latency: LatencySnapshot
    #: Admin requests refused as malformed, or that hit a bug.
    admin_errors: int
    #: Fleet mode's statistics; None for a single host.
    cluster: ClusterStatistics | None = None
    #: Blocks that expire; None when none do (``block.expire`` is ``forever``).
    expiry: ExpiryStatistics | None = None
