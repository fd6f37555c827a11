"""The query protocol (v1) that Exim speaks through ``${readsocket}``: a pure parser/serialiser.

No sockets and no clock here: :class:`PolicyConnection` takes bytes in and gives bytes out, in the
manner of h11, so the whole protocol is tested without I/O and the server only moves bytes.

Wire format (``docs/protocol.md`` is the reference):

* one request per connection; the request line ends at LF or at EOF (Exim's readsocket writes the
  request with no terminator of its own and half-closes, unless ``shutdown=no`` is given);
* ``VERB key=value ...``; a value is a bare token or a ``${quote:}``-style double-quoted string;
* the answer is one line, ``VERDICT [reason="..."]``, after which the server closes at once, because
  readsocket reads until EOF and throws away a reply that is followed by silence.

Values are bytes from Exim: local parts and authenticated ids may hold any 8-bit byte. They are
decoded as UTF-8 with ``surrogateescape``, so every byte string maps to exactly one ``str`` and
back;
a spammer cannot escape counting with a recipient that is not valid UTF-8.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from typing import Final

import attrs

from spamguardd.core import lsearch
from spamguardd.core.errors import RemoteProtocolError

#: Largest request accepted, terminator included. Exim's readsocket request is one short line
#: (verb, user key, recipient, sender, IP: well under 1 KiB even for 255-byte local parts), so 4 KiB
#: leaves room for future keys while bounding what a misbehaving client can make us buffer.
MAX_REQUEST_SIZE: Final = 4096

#: Largest user key, in bytes. The key is written verbatim into the block file that Exim reads with
#: ``lsearch``; Exim's own string handling has no trouble with 1 KiB, and no real id comes close.
MAX_USER_SIZE: Final = 1024

ENCODING: Final = "utf-8"
ERRORS: Final = "surrogateescape"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Verdict(enum.StrEnum):
    """The first word of every answer."""

    ACCEPT = "accept"
    FREEZE = "freeze"
    REJECT = "reject"
    DEFER = "defer"
    ERROR = "error"
    PONG = "pong"


class Verify(enum.StrEnum):
    """Outcome of Exim's ``verify = recipient`` for one recipient, as the ACL reports it."""

    OK = "ok"
    FAIL = "fail"
    DEFER = "defer"


@attrs.frozen
class RcptRequest:
    """One recipient at RCPT time: ``rcpt user= rcpt= verify= [ip=] [sender=]``."""

    user: str
    rcpt: str
    verify: Verify
    ip: IPAddress | None = None
    sender: str | None = None


@attrs.frozen
class ReportRequest:
    """A recipient that failed at delivery time: ``report user= rcpt= event= [ip=]``.

    Sent from an smtp transport's ``event_action``. It counts like ``rcpt verify=fail`` (or
    ``verify=defer`` for a deferral event), through the same path, so a recipient already
    counted at RCPT time in the same window is not counted again.
    """

    user: str
    rcpt: str
    #: Exim's ``$event_name``, e.g. ``msg:fail:delivery`` or ``msg:rcpt:defer``.
    event: str
    ip: IPAddress | None = None

    def as_rcpt(self) -> RcptRequest:
        """The equivalent RCPT-time request: a deferral event is ``defer``, anything else
        ``fail``."""
        verify = Verify.DEFER if "defer" in self.event.split(":") else Verify.FAIL
        return RcptRequest(user=self.user, rcpt=self.rcpt, verify=verify, ip=self.ip)


@attrs.frozen
class CheckRequest:
    """Is this user blocked: ``check user=``."""

    user: str


@attrs.frozen
class PingRequest:
    """Liveness probe: ``ping``, answered ``pong``."""


Request = RcptRequest | ReportRequest | CheckRequest | PingRequest


@attrs.frozen
class Reply:
    """One answer line: a verdict and an optional human-readable reason."""

    verdict: Verdict
    reason: str | None = None

    def to_bytes(self) -> bytes:
        """Serialise as the single LF-terminated line the server sends before closing."""
        if self.reason is None:
            return self.verdict.encode() + b"\n"
        return b"%s reason=%s\n" % (self.verdict.encode(), quote(self.reason))


