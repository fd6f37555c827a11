"""Abuse notices: one block event as people need it, and the mail that tells them. Pure.

A :class:`Notice` is made from a policy effect (:meth:`Notice.from_effect`) and turned into a
complete message by :func:`build_message`; sending it is the daemon's business
(:mod:`spamguardd.daemon.notices`). Everything here that comes from the network (user keys,
recipients) is shown escaped: a newline in a key must not start a header or a fake line, and
bytes that are not UTF-8 must show as what they are.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import enum
import shlex
from email.message import EmailMessage
from typing import Final

import attrs

from spamguardd.core.config import NotifyConfig
from spamguardd.core.policy import (
    EXPIRY_ACTOR,
    Blocked,
    Effect,
    FailureSample,
    Unblocked,
    Warned,
    WouldBlock,
)
from spamguardd.core.protocol import Verdict
from spamguardd.core.rate import Rate
from spamguardd.core.timestamps import format_time

#: Headers are folded only past RFC 5322's hard limit of 998: folding at 78 puts a long Subject
#: or Message-ID on a continuation line, which some readers (Python's among them) show with a
#: leading space.
_POLICY: Final = email.policy.default.clone(max_line_length=998)


class NoticeEvent(enum.StrEnum):
    """What happened to the user. The value is what the hook gets as its event argument."""

    BLOCKED = "blocked"
    WOULD_BLOCK = "would_block"
    WARNING = "warning"
    ADMIN_BLOCK = "admin_block"
    UNBLOCK = "unblock"


@attrs.frozen
class Notice:
    """One block event as people need it: who, when, why, the evidence, and how to undo it."""

    event: NoticeEvent
    user: str
    #: Wall-clock time of the event, seconds since the epoch.
    when: float
    #: Why, in words: ``"100 failed recipients within 1h"``, or an admin's reason.
    reason: str
    #: The verdict now in force for the user's mail (for ``would_block``: the one that would be).
    verdict: Verdict
    #: The window that tripped, for automatic blocks and would-blocks.
    rate: Rate | None = None
    #: The user's latest counted failures, oldest first.
    samples: tuple[FailureSample, ...] = ()
    #: Who acted: ``auto`` for the policy, ``admin`` (or ``admin:UID``) for an admin.
    by: str = "auto"
    #: What *rate* counts: failed recipients, or accepted ones (the volume guard).
    counted: str = "failed recipients"
    #: When a block lifts itself (``block.expire``, ``block --for``); None: never.
    until: float | None = None

    @classmethod
    def from_effect(cls, effect: Effect, *, verdict: Verdict, when: float) -> Notice | None:
        """The notice for a policy effect; None for an effect nobody is told of (a reset).

        Args:
            effect: what the policy returned.
            verdict: the configured block verdict.
            when: wall-clock time of the effect (effects that carry their own time ignore it).
        """
        if isinstance(effect, Blocked):
            block = effect.block
            return cls(
                NoticeEvent.BLOCKED if effect.rate is not None else NoticeEvent.ADMIN_BLOCK,
                block.user,
                block.blocked_at,
                block.reason,
                verdict,
                rate=effect.rate,
                samples=effect.samples,
                by=block.by,
                counted=effect.counted,
                until=block.expires_at,
            )
        if isinstance(effect, WouldBlock):
            rate = effect.rate
            return cls(
                NoticeEvent.WOULD_BLOCK,
                effect.user,
                when,
                f"{rate.count} {effect.counted} within {_period(rate)}",
                verdict,
                rate=rate,
                samples=effect.samples,
                counted=effect.counted,
            )
        if isinstance(effect, Warned):
            rate = effect.rate
            return cls(
                NoticeEvent.WARNING,
                effect.user,
                effect.at,
                f"{effect.used} of {rate.count} {effect.counted} within {_period(rate)}",
                verdict,
                rate=rate,
                samples=effect.samples,
                counted=effect.counted,
            )
        if isinstance(effect, Unblocked):
            return cls(
                NoticeEvent.UNBLOCK,
                effect.block.user,
                effect.at,
                "unblocked",
                Verdict.ACCEPT,
                by=effect.by,
            )
        return None

    @property
    def client_ips(self) -> tuple[str, ...]:
        """Distinct client addresses in the samples, in order of first appearance."""
        return tuple(dict.fromkeys(str(s.ip) for s in self.samples if s.ip is not None))


# -- the message ------------------------------------------------------------------------------


def build_message(
    notice: Notice,
    config: NotifyConfig,
    *,
    sender: str,
    message_id: str | None = None,
) -> EmailMessage:
    """The abuse notice for *notice* as a complete UTF-8 message. Pure apart from the Message-ID.

    Args:
        notice: the event.
        config: recipients and subject prefix.
        sender: the From address (``config.sender`` or a default the caller chose).
        message_id: a fixed Message-ID (tests); by default a fresh one in the sender's domain
            (``make_msgid`` would otherwise ask DNS for the host's name).

    Returns:
        The message, headers and body set.
    """
    message = EmailMessage(policy=_POLICY)
    user = printable(notice.user)
    titles = {
        NoticeEvent.BLOCKED: f"blocked {user}: {notice.reason}",
        NoticeEvent.WOULD_BLOCK: f"WOULD BLOCK {user} (monitor mode): {notice.reason}",
        NoticeEvent.WARNING: f"WARNING {user}: {notice.reason}",
        NoticeEvent.ADMIN_BLOCK: f"admin blocked {user}: {printable(notice.reason)}",
        NoticeEvent.UNBLOCK: f"unblocked {user}",
    }
    message["Subject"] = f"{config.subject} {titles[notice.event]}".strip()
    message["From"] = sender
    message["To"] = ", ".join(config.to)
    message["Date"] = email.utils.format_datetime(dt.datetime.fromtimestamp(notice.when, dt.UTC))
    message["Message-ID"] = message_id or email.utils.make_msgid(
        "spamguardd", domain=sender.rpartition("@")[2] or "localhost"
    )
    # RFC 3834: no vacation replies or other automatic answers to this
    message["Auto-Submitted"] = "auto-generated"
    message["X-Spamguard-Event"] = notice.event.value
    body = _body(notice)
    # quoted-printable rather than 8bit for non-ASCII keys: a relay without 8BITMIME takes it
    message.set_content(body, charset="utf-8", cte="7bit" if body.isascii() else "quoted-printable")
    return message


_HEADLINES: Final = {
    NoticeEvent.WOULD_BLOCK: (
        "MONITOR MODE: nothing was blocked. spamguardd WOULD HAVE BLOCKED this user."
    ),
    NoticeEvent.WARNING: (
        "WARNING: nothing was blocked. This user is on its way to a block by spamguardd."
    ),
    NoticeEvent.UNBLOCK: "spamguardd lifted the block of this user; its mail is accepted again.",
}


def _verdict_line(notice: Notice) -> str:
    verdict = notice.verdict
    if notice.event is NoticeEvent.WOULD_BLOCK:
        return f'accept (in enforce mode it would be "{verdict}")'
    if notice.event is NoticeEvent.WARNING:
        return f'accept (at the limit it becomes "{verdict}")'
    if notice.event is NoticeEvent.UNBLOCK:
        return "accept (counting starts afresh)"
    return f'{verdict} (every further recipient of this user is answered "{verdict}")'


def _next_steps(notice: Notice, word: str) -> list[str]:
    if notice.event in {NoticeEvent.BLOCKED, NoticeEvent.ADMIN_BLOCK}:
        return [
            "Undo (lift the block and thaw the mail frozen meanwhile; Exim sends it at its next",
            "queue run, or at once with exim -M ID for each id the command prints):",
            f"  spamguardctl unblock {word} --release",
        ]
    if notice.event is NoticeEvent.WOULD_BLOCK:
        return ['To block such users, set mode = "enforce" in the configuration.']
    if notice.event is NoticeEvent.WARNING:
        return ["Block now (its mail is then frozen):", f"  spamguardctl block {word}"]
    if notice.event is NoticeEvent.UNBLOCK and notice.by == EXPIRY_ACTOR:
        return [
            "The block's time was up. Mail frozen meanwhile stays frozen; to release it:",
            f"  spamguardctl unblock {word} --release",
        ]
    return []


def _body(notice: Notice) -> str:
    user = printable(notice.user)
    word = shell_word(notice.user)
    lines: list[str] = []
    add = lines.append
    add(_HEADLINES.get(notice.event, "spamguardd blocked this user's outgoing mail."))
    add("")
    add(f"User:       {user}")
    add(f"When:       {format_time(notice.when)}")
    add(f"Event:      {notice.event.value} (by {printable(notice.by)})")
    add(f"Reason:     {printable(notice.reason)}")
    if notice.rate is not None:
        add(f"Window:     {notice.rate.count} {notice.counted} in {_period(notice.rate)}")
    add(f"Verdict:    {_verdict_line(notice)}")
    if notice.until is not None:
        add(f"Lasts:      until {format_time(notice.until)}, then it lifts itself")
    add(f"Client IPs: {', '.join(notice.client_ips) or '(none recorded)'}")
    if notice.samples:
        add("")
        add(f"Last {len(notice.samples)} failed recipients (oldest first):")
        lines.extend(
            f"  {format_time(s.at)}  {str(s.ip) if s.ip else '-':<15}  {printable(s.rcpt)}"
            for s in notice.samples
        )
    add("")
    add("Inspect:")
    add(f"  spamguardctl show {word}")
    lines.extend(_next_steps(notice, word))
    add("")
    add("-- ")
    add("spamguardd (automatic notice; replies are not read)")
    return "\n".join(lines) + "\n"


def undecodable_escaped(text: str) -> str:
    """*text* with the bytes that are not UTF-8 (kept as surrogates) written as ``\\xNN``: what a
    strict UTF-8 reader (a JSON parser, a terminal) can take."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """*text* for one line of a message: control characters and undecodable bytes escaped.

    User keys and recipients come from the network: a newline in one must not start a new header
    or a fake line in the body, and bytes that are not UTF-8 (kept as surrogates) must show.
    """
    raw = undecodable_escaped(text)
    if raw.isprintable():
        return raw
    return "".join(c if c.isprintable() else _escape(c) for c in raw)


def _escape(char: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def shell_word(text: str) -> str:
    """*text* quoted as one shell word that a person can paste, even with newlines in it.

    Printable text gets POSIX single quotes (:func:`shlex.quote`); anything else gets bash's
    ``$'...'`` form, which spells control characters and raw bytes as escapes.
    """
    if text.isprintable() and not _has_surrogates(text):
        return shlex.quote(text)
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        char = chr(byte)
        if char in "\\'":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def _has_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _period(rate: Rate) -> str:
    return str(rate).partition("/")[2]
