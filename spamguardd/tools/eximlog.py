"""Exim main-log and reject-log lines as typed events, and the user key the ACL would compute.

Pure code: :func:`parse_line` takes one line (as text) and returns an event, ``None`` for a line
that is well formed but of no interest, or :data:`UNPARSED`. It never raises, whatever the input.

The formats are Exim's own (spec, chapter "Log files"; ``receive.c`` for ``<=``, ``deliver.c``
for ``=>``/``->``/``**``, ``smtp_in.c``/``acl.c`` for ``rejected RCPT``), checked against Exim 4.96
output captured in ``tests/data/exim/``::

    2026-11-28 02:43:50 1xX8Pm-00035Q-0q <= s@example.test H=(helo) [127.0.0.1] P=esmtpa
        A=plain_server:alice@example.test S=232 for alice@example.test
    2026-11-28 02:43:50 H=(helo) [127.0.0.1] F=<s@example.test> A=plain_server:alice@example.test
        rejected RCPT <nobody@example.test>: Unrouteable address
    2026-11-28 02:43:52 1xX8Po-000363-1u ** badlate@remote.test R=fake_remote T=smtp ...: 550 ...

A line may carry, after the time, fractions of a second (``+millisec``/``+microsec``), a zone
(``log_timezone``) and ``[pid]`` (``+pid``); all are accepted. Exim writes the authenticated id
(``A=driver:id``) as ``$authenticated_id`` holds it (non-printing bytes as ``\\ooo`` escapes), but
unquoted: an id with spaces is read up to the next field Exim always writes after it (``S=`` on
``<=`` lines, `` rejected RCPT <`` on rejections).

Events are tuples (``NamedTuple``): a log has millions of lines, and building a tuple costs a
third of a frozen attrs instance.
"""

from __future__ import annotations

import calendar
import enum
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, NamedTuple

from spamguardd.core.userkey import IPV6_GROUP_PREFIX, UID, exim_mask, fold_auth_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Exim message ids: 4.96 and earlier ``1xX8Pm-00035Q-0q``; 4.97+ ``1xX8Pm-0000000035Q-0qqq``.
_MSGID: Final = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4} ")
# What may follow the time: fractions of a second, a zone, a process id.
_TIME_EXTRA: Final = re.compile(r"(?:\.(\d{1,6}))?(?: ?([+-])(\d\d)(\d\d))?(?: \[\d+\])? ")
# Reject-log header dumps and continuation lines: the message's headers after a DATA rejection
# ("Envelope-from: <..>", "P Received: ...", a flag letter or space, then a header), and indented
# continuations (also of multi-line main-log entries such as the TLS certificate warning), and
# the blank line Exim 4.96 writes after some panics ("Taint mismatch, ...").
_CONTINUATION: Final = re.compile(r"$|[ \t]|Envelope-(?:from|to): |[A-Z* ] [!-9;-~]+:")

#: Texts of rejected recipients that mean "the recipient failed verification": routing failures,
#: callout refusals (also from Exim's callout cache), unknown users as routers and remote servers
#: word them. Matched case-insensitively anywhere in the reason.
VERIFY_FAILURE_TEXTS: Final = (
    "unrouteable address",
    "callout verification failed",
    "callout verification failure",  # "Previous (cached) callout verification failure"
    "smtp error from remote mail server after rcpt to:",  # a callout's 5xx, as Exim logs it
    "unknown user",
    "user unknown",
    "no such user",
    "unknown local part",
    "unknown local-part",
    "mailbox unavailable",
    "mailbox unknown",
    "recipient address rejected",
    "all relevant mx records point to non-existent hosts",
)
_VERIFY_FAILURE: Final = re.compile("|".join(map(re.escape, VERIFY_FAILURE_TEXTS)), re.IGNORECASE)
#: How Exim itself words a callout's refusal: a reason containing it is a verification failure
#: without a search through the reason (which the remote server's text makes long and unique).
_CALLOUT_REFUSAL: Final = "SMTP error from remote mail server after RCPT TO:"
#: Reasons remembered with their verdict (most repeat: "Unrouteable address"), and the field
#: runs before `` rejected RCPT <`` remembered with what they hold (one per client and
#: sender). Both are emptied when full, so they stay bounded on any log.
_CACHE_SIZE: Final = 65_536
_reasons: dict[str, bool] = {}
_rejection_fields: dict[str, tuple[str | None, str | None, bool, bool, str | None]] = {}