class NeedData(enum.Enum):
    """Sentinel: the request line is not complete yet."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


# ---------------------------------------------------------------------------------------------
# Values

# Exim's ${quote:} leaves letters, digits, "_", "." and "-" bare and otherwise wraps the value in
# double quotes, escaping '"' and '\' with a backslash and turning CR and LF into \r and \n
# (spec, "Expansion operators", quote). We accept exactly those escapes.
_UNESCAPES: Final = {ord("\\"): b"\\", ord('"'): b'"', ord("n"): b"\n", ord("r"): b"\r"}
# What the parser takes as a bare value: any run of bytes but space, tab, '"' and line ends.
_BARE: Final = re.compile(rb"[^ \t\"\r\n]+")
# What the serialiser leaves bare: the above less backslash and control bytes, so that what we
# write reads the same to a person, to Exim and to our own parser.
_BARE_SAFE: Final = re.compile(rb"[^ \t\"\r\n\\\x00-\x1f\x7f]+")
_QUOTED_BODY: Final = re.compile(rb'(?:[^"\\]|\\.)*', re.DOTALL)
_KEY: Final = re.compile(rb"[A-Za-z0-9_.-]+")
_SPACE: Final = re.compile(rb"[ \t]*")
_COMMON_KEYS: Final = frozenset({b"user", b"rcpt", b"verify", b"ip", b"sender", b"event"})
_VERIFY: Final = {verify.value: verify for verify in Verify}


def quote(value: str) -> bytes:
    """Encode *value* for the wire: bare when safe, else double-quoted with Exim's escapes."""
    raw = value.encode(ENCODING, ERRORS)
    if raw and _BARE_SAFE.fullmatch(raw):
        return raw
    escaped = (
        raw.replace(b"\\", b"\\\\")
        .replace(b'"', b'\\"')
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )
    return b'"' + escaped + b'"'


def _unquote(body: bytes) -> bytes:
    if b"\\" not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        byte = body[i]
        if byte == 0x5C:  # backslash; _QUOTED_BODY guarantees a following byte
            nxt = body[i + 1]
            try:
                out += _UNESCAPES[nxt]
            except KeyError:
                shown = chr(nxt) if 0x20 < nxt < 0x7F else f"\\x{nxt:02x}"
                raise RemoteProtocolError(
                    f'unknown escape \\{shown} in a quoted value (only \\" \\\\ \\n \\r)'
                ) from None
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def parse_fields(data: bytes) -> tuple[str, dict[str, str]]:
    """Split one request line (without its terminator) into its verb and ``key=value`` fields.

    Raises:
        RemoteProtocolError: the line is empty or its fields are malformed (:func:`parse_pairs`).
    """
    pos = _SPACE.match(data).end()  # type: ignore[union-attr]
    verb_match = _BARE.match(data, pos)
    if verb_match is None:
        raise RemoteProtocolError("empty request (expected a verb such as rcpt, check or ping)")
    verb = verb_match.group().decode(ENCODING, ERRORS).lower()
    return verb, parse_pairs(data, verb_match.end())


def parse_pairs(data: bytes, pos: int = 0) -> dict[str, str]:
    """Parse blank-separated ``key=value`` pairs from *data*, starting at *pos*.

    The same grammar serves the query protocol and the fields of the block file.

    Raises:
        RemoteProtocolError: a field is not ``key=value``, a quoted value is unterminated or holds
            an unknown escape, or a key appears twice.
    """
    if b'"' not in data and b"\r" not in data and b"\n" not in data:
        return _parse_bare_pairs(data, pos)
    return _parse_any_pairs(data, pos)


