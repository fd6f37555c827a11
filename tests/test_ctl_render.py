"""spamguardctl's tables, rendered in-process from the typed replies the daemon sends."""

from __future__ import annotations

import io

import attrs
import pytest

from spamguardd.core import adminproto
from spamguardd.core.adminproto import (
    BlockCounts,
    BlockFileInfo,
    BlockInfo,
    BlockReply,
    ErrorCounts,
    EximReport,
    FailureInfo,
    JournalNotes,
    ListReply,
    MessageOutcome,
    MetricsReply,
    ReloadReply,
    ResetReply,
    ShowReply,
    StatsReply,
    UnblockReply,
    WindowInfo,
)
from spamguardd.ctl.render import render

BLOCK = BlockInfo(
    user="auth:m",
    since="2026-11-28T01:02:03Z",
    reason="5 failed recipients within 1h",
    by="auto",
    verdict="freeze",
)


def rendered(reply: adminproto.Reply) -> str:
    out = io.StringIO()
    render(reply, out)
    return out.getvalue()


def test_list() -> None:
    """One aligned row per block; an empty list says so."""
    assert rendered(ListReply(blocked=())) == "no blocked users\n"
    assert rendered(ListReply(blocked=(BLOCK,))) == (
        "USER    SINCE                 BY    VERDICT  REASON\n"
        "auth:m  2026-11-28T01:02:03Z  auto  freeze   5 failed recipients within 1h\n"
    )


def test_show() -> None:
    """Status, windows, recent failures, history and journal notes, in that order."""
    reply = ShowReply(
        user="auth:m",
        blocked=True,
        block=BLOCK,
        exempt=False,
        mode="monitor",
        windows=(
            WindowInfo(limit="5/1h", counted=5, tokens_left=0.0, clears_at="2026-11-28T02:02:03Z"),
        ),
        recent_failures=(FailureInfo(rcpt="r4@x.test", ip=None, at="2026-11-28T01:02:03Z"),),
        history=({"at": "2026-11-28T01:02:03Z", "event": "block", "actor": "auto", "reason": "x"},),
        journal=JournalNotes(truncated_line=7, damaged_lines=(2, 3)),
    )
    assert rendered(reply).splitlines() == [
        "user:     auth:m",
        (
            "status:   blocked since 2026-11-28T01:02:03Z by auto (verdict freeze): "
            "5 failed recipients within 1h"
        ),
        "mode:     monitor (nobody is blocked by counting)",
        "",
        "WINDOW LIMIT  COUNTED  TOKENS LEFT  CLEARS AT",
        "5/1h          5        0.00         2026-11-28T02:02:03Z",
        "",
        "recent failed recipients (newest first):",
        "  AT                    RECIPIENT  CLIENT IP",
        "  2026-11-28T01:02:03Z  r4@x.test  -",
        "",
        "history:",
        "  AT                    EVENT  ACTOR  REASON",
        "  2026-11-28T01:02:03Z  block  auto   x",
        "note: the journal's last line (7) is truncated (a write cut short); it was skipped",
        "note: damaged journal lines skipped: 2, 3",
    ]


def test_block_and_unblock() -> None:
    """A new block, one already in force, and an unblock with the mail it released."""
    assert rendered(BlockReply(user="auth:m", changed=True, block=BLOCK)) == (
        "blocked auth:m (verdict freeze): 5 failed recipients within 1h\n"
    )
    assert rendered(BlockReply(user="auth:m", changed=False, block=BLOCK)).startswith(
        "auth:m was already blocked since 2026-11-28T01:02:03Z by auto"
    )
    released = EximReport(
        action="release",
        messages=(
            MessageOutcome(id="1a", ok=True, exim_said="Message 1a is no longer frozen"),
            MessageOutcome(id="1b", ok=False, exim_said="no such message"),
        ),
    )
    assert rendered(UnblockReply(user="auth:m", unblocked=BLOCK, exim=released)) == (
        "unblocked auth:m\nreleased 1a: Message 1a is no longer frozen\n"
    )
    nothing = EximReport(action="remove")
    assert rendered(UnblockReply(user="auth:m", unblocked=BLOCK, exim=nothing)) == (
        "unblocked auth:m\nno frozen messages of this user in the queue\n"
    )


def test_stats_reset_reload_metrics() -> None:
    """The counters people look at, and the one-line answers."""
    stats = StatsReply(
        version="1.0",
        started_at="2026-11-28T00:00:00Z",
        uptime_seconds=60,
        mode="enforce",
        queries={"rcpt": {"accept": 4, "freeze": 1}},
        queries_total=5,
        blocks=BlockCounts(auto=1, admin=2),
        unblocks=3,
        tracked_users=7,
        blocked_users=1,
        would_block_users=0,
        open_connections=0,
        errors=ErrorCounts(protocol=1, internal=0, busy=0, store=0, admin=2),
        latency_ms={"p50": 0.1, "p99_9": None},
    )
    text = rendered(stats)
    assert "blocks made:    1 automatic, 2 by admins; 3 unblocks\n" in text
    assert "errors:         2 admin, 0 busy, 0 internal, 1 protocol, 0 store\n" in text
    assert "latency:        p50 <= 0.1 ms, p99.9 <= >10000 ms\n" in text
    assert text.endswith(
        "queries (5):\n  VERB  VERDICT  COUNT\n  rcpt  accept   4\n  rcpt  freeze   1\n"
    )
    assert rendered(ResetReply(user="auth:m")) == "forgot the counters of auth:m\n"
    reload = ReloadReply(config="/etc/x.toml", needs_restart=("server",), carried_users=2)
    assert rendered(reload) == (
        "reloaded the configuration from /etc/x.toml\n"
        "counters of 2 users carried over to the new limits\n"
        "note: server changed; takes effect at the next start\n"
    )
    assert rendered(MetricsReply(text="m 1\n")) == "m 1\n"
    assert "BLOCK FILE" not in text
    failing = attrs.evolve(
        stats,
        block_file=BlockFileInfo(
            ok=False,
            failing_since="2026-11-28T00:00:05Z",
            error="/var/lib/spamguardd/blocked: cannot write: No space left on device",
            unsaved_users=3,
        ),
    )
    assert (
        "BLOCK FILE:     NOT WRITABLE since 2026-11-28T00:00:05Z: /var/lib/spamguardd/blocked: "
        "cannot write: No space left on device; 3 users unsaved, block verdicts are defer, "
        "retrying\n"
    ) in rendered(failing)


@pytest.mark.parametrize("kind", sorted(set(adminproto.REPLY_TYPES.values()), key=str))
def test_every_reply_has_a_renderer(kind: type) -> None:
    """A new reply type cannot ship without its table."""
    assert render.dispatch(kind) is not render.dispatch(object)


def test_what_came_from_the_network_cannot_drive_the_terminal() -> None:
    """A spammer's recipient or key with escape sequences, bells or newlines is shown escaped:
    no colour change, no forged table line (the JSON output carries it as it is)."""
    hostile = "\x1b[31mred\x07\r\nfake  line"
    reply = ShowReply(
        user="auth:a\nb",
        blocked=False,
        block=None,
        exempt=False,
        mode="enforce",
        windows=(),
        recent_failures=(FailureInfo(rcpt=hostile, ip=None, at="2026-11-28T01:02:03Z"),),
        history=(),
        journal=JournalNotes(truncated_line=None, damaged_lines=()),
    )
    text = rendered(reply)
    assert not any(c in text for c in "\x1b\x07\r")
    assert "\\x1b[31mred\\x07\\r\\nfake  line" in text
    assert text.splitlines()[0] == "user:     auth:a\\nb"