class Arrival(NamedTuple):
    """A message was received (``<=``): who sent it, so later lines of it can be tied to them."""

    at: float
    message_id: str
    #: The authenticated id as logged (``A=driver:id``), or None.
    auth_id: str | None
    #: The client's IP address (``[ip]`` of ``H=``), or None for a local submission.
    host: str | None
    #: A bounce (``<= <>``): the shipped ACL neither verifies nor counts its recipients' failures,
    #: but asks about its sender's key all the same, so a blocked user's bounces are frozen.
    null_sender: bool = False
    #: The login of the local user who submitted it (``U=``), for a message without a client.
    local: str | None = None
    #: Its recipients as the ``for`` list gives them (``log_selector = +received_recipients``);
    #: 0 without that list.
    recipients: int = 0


class Rejection(NamedTuple):
    """A recipient refused at RCPT time (``rejected RCPT <rcpt>: reason``)."""

    at: float
    rcpt: str
    auth_id: str | None
    host: str | None
    reason: str
    #: Whether the reason is a verification failure (:data:`VERIFY_FAILURE_TEXTS`).
    verify_failed: bool
    #: ``temporarily rejected``: a 4xx, which the policy counts only with ``count_defer``.
    temporary: bool
    #: ``F=<>``: a bounce, which the shipped ACL does not verify or count.
    null_sender: bool = False
    #: The login of the local user (``U=``) of an SMTP session without a client (``-bs``).
    local: str | None = None


class Delivery(NamedTuple):
    """A recipient of a message was delivered (``=>``, ``->``) or failed for good (``**``)."""

    at: float
    message_id: str
    rcpt: str
    #: True for ``**``: a permanent failure found at delivery time.
    failed: bool
    #: Whether a transport (``T=``) reported it: a remote server's refusal, which the shipped
    #: ``event_action`` reports (``msg:fail:delivery``), as opposed to a router's ``:fail:``.
    by_transport: bool = False


class Completed(NamedTuple):
    """Exim is done with a message (``Completed``): nothing more will be logged for it."""

    at: float
    message_id: str


Event = Arrival | Rejection | Delivery | Completed


class Unparsed(enum.Enum):
    """Sentinel: the line is not an Exim log line (no time stamp, or a field cut short)."""

    UNPARSED = enum.auto()


UNPARSED: Final = Unparsed.UNPARSED


class Continuation(enum.Enum):
    """Sentinel: the line continues the entry before it (indented, or a reject-log header)."""

    CONTINUATION = enum.auto()


CONTINUATION: Final = Continuation.CONTINUATION

Parsed = Event | Unparsed | Continuation | None


class Timestamp(NamedTuple):
    """A log line's time, in seconds, and the rest of the line after it."""

    at: float
    rest: str
    #: Whether the line carried a zone (``log_timezone``): then *at* is true UTC epoch seconds;
    #: otherwise it is the log's local wall time read as if it were UTC.
    zoned: bool


@functools.lru_cache(maxsize=4096)
def _epoch(stamp: str) -> float:
    """``YYYY-MM-DD HH:MM:SS`` as seconds, the wall time read as UTC (raises ValueError)."""
    if not (stamp[4] == stamp[7] == "-" and stamp[10] == " " and stamp[13] == stamp[16] == ":"):
        raise ValueError(stamp)
    fields = (stamp[0:4], stamp[5:7], stamp[8:10], stamp[11:13], stamp[14:16], stamp[17:19])
    if not all(field.isdigit() and field.isascii() for field in fields):
        raise ValueError(stamp)
    year, month, day, hour, minute, second = map(int, fields)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ValueError(stamp)
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def parse_timestamp(line: str) -> Timestamp | None:
    """Split off the time at the start of *line*; None when it does not start with one."""
    if len(line) < 20:
        return None
    try:
        at = _epoch(line[:19])
    except ValueError:
        return None
    if line[19] == " " and line[20:21] not in {"[", "+", "-"}:
        return Timestamp(at, line[20:], zoned=False)  # the usual case: nothing else to read
    extra = _TIME_EXTRA.match(line, 19)
    if extra is None:
        return None
    fraction, sign, hours, minutes = extra.groups()
    if fraction:
        at += int(fraction) / 10 ** len(fraction)
    zoned = sign is not None
    if zoned:
        offset = int(hours) * 3600 + int(minutes) * 60
        at -= offset if sign == "+" else -offset
    return Timestamp(at, line[extra.end() :], zoned=zoned)


