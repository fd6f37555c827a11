"""``spamguardctl``'s output for people: one renderer per reply type, plain text tables.

Scripts use ``--json`` (the reply as the daemon wrote it); these renderers are for a terminal.
They take the typed replies of :mod:`spamguardd.core.adminproto`, so a field that is renamed or
retyped there fails the type check here, not at an admin's prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from spamguardd.core.adminproto import (
    BlockInfo,
    BlockReply,
    ErrorReply,
    JournalNotes,
    ListReply,
    MetricsReply,
    ReloadReply,
    Reply,
    ResetReply,
    ShowReply,
    StatsReply,
    UnblockReply,
)
from spamguardd.core.expiry import ordinal
from spamguardd.core.notice import printable


@functools.singledispatch
def render(reply: Reply, out: TextIO) -> None:  # noqa: ARG001 - every renderer's signature
    """Write *reply* for people to *out*."""
    raise TypeError(f"no renderer for {type(reply).__name__}")  # pragma: no cover


def _lasting(block: BlockInfo) -> str:
    """``until 2026-12-03 10:00:00 UTC, 2nd block in 30d`` (or ``for good``)."""
    until = "for good" if block.until is None else f"until {_people_time(block.until)}"
    if block.nth is None:
        return until
    return f"{until}, {ordinal(block.nth)} block in {block.repeat_within}"


def _people_time(iso: str) -> str:
    """``2026-12-03T10:00:00Z`` as ``2026-12-03 10:00:00 UTC``."""
    return iso.replace("T", " ").removesuffix("Z") + " UTC"


def _table(rows: Iterable[Sequence[object]], out: TextIO) -> None:
    # values such as user keys and recipients come from the network: no control character of
    # theirs reaches the admin's terminal, and no newline of theirs makes a line of its own
    cells = [["-" if value is None else printable(str(value)) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


@render.register
def _(reply: ListReply, out: TextIO) -> None:
    if not reply.blocked:
        out.write("no blocked users\n")
        return
    if any(b.until is not None for b in reply.blocked):
        rows: list[Sequence[object]] = [("USER", "SINCE", "UNTIL", "BY", "VERDICT", "REASON")]
        rows += [
            (b.user, b.since, b.until or "never", b.by, b.verdict, b.reason) for b in reply.blocked
        ]
    else:  # nothing expires: the table as it always was
        rows = [("USER", "SINCE", "BY", "VERDICT", "REASON")]
        rows += [(b.user, b.since, b.by, b.verdict, b.reason) for b in reply.blocked]
    _table(rows, out)


def _status(reply: ShowReply, out: TextIO) -> None:
    """``show``'s status lines: blocked or not, and how long a block lasts."""
    block = reply.block
    if block is None:
        out.write("status:   not blocked\n")
        return
    out.write(
        f"status:   blocked since {block.since} by {printable(block.by)} "
        f"(verdict {block.verdict}): {printable(block.reason)}\n"
    )
    if block.until is not None or block.nth is not None:
        out.write(f"lasts:    {_lasting(block)}\n")


@render.register
def _(reply: ShowReply, out: TextIO) -> None:
    out.write(f"user:     {printable(reply.user)}\n")
    _status(reply, out)
    repeats = reply.repeats
    if repeats is not None:
        out.write(
            f"repeats:  {repeats.blocks} automatic block(s) in the last {repeats.within}; "
            f"the next would last {repeats.next_lasts}\n"
        )
    if reply.exempt:
        out.write("exempt:   yes (listed in exempt.users; never counted)\n")
    if reply.mode != "enforce":
        out.write(f"mode:     {reply.mode} (nobody is blocked by counting)\n")
    if reply.counted_in == "fleet":
        out.write("counted:  fleet-wide, in the shared store\n")
    elif reply.counted_in is not None:
        out.write("counted:  on this relay only (the shared store did not answer)\n")
    out.write("\n")
    rows: list[Sequence[object]] = [("WINDOW LIMIT", "COUNTED", "TOKENS LEFT", "CLEARS AT")]
    rows += [
        (w.limit, w.counted, f"{w.tokens_left:.2f}", w.clears_at or "full now")
        for w in reply.windows
    ]
    _table(rows, out)
    if reply.accepted_windows:
        out.write("\n")
        rows = [("ACCEPTED LIMIT", "TOKENS LEFT", "CLEARS AT")]
        rows += [
            (w.limit, f"{w.tokens_left:.2f}", w.clears_at or "full now")
            for w in reply.accepted_windows
        ]
        _table(rows, out)
    warned = [w.limit for w in (*reply.windows, *reply.accepted_windows) if w.warned]
    if warned:
        out.write(f"warned:   {', '.join(warned)} (limits.warn_at reached; nothing blocked)\n")
    out.write("\nrecent failed recipients (newest first):\n")
    if reply.recent_failures:
        _table(
            [("  AT", "RECIPIENT", "CLIENT IP")]
            + [(f"  {f.at}", f.rcpt, f.ip) for f in reply.recent_failures],
            out,
        )
    else:
        out.write("  none in the sample\n")
    out.write("\nhistory:\n")
    if reply.history:
        _history(reply.history, out)
    else:
        out.write("  no journal entries\n")
    _journal_notes(reply.journal, out)