def _parse_bare_pairs(data: bytes, pos: int) -> dict[str, str]:
    """The hot path: no quoted value, so fields are just the blank-separated tokens."""
    fields: dict[str, str] = {}
    for token in data[pos:].replace(b"\t", b" ").split(b" "):
        if not token:
            continue
        raw_key, equals, raw = token.partition(b"=")
        if not equals or (raw_key not in _COMMON_KEYS and _KEY.fullmatch(raw_key) is None):
            raise RemoteProtocolError(f"malformed field {_show(token)} (expected key=value)")
        key = raw_key.decode("ascii")
        if key in fields:
            raise RemoteProtocolError(f"duplicate key {key}")
        fields[key] = raw.decode(ENCODING, ERRORS)
    return fields


def _parse_any_pairs(data: bytes, pos: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    end = len(data)
    while True:
        gap = _SPACE.match(data, pos).end()  # type: ignore[union-attr]
        if gap == end:
            return fields
        if gap == pos and pos:
            raise RemoteProtocolError(f"junk after field at byte {pos}: {_show(data[pos:])}")
        pos = gap
        key_match = _KEY.match(data, pos)
        if key_match is None or data[key_match.end() : key_match.end() + 1] != b"=":
            raise RemoteProtocolError(f"malformed field {_show(data[pos:])} (expected key=value)")
        key = key_match.group().decode("ascii")
        pos = key_match.end() + 1
        if data[pos : pos + 1] == b'"':
            body = _QUOTED_BODY.match(data, pos + 1)
            close = body.end()  # type: ignore[union-attr]
            if data[close : close + 1] != b'"':
                raise RemoteProtocolError(f"unterminated quoted value for {key}")
            raw = _unquote(data[pos + 1 : close])
            pos = close + 1
        else:
            bare = _BARE.match(data, pos)
            raw = bare.group() if bare else b""
            pos = bare.end() if bare else pos
        if key in fields:
            raise RemoteProtocolError(f"duplicate key {key}")
        fields[key] = raw.decode(ENCODING, ERRORS)


def _show(data: bytes, limit: int = 40) -> str:
    text = data[:limit].decode(ENCODING, "backslashreplace")
    return repr(text + ("..." if len(data) > limit else ""))


def _required(fields: dict[str, str], key: str) -> str:
    try:
        return fields[key]
    except KeyError:
        raise RemoteProtocolError(f"missing required key {key}") from None


def _user(fields: dict[str, str]) -> str:
    user = _required(fields, "user")
    # a str of n code points encodes to at most 4n bytes: skip the encoding for short keys
    size = len(user) if len(user) * 4 <= MAX_USER_SIZE else len(user.encode(ENCODING, ERRORS))
    if size == 0:
        raise RemoteProtocolError("user must not be empty")
    if size > MAX_USER_SIZE:
        raise RemoteProtocolError(f"user must be at most {MAX_USER_SIZE} bytes (got {size})")
    if "\x00" in user:
        raise RemoteProtocolError("user must not contain a NUL byte")
    if (problem := lsearch.too_long(user)) is not None:
        raise RemoteProtocolError(problem)
    return user


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress:
    # a relay sees few distinct client addresses, and ipaddress parsing is slow for a hot path
    return ipaddress.ip_address(text)


def _ip(fields: dict[str, str]) -> IPAddress | None:
    raw_ip = fields.get("ip", "")
    if not raw_ip:
        return None
    try:
        return _parse_ip(raw_ip)
    except ValueError:
        raise RemoteProtocolError(f"ip must be an IP address (got {raw_ip[:60]!r})") from None


def _rcpt(fields: dict[str, str]) -> RcptRequest:
    user = _user(fields)
    rcpt = _required(fields, "rcpt")
    raw_verify = _required(fields, "verify")
    verify = _VERIFY.get(raw_verify.lower())
    if verify is None:
        raise RemoteProtocolError(f"verify must be ok, fail or defer (got {raw_verify[:40]!r})")
    ip = _ip(fields)
    return RcptRequest(user=user, rcpt=rcpt, verify=verify, ip=ip, sender=fields.get("sender"))


def _report(fields: dict[str, str]) -> ReportRequest:
    user = _user(fields)
    rcpt = _required(fields, "rcpt")
    event = _required(fields, "event")
    if not event:
        raise RemoteProtocolError("event must not be empty (Exim's $event_name)")
    return ReportRequest(user=user, rcpt=rcpt, event=event.lower(), ip=_ip(fields))


def parse_request(line: bytes) -> Request:
    """Parse one request line (without its LF) into a typed request.

    Unknown keys are ignored so that newer ACLs keep working with an older daemon.

    Raises:
        RemoteProtocolError: the line is malformed, the verb is unknown, or a required key is
            missing or invalid; the message names the key.
    """
    verb, fields = parse_fields(line)
    if verb == "rcpt":
        return _rcpt(fields)
    if verb == "report":
        return _report(fields)
    if verb == "check":
        return CheckRequest(user=_user(fields))
    if verb == "ping":
        return PingRequest()
    raise RemoteProtocolError(
        f"unknown verb {verb[:40]!r} on the query socket (rcpt, report, check, ping)"
    )


def serialize_request(request: Request) -> bytes:
    """Encode *request* as the line an Exim ACL would send (used by tests and the benchmark)."""
    if isinstance(request, PingRequest):
        return b"ping\n"
    if isinstance(request, CheckRequest):
        return b"check user=" + quote(request.user) + b"\n"
    if isinstance(request, ReportRequest):
        parts = [b"report", b"user=" + quote(request.user), b"rcpt=" + quote(request.rcpt)]
        parts.append(b"event=" + quote(request.event))
        if request.ip is not None:
            parts.append(b"ip=" + str(request.ip).encode())
        return b" ".join(parts) + b"\n"
    parts = [b"rcpt", b"user=" + quote(request.user), b"rcpt=" + quote(request.rcpt)]
    parts.append(b"verify=" + request.verify.encode())
    if request.ip is not None:
        parts.append(b"ip=" + str(request.ip).encode())
    if request.sender is not None:
        parts.append(b"sender=" + quote(request.sender))
    return b" ".join(parts) + b"\n"


# ---------------------------------------------------------------------------------------------
# Connection state


class PolicyConnection:
    """The server side of one query connection, without I/O.

    Invariant: at most one request is read per connection (anything after its LF is ignored).
    Feed bytes with :meth:`receive_data` (``b""`` means EOF), then :meth:`next_request` gives the
    request or :data:`NEED_DATA`. The one answer is :meth:`Reply.to_bytes`, written by the server
    as soon as it is decided (the hot path writes it without going through this object).
    """

    __slots__ = ("_buffer", "_eof")

    def __init__(self) -> None:
        self._buffer = b""
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` marks EOF (the peer half-closed)."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_request(self) -> Request | NeedData:
        """Return the request once its line is complete, else :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the request is too long or malformed, or EOF came first.
        """
        newline = self._buffer.find(b"\n", 0, MAX_REQUEST_SIZE)
        if newline >= 0:
            line = self._buffer[:newline]
        elif len(self._buffer) >= MAX_REQUEST_SIZE:
            raise RemoteProtocolError(f"request longer than {MAX_REQUEST_SIZE} bytes")
        elif self._eof:
            if not self._buffer:
                raise RemoteProtocolError("connection closed before a request was sent")
            line = self._buffer
        else:
            return NEED_DATA
        if line.endswith(b"\r"):
            line = line[:-1]
        return parse_request(line)


def parse_reply(line: bytes) -> Reply:
    """Parse an answer line (the client side: tests, benchmark, fallback tooling).

    Raises:
        RemoteProtocolError: the line is not a known verdict with an optional reason.
    """
    verb, fields = parse_fields(line.rstrip(b"\r\n"))
    try:
        verdict = Verdict(verb)
    except ValueError:
        raise RemoteProtocolError(f"unknown verdict {verb[:40]!r}") from None
    return Reply(verdict=verdict, reason=fields.get("reason"))