def parse_line(line: str) -> Parsed:
    """Parse one main-log or reject-log line (with or without its line end).

    Returns:
        An event; :data:`CONTINUATION` for the rest of a multi-line entry; ``None`` for a line
        of no interest here (connections, queue runs, ...); :data:`UNPARSED` for anything else,
        including a line cut short by a crash or a copy of a log being written.
    """
    line = line.rstrip("\r\n")
    stamp = parse_timestamp(line)
    if stamp is None:
        if _CONTINUATION.match(line) is not None:
            return CONTINUATION
        return UNPARSED
    return _parse_rest(stamp.at, stamp.rest)


def _parse_rest(at: float, rest: str) -> Parsed:
    """Parse what follows the time stamp (and its optional fields)."""
    if _MSGID.match(rest) is not None:
        return _message_line(at, rest)
    marker = rest.find(" rejected RCPT <")
    if marker >= 0:
        return _rejection(at, rest, 0, marker)
    return None


def _message_line(at: float, rest: str) -> Parsed:
    cut = rest.index(" ")
    message_id = rest[:cut]
    flag = rest[cut + 1 : cut + 4]
    if flag in {"=> ", "-> ", "** "}:
        body = rest[cut + 4 :]
        end = body.find(" ")
        rcpt = body if end < 0 else body[:end]
        rcpt = rcpt.removesuffix(":")  # "** x@y: reason" when no router is named
        if not rcpt:
            return UNPARSED
        failed = flag == "** "
        by_transport = failed and " T=" in body
        return Delivery(at, message_id, rcpt, failed, by_transport)
    if flag == "<= ":
        return _arrival(at, message_id, rest[cut + 4 :])
    if rest.startswith("Completed", cut + 1):
        return Completed(at, message_id)
    return None


def _arrival(at: float, message_id: str, body: str) -> Arrival:
    # One in six lines of a main log: string searches with bounds, no slices but the results.
    auth_id: str | None = None
    protocol = body.find(" P=")
    if protocol < 0:
        protocol = len(body)
    else:
        start = body.find(" A=", protocol)
        if start >= 0:
            end = body.find(" S=", start)
            colon = body.find(":", start, len(body) if end < 0 else end)
            if colon > start + 3:  # "A=driver" alone: no id was set
                auth_id = body[colon + 1 : end] if end >= 0 else body[colon + 1 :]
    # The sender comes first and is the client's to choose: take the last H= before P=.
    host = _host(body, body.rfind(" H=", 0, protocol))
    local = None
    if host is None:  # a local submission: U= is the login of the user who ran Exim
        start = body.rfind(" U=", 0, protocol)
        if start >= 0:
            end = body.find(" ", start + 3)
            local = body[start + 3 : end if end >= 0 else len(body)] or None
    recipients = 0
    listed = body.find(" for ", protocol)
    if listed >= 0:  # "... S=232 for a@x b@y": the accepted recipients, at the end of the line
        recipients = body.count(" ", listed + 5) + 1 - body.endswith(" ")
    # positional arguments: faster than keywords
    return Arrival(at, message_id, auth_id, host, body.startswith("<> "), local, recipients)


def _rejection(at: float, line: str, start: int, marker: int) -> Rejection | Unparsed:
    """The rejection in *line*, whose fields start at *start*, ``rejected RCPT <`` at *marker*.

    *line* may still end in its line end: the reason leaves it out.
    """
    rcpt_start = marker + len(" rejected RCPT <")
    close = line.find(">: ", rcpt_start)
    if close < 0:
        return UNPARSED  # the line was cut before the reason
    fields = line[start:marker]
    known = _rejection_fields.get(fields)
    if known is None:
        if len(_rejection_fields) >= _CACHE_SIZE:
            _rejection_fields.clear()
        known = _rejection_fields[fields] = _read_rejection_fields(fields)
    auth_id, host, null_sender, temporary, local = known
    reason = line[close + 3 :].rstrip("\r\n")
    rcpt = line[rcpt_start:close]
    # positional: a keyword argument costs as much as building the tuple
    return Rejection(
        at, rcpt, auth_id, host, reason, _verify_failed(reason), temporary, null_sender, local
    )


def _read_rejection_fields(
    fields: str,
) -> tuple[str | None, str | None, bool, bool, str | None]:
    """From the fields before `` rejected RCPT <``: id, client address, null sender, 4xx, and
    the local user (``U=LOGIN`` first, as Exim starts a session without a client)."""
    prefix = fields.removesuffix(" temporarily")
    # The last A= before the marker: the sender (F=<...>) comes earlier and is the client's to
    # choose, so a sender holding " A=" cannot forge the id.
    field = prefix.rfind(" A=")
    auth_id = None if field < 0 else _auth_id(prefix[field + 3 :])
    null_sender = " F=<> " in prefix or prefix.endswith(" F=<>")
    host = _host(prefix, prefix.find("H="))
    local = None
    if host is None and prefix.startswith("U="):
        local = prefix[2:].partition(" ")[0] or None
    return auth_id, host, null_sender, len(prefix) < len(fields), local