def _history(history: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    """The journal entries; in fleet mode, with the relay each change was made on."""
    fleet = any("relay" in e for e in history)
    header = (
        ("  AT", "EVENT", "ACTOR", "RELAY", "REASON")
        if fleet
        else ("  AT", "EVENT", "ACTOR", "REASON")
    )
    rows: list[Sequence[object]] = [header]
    for e in history:
        relay = (e.get("relay", "(here)"),) if fleet else ()
        rows.append(
            (f"  {e.get('at')}", e.get("event"), e.get("actor"), *relay, e.get("reason", ""))
        )
    _table(rows, out)


def _journal_notes(journal: JournalNotes, out: TextIO) -> None:
    """What ``show`` could not take from the journal."""
    if journal.truncated_line is not None:
        out.write(
            f"note: the journal's last line ({journal.truncated_line}) is truncated "
            "(a write cut short); it was skipped\n"
        )
    if journal.damaged_lines:
        lines = ", ".join(map(str, journal.damaged_lines))
        out.write(f"note: damaged journal lines skipped: {lines}\n")
    if journal.unreadable is not None:
        out.write(f"note: no history: {printable(journal.unreadable)}\n")


@render.register
def _(reply: BlockReply, out: TextIO) -> None:
    block = reply.block
    if reply.changed:
        user, reason = printable(reply.user), printable(block.reason)
        out.write(f"blocked {user} (verdict {block.verdict}): {reason}\n")
        if block.until is not None:
            out.write(f"lasts {_lasting(block)}\n")
    else:
        out.write(
            f"{reply.user} was already blocked since {block.since} by {block.by}: {block.reason}\n"
        )


@render.register
def _(reply: UnblockReply, out: TextIO) -> None:
    if reply.unblocked is None:
        out.write(f"{printable(reply.user)} is not blocked (lifted already); this host's queue:\n")
    else:
        out.write(f"unblocked {printable(reply.user)}\n")
    exim = reply.exim
    if exim is None:
        return
    done = "released" if exim.action == "release" else "removed"
    if not exim.messages and exim.error is None:
        out.write("no frozen messages of this user in the queue\n")
    out.writelines(
        f"{done} {message.id}: {message.exim_said}\n" for message in exim.messages if message.ok
    )


@render.register
def _(reply: ResetReply, out: TextIO) -> None:
    out.write(f"forgot the counters of {printable(reply.user)}\n")


@render.register
def _(reply: StatsReply, out: TextIO) -> None:
    out.write(f"version:        {reply.version}\n")
    out.write(f"started at:     {reply.started_at} (up {reply.uptime_seconds} s)\n")
    out.write(f"mode:           {reply.mode}\n")
    out.write(f"tracked users:  {reply.tracked_users}\n")
    out.write(f"blocked users:  {reply.blocked_users}\n")
    out.write(
        f"blocks made:    {reply.blocks.auto} automatic, {reply.blocks.admin} by admins; "
        f"{reply.unblocks} unblocks\n"
    )
    if reply.blocks.volume:
        out.write(f"volume guard:   {reply.blocks.volume} of the automatic blocks\n")
    out.write(f"warnings:       {reply.warnings} (limits.warn_at)\n")
    errors = reply.errors
    out.write(
        f"errors:         {errors.admin} admin, {errors.busy} busy, {errors.internal} internal, "
        f"{errors.protocol} protocol, {errors.store} store\n"
    )
    block_file = reply.block_file
    if not block_file.ok:
        out.write(
            f"BLOCK FILE:     NOT WRITABLE since {block_file.failing_since}: {block_file.error}; "
            f"{block_file.unsaved_users} users unsaved, block verdicts are defer, retrying\n"
        )
    expiry = reply.expiry
    if expiry is not None:
        upcoming = "" if expiry.next_at is None else f"; next at {expiry.next_at}"
        out.write(
            f"blocks expire:  {expiry.steps} (steps within {expiry.repeat_within}); "
            f"{expiry.lifted} lifted, {expiry.repeat_users} users in the history{upcoming}\n"
        )
    fleet = reply.cluster
    if fleet is not None:
        state = "up" if fleet.up else f"DOWN since {fleet.down_since}, counting locally"
        out.write(f"fleet:          relay {fleet.relay}, store {fleet.store}: {state}\n")
        out.write(
            f"fleet counting: {fleet.store_counts} in the store, {fleet.local_counts} locally; "
            f"{fleet.outages} outages, {fleet.timeouts} timeouts, {fleet.errors} errors; "
            f"{fleet.remote_changes} changes from other relays, {fleet.pushed} blocks pushed\n"
        )
    if reply.latency_ms:
        parts = ", ".join(
            f"{key.replace('_', '.')} <= {'>10000' if value is None else value} ms"
            for key, value in reply.latency_ms.items()
        )
        out.write(f"latency:        {parts}\n")
    out.write(f"\nqueries ({reply.queries_total}):\n")
    rows: list[Sequence[object]] = [("  VERB", "VERDICT", "COUNT")]
    rows += [
        (f"  {verb}", verdict, count)
        for verb, verdicts in reply.queries.items()
        for verdict, count in verdicts.items()
    ]
    _table(rows, out)


@render.register
def _(reply: ReloadReply, out: TextIO) -> None:
    out.write(f"reloaded the configuration from {reply.config}\n")
    if reply.carried_users:
        out.write(f"counters of {reply.carried_users} users carried over to the new limits\n")
    out.writelines(
        f"note: {name} changed; takes effect at the next start\n" for name in reply.needs_restart
    )


@render.register
def _(reply: MetricsReply, out: TextIO) -> None:
    out.write(reply.text)


@render.register
def _(reply: ErrorReply, out: TextIO) -> None:
    out.write(f"error: {printable(reply.error)}\n")