def _verify_failed(reason: str) -> bool:
    """Whether a rejection's reason is a verification failure (:data:`VERIFY_FAILURE_TEXTS`)."""
    known = _reasons.get(reason)
    if known is None:
        if _CALLOUT_REFUSAL in reason:
            return True  # not remembered: the text holds the address, it will not come again
        if len(_reasons) >= _CACHE_SIZE:
            _reasons.clear()
        known = _reasons[reason] = _VERIFY_FAILURE.search(reason) is not None
    return known


def _auth_id(field: str) -> str | None:
    """The id of ``driver:id``; None for ``driver`` alone (no ``server_set_id``)."""
    driver, colon, auth_id = field.partition(":")
    return auth_id if colon and driver else None


def _host(fields: str, start: int) -> str | None:
    """The client address of the ``H=`` field at *start*: ``H=name (helo) [ip]:port``.

    The HELO name comes first and is the client's to choose: ``HELO [192.0.2.1]`` is logged as
    ``H=([192.0.2.1]) [127.0.0.1]``, so the address is the first ``[...]`` after the
    parenthesised part, never one inside it.
    """
    if start < 0:
        return None
    bracket = fields.find("[", start)
    paren = fields.find("(", start, bracket if bracket >= 0 else len(fields))
    if paren >= 0:
        close = fields.find(") ", paren)
        if close < 0:
            return None
        bracket = fields.find("[", close)
    if bracket < 0:
        return None
    end = fields.find("]", bracket)
    return fields[bracket + 1 : end] if end > bracket + 1 else None


# ---------------------------------------------------------------------------------------------
# A whole log at once

#: ``skip(line, end, flag)``: True when a message line (``=>``, ``->``, ``**``, ``Co`` for
#: ``Completed``) needs no parsing: the caller has no use for it, or dealt with it from the
#: message id. The line is in Exim's default format: ``line[:19]`` is its ``YYYY-MM-DD
#: HH:MM:SS`` (see :func:`stamp_seconds`) and ``line[20:end]`` its message id. The arguments are
#: the line and a position rather than slices of it because most of these lines need neither.
SkipTest = Callable[[str, int, str], bool]


def stamp_seconds(stamp: str) -> float:
    """The seconds of a ``YYYY-MM-DD HH:MM:SS`` stamp, as :class:`Timestamp` counts them.

    Raises:
        ValueError: *stamp* is not a valid date and time.
    """
    return _epoch(stamp)


_SKIPPABLE: Final = frozenset({"=>", "->", "**", "Co"})
_EXTRA_START: Final = frozenset({"[", "+", "-"})


class ScanCounts:
    """Lines seen by :func:`scan`, and the damaged ones (with a few examples)."""

    def __init__(self, examples: int = 5) -> None:
        self.lines = 0
        self.unparsed = 0
        self.examples: list[str] = []
        #: The line number (from 1) of each example in what was scanned.
        self.example_lines: list[int] = []
        self.keep = examples
        #: Whether any line carried a zone (``log_timezone``): times are then true UTC.
        self.zoned = False


def scan(  # noqa: C901, PLR0912, PLR0915 - one flat loop: the hot path of a replay
    lines: Iterable[str], counts: ScanCounts, skip: SkipTest | None = None
) -> Iterator[Event]:
    """The events of *lines*, in order; damaged lines are counted into *counts*.

    The same events as :func:`parse_line`, minus message lines that *skip* refuses, but faster:
    most lines of a main log are deliveries and connections, and a line in Exim's default
    format (time, then a message id or none) is recognised by a few character tests before
    anything is parsed, with no function call. A spam wave is all ``rejected RCPT`` lines, and
    those go straight to the rejection parser. Lines with fields after the time (``+pid``,
    ``+millisec``, ``log_timezone``) take the full :func:`parse_line` path and are never skipped.
    """
    epoch = _epoch
    extra = _EXTRA_START
    skippable = _SKIPPABLE
    message_id = _MSGID.match
    stamp = ""  # the last time stamp read, and its seconds: lines of one second come together
    at = 0.0
    n = 0
    for n, line in enumerate(lines, start=1):
        # The commonest line first: "YYYY-MM-DD HH:MM:SS 1xX8Pm-00035Q-0q => ...".
        if line[36:37] == " " and line[26:27] == "-" and line[33:34] == "-" and line[19:20] == " ":
            end = 36
        elif line[4:5] == "-" and line[13:14] == ":" and line[19:20] in {" ", "."}:
            if line[20:22] == "H=" and line[19:20] == " ":
                # "YYYY-MM-DD HH:MM:SS H=(helo) [ip] ...": about an SMTP client, not a message
                marker = line.find(" rejected RCPT <", 22)
                if marker < 0:
                    continue  # connections, refusals of other commands
                if line[:19] != stamp:
                    try:
                        at = epoch(line[:19])
                    except ValueError:
                        stamp = ""
                    else:
                        stamp = line[:19]
                if stamp:
                    rejection = _rejection(at, line, 20, marker)
                    if isinstance(rejection, Rejection):
                        yield rejection
                        continue
                end = -1  # damaged: parsed below, and counted
            else:
                end = 0
                if line[19:20] == "." or line[20:21] in extra:
                    end = -1  # optional fields after the time: the long way
                    if not counts.zoned:
                        timestamp = parse_timestamp(line)
                        counts.zoned = timestamp is not None and timestamp.zoned
                elif line[43:44] == " " and line[26:27] == "-" and line[38:39] == "-":
                    end = 43  # a 4.97+ message id
                elif " rejected RCPT <" not in line:
                    continue  # connections, queue runs, daemon start: nothing to count
        else:
            end = -1  # no time stamp: a continuation, or damaged
        if end > 0:
            flag = line[end + 1 : end + 3]
            if flag in skippable:
                if skip is not None and skip(line, end, flag):
                    continue
            elif flag == "<=":
                if line[:19] != stamp:
                    try:
                        at = epoch(line[:19])
                    except ValueError:
                        stamp = ""  # damaged: parsed below, and counted
                    else:
                        stamp = line[:19]
                if stamp:
                    yield _arrival(at, line[20:end], line[end + 4 :].rstrip("\r\n"))
                    continue
            elif message_id(line, 20) is not None:
                continue  # "==" defers, "Message is frozen", ...
            # else: shaped like a message line by chance (a HELO name), parsed below
        parsed = parse_line(line)
        if parsed is None or parsed is CONTINUATION:
            continue
        if parsed is not UNPARSED:
            yield parsed
            continue
        counts.unparsed += 1
        if len(counts.examples) < counts.keep:
            counts.examples.append(line.rstrip("\r\n")[:200])
            counts.example_lines.append(n)
    counts.lines += n


# ---------------------------------------------------------------------------------------------
# User keys


@functools.lru_cache(maxsize=65536)
def _auth_key(auth_id: str) -> str:
    return "auth:" + fold_auth_id(auth_id)


#: Keys the shipped ACL never counts, asks about or freezes: its default
#: ``SPAMGUARD_EXEMPT_USERS``, the daemon's own notices.
ACL_EXEMPT_USERS: Final = frozenset({"uid:spamguardd"})


class UserKeys:
    """Computes the user key of a log line exactly as the shipped ACL computes it.

    ``auth:${lc:$authenticated_id}``; else, for clients in the relay networks, ``ip:`` + the
    client address (IPv4) or its /64 as ``${mask:$sender_host_address/64}`` writes it
    (``ip:2001.0db8.0001.0002.0000.0000.0000.0000/64``); else, for mail without a client
    address (a local program, ``sendmail -bs``), ``uid:`` + the login Exim logs as ``U=``
    (``contrib/exim/spamguardd-not-smtp.conf``), unless *local_senders* is False; else None:
    such mail is not counted. The keys of :data:`ACL_EXEMPT_USERS` are never counted. This is
    ``contrib/exim/acl_spamguardd_rcpt``'s ``acl_m_sg_user``.
    """

    def __init__(
        self, relay_networks: Sequence[Network] = (), *, local_senders: bool = True
    ) -> None:
        self.relay_networks = tuple(relay_networks)
        self.local_senders = local_senders
        self._host_key = functools.lru_cache(maxsize=65536)(self._compute_host_key)

    def key(self, auth_id: str | None, host: str | None, local: str | None = None) -> str | None:
        """The user key for a line with this authenticated id, client address and local user."""
        if auth_id is not None:
            return _auth_key(auth_id)
        if host is None:
            if local is None or not self.local_senders:
                return None
            key = UID + local
            return None if key in ACL_EXEMPT_USERS else key
        if not self.relay_networks:
            return None
        return self._host_key(host)

    def _compute_host_key(self, host: str) -> str | None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        if not any(address in network for network in self.relay_networks):
            return None
        if address.version == 6:
            return "ip:" + exim_mask(address, IPV6_GROUP_PREFIX)
        return f"ip:{address}"
