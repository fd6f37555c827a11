"""The admin protocol: typed commands and replies, and one sans-I/O connection for both ends.

One JSON object per line each way. A request names its command and, where the command needs
them, the user and a reason::

    {"command": "block", "user": "auth:mallory@example.com", "reason": "phished"}

Every reply is one object with ``"ok"``: ``{"ok": true, ...}`` with the command's fields, or
``{"ok": false, "error": "what went wrong"}``. The replies are frozen attrs classes; their JSON
is generated from the classes, and the client reads it back into the same classes, so the two
ends cannot disagree about a field. Both sides write ASCII-only JSON, so a user key that is not
valid UTF-8 (kept with surrogate escapes, as the query protocol keeps it) survives the round
trip byte for byte. ``docs/protocol.md`` is the reference; ``docs/admin.md`` lists the fields.

:class:`AdminConnection` frames the lines, in the manner of h11: the daemon's trio server and
``spamguardctl``'s blocking socket drive the same object, each feeding it bytes and sending the
bytes it returns.
"""

from __future__ import annotations

import enum
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs

from spamguardd.core import lsearch
from spamguardd.core.expiry import format_span
from spamguardd.core.latency import percentiles
from spamguardd.core.policy import Block
from spamguardd.core.rate import parse_duration
from spamguardd.core.statistics import Statistics
from spamguardd.core.timestamps import format_time, parse_time

T = TypeVar("T")

#: Longest reply line the client reads, newline included. Replies of ``show`` and ``list`` are
#: the largest; a block list of many thousands of users still fits.
MAX_REPLY: Final = 16 * 1024 * 1024
#: Longest request line the daemon reads: requests are small.
MAX_REQUEST: Final = 64 * 1024
#: Longest user key, as on the query socket.
MAX_USER: Final = 1024
#: Longest admin-given reason (it is written into the block file Exim reads).
MAX_REASON: Final = 512


class AdminRequestError(ValueError):
    """A request line the daemon cannot serve; the message is the reply's ``error``."""


class AdminReplyError(ValueError):
    """A reply line the client cannot read (not a daemon speaking this protocol)."""


class Verb(enum.StrEnum):
    """The admin commands."""

    LIST = "list"
    SHOW = "show"
    BLOCK = "block"
    UNBLOCK = "unblock"
    RESET = "reset"
    STATS = "stats"
    METRICS = "metrics"
    RELOAD = "reload"


#: Commands that take a user key.
USER_VERBS: Final = frozenset({Verb.SHOW, Verb.BLOCK, Verb.UNBLOCK, Verb.RESET})


def _encodable(text: str) -> bool:
    """Whether *text* maps back to bytes: lone surrogates other than escaped bytes do not."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


@attrs.frozen
class Command:
    """One admin request."""

    command: Verb = attrs.field(converter=Verb)
    user: str | None = None
    reason: str | None = None
    #: ``block`` only: when the block lifts itself, as an ISO 8601 UTC time ...
    until: str | None = None
    #: ... or after how long, as an Exim time (``2h``); neither: it never does.
    duration: str | None = None

    @classmethod
    def from_json(cls, raw: Any) -> Command:
        """The command of a parsed request object.

        Raises:
            AdminRequestError: not an object, an unknown command, an unknown field, or a missing
                or invalid user or reason; the message says which.
        """
        if not isinstance(raw, dict):
            raise AdminRequestError("request is not a JSON object")
        name = raw.get("command")
        try:
            verb = Verb(name if isinstance(name, str) else "")
        except ValueError:
            known = ", ".join(verb.value for verb in Verb)
            raise AdminRequestError(f"unknown command {name!r} (known: {known})") from None
        unknown = sorted(set(raw) - {"command", "user", "reason", "until", "duration"})
        if unknown:
            raise AdminRequestError(f"unknown field {unknown[0]!r} in {verb} request")
        until, duration = _expiry_fields(verb, raw)
        return cls(
            verb, _user_field(verb, raw.get("user")), _reason_field(verb, raw), until, duration
        )

    def to_json(self) -> dict[str, str]:
        """The request object."""
        fields = {"command": self.command.value}
        if self.user is not None:
            fields["user"] = self.user
        if self.reason is not None:
            fields["reason"] = self.reason
        if self.until is not None:
            fields["until"] = self.until
        if self.duration is not None:
            fields["duration"] = self.duration
        return fields

    def expires_at(self, wall_now: float) -> float | None:
        """When the block asked for lifts itself, given the time *wall_now*; None: never."""
        if self.until is not None:
            return parse_time(self.until)
        if self.duration is not None:
            return float(int(wall_now)) + parse_duration(self.duration)
        return None


def _expiry_fields(verb: Verb, raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    until, duration = raw.get("until"), raw.get("duration")
    if until is None and duration is None:
        return None, None
    if verb is not Verb.BLOCK:
        raise AdminRequestError(f"{verb} takes no until or duration")
    if until is not None and duration is not None:
        raise AdminRequestError("give either until or duration, not both")
    if until is not None:
        _check_text(until, parse_time, "until must be a UTC time such as 2026-12-03T10:00:00Z")
    else:
        _check_text(duration, parse_duration, "duration must be an Exim time such as 2h or 7d")
    return until, duration


def _check_text(value: Any, parse: Callable[[str], object], what: str) -> None:
    if not isinstance(value, str):
        raise AdminRequestError(what)
    try:
        parse(value)
    except ValueError as exc:
        raise AdminRequestError(f"{what}: {exc}") from None


def _user_field(verb: Verb, user: Any) -> str | None:
    if verb not in USER_VERBS:
        if user is not None:
            raise AdminRequestError(f"{verb} takes no user")
        return None
    if not isinstance(user, str) or not user:
        raise AdminRequestError(f"{verb} needs a user key")
    if not _encodable(user):
        raise AdminRequestError(
            "user key holds a lone surrogate that stands for no byte (\\udc80-\\udcff only)"
        )
    if len(user.encode("utf-8", "surrogateescape")) > MAX_USER or "\x00" in user:
        raise AdminRequestError(f"user key must be 1 to {MAX_USER} bytes without NUL")
    if (problem := lsearch.too_long(user)) is not None:
        raise AdminRequestError(problem)
    return user


def _reason_field(verb: Verb, raw: Mapping[str, Any]) -> str | None:
    reason = raw.get("reason")
    if reason is None:
        return None
    if verb is not Verb.BLOCK:
        raise AdminRequestError(f"{verb} takes no reason")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise AdminRequestError(f"reason must be a string of at most {MAX_REASON} characters")
    if not _encodable(reason):
        raise AdminRequestError(
            "reason holds a lone surrogate that stands for no byte (\\udc80-\\udcff only)"
        )
    return reason


# -- replies ----------------------------------------------------------------------------------

#: Field metadata: leave the key out of the JSON when the value is None.
_OMIT_NONE: Final = {"omit_none": True}


@attrs.frozen(kw_only=True)
class BlockInfo:
    """A block, as ``list``, ``show``, ``block`` and ``unblock`` give it."""

    user: str
    #: When it was blocked (ISO 8601, UTC).
    since: str
    reason: str
    #: ``auto`` or ``admin:UID``.
    by: str
    #: The verdict Exim gets now.
    verdict: str
    #: When the block lifts itself (ISO 8601, UTC); absent: never.
    until: str | None = attrs.field(default=None, metadata=_OMIT_NONE)
    #: Which automatic block of the user this is within ``block.repeat_within``; absent for
    #: blocks not counted (an admin's).
    nth: int | None = attrs.field(default=None, metadata=_OMIT_NONE)
    #: ``block.repeat_within`` for people (``30 days``), with *nth*.
    repeat_within: str | None = attrs.field(default=None, metadata=_OMIT_NONE)

    @classmethod
    def from_block(
        cls, block: Block, verdict: str, repeat_within: float | None = None
    ) -> BlockInfo:
        """A block of the policy, with the verdict in force (and the span *nth* counts in)."""
        return cls(
            user=block.user,
            since=format_time(block.blocked_at),
            reason=block.reason,
            by=block.by,
            verdict=verdict,
            until=None if block.expires_at is None else format_time(block.expires_at),
            nth=block.nth or None,
            repeat_within=None
            if not block.nth or repeat_within is None
            else format_span(repeat_within),
        )


@attrs.frozen(kw_only=True)
class ListReply:
    """``list``: the block list, sorted by user."""

    blocked: tuple[BlockInfo, ...]


@attrs.frozen(kw_only=True)
class WindowInfo:
    """One window of one user."""

    limit: str
    counted: int
    tokens_left: float
    #: When the bucket is full again; None when it is full now.
    clears_at: str | None
    #: Whether the user has been warned in this window (``limits.warn_at``) and not re-armed.
    warned: bool = False


@attrs.frozen(kw_only=True)
class FailureInfo:
    """One recent failed recipient."""

    rcpt: str
    #: None for a local submission.
    ip: str | None
    at: str


@attrs.frozen(kw_only=True)
class JournalNotes:
    """What the journal reader had to skip."""

    truncated_line: int | None
    damaged_lines: tuple[int, ...]
    #: Why the journal could not be read at all (the history is then empty); absent when it was.
    unreadable: str | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class RepeatInfo:
    """A user's automatic blocks within ``block.repeat_within``, for ``show``."""

    #: Automatic blocks of the user in the span up to now.
    blocks: int
    #: ``block.repeat_within`` for people (``30 days``).
    within: str
    #: How long the user's next automatic block would last (``24h``, ``forever``).
    next_lasts: str


@attrs.frozen(kw_only=True)
class ShowReply:
    """``show USER``: block, windows, recent failures, history."""

    user: str
    blocked: bool
    block: BlockInfo | None
    exempt: bool
    mode: str
    windows: tuple[WindowInfo, ...]
    #: Fleet mode only: where :attr:`windows` were counted, ``"fleet"`` (the shared store) or
    #: ``"relay"`` (this relay's own, because the store did not answer).
    counted_in: str | None = attrs.field(default=None, metadata=_OMIT_NONE)
    #: The volume guard's windows (``limits.accepted_recipients``); empty while it is off.
    accepted_windows: tuple[WindowInfo, ...] = ()
    recent_failures: tuple[FailureInfo, ...]
    #: The user's journal entries, as written (see docs/admin.md).
    history: tuple[Mapping[str, Any], ...]
    journal: JournalNotes
    #: Only when blocks expire (``block.expire``): the user's automatic blocks in the span.
    repeats: RepeatInfo | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class BlockReply:
    """``block USER``: the block in force, and whether this command made it."""

    user: str
    changed: bool
    block: BlockInfo


@attrs.frozen(kw_only=True)
class MessageOutcome:
    """What Exim said about one frozen message (added by ``spamguardctl``)."""

    id: str
    ok: bool
    exim_said: str


@attrs.frozen(kw_only=True)
class EximReport:
    """What ``unblock --release``/``--remove`` did to the user's frozen mail."""

    action: str
    messages: tuple[MessageOutcome, ...] = ()
    #: Why the queue could not be listed, if it could not.
    error: str | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class UnblockReply:
    """``unblock USER``: the block that was lifted."""

    user: str
    #: None only from ``spamguardctl unblock --release``/``--remove`` for a user no longer
    #: blocked (lifted on another relay of a fleet, or by an earlier run): the queue is still
    #: handled, the daemon's answer was "not blocked".
    unblocked: BlockInfo | None = attrs.field(default=None, metadata=_OMIT_NONE)
    #: Added by ``spamguardctl`` for ``--release``/``--remove``; never sent by the daemon.
    exim: EximReport | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class ResetReply:
    """``reset USER``: the counters were forgotten."""

    user: str
    reset: bool = True


@attrs.frozen(kw_only=True)
class BlockCounts:
    """Blocks made since the start."""

    auto: int
    admin: int
    #: Of the automatic blocks, those made by the volume guard (accepted recipients); left out
    #: (None) while it has made none, so the reply is as it was for those who do not use it.
    volume: int | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class ErrorCounts:
    """Errors since the start, by kind (docs/admin.md)."""

    protocol: int
    internal: int
    busy: int
    store: int
    admin: int


@attrs.frozen(kw_only=True)
class BlockFileInfo:
    """Whether the block file takes writes (docs/operations.md): while it does not, block
    verdicts are ``defer`` and the daemon retries."""

    ok: bool = True
    #: Since when writes fail, and the last error, while they do.
    failing_since: str | None = None
    error: str | None = None
    #: Users whose block or unblock is in memory only.
    unsaved_users: int = 0


@attrs.frozen(kw_only=True)
class ClusterInfo:
    """Fleet mode, as ``stats`` shows it (docs/fleet.md)."""

    relay: str
    store: str
    #: False while degraded: the store is away or slow, failures are counted locally.
    up: bool
    #: Since when the store is away, while it is.
    down_since: str | None
    outages: int
    store_counts: int
    local_counts: int
    timeouts: int
    errors: int
    remote_changes: int
    pushed: int


@attrs.frozen(kw_only=True)
class ExpiryInfo:
    """Blocks that expire, in ``stats``."""

    #: ``block.expire`` as configured (``24h, 1w, forever``).
    steps: str
    #: ``block.repeat_within`` for people (``30 days``).
    repeat_within: str
    lifted: int
    repeat_users: int
    #: The next lift to look at (ISO 8601, UTC); absent when no block expires.
    next_at: str | None = attrs.field(default=None, metadata=_OMIT_NONE)


@attrs.frozen(kw_only=True)
class StatsReply:
    """``stats``: counters since the start."""

    version: str
    started_at: str
    uptime_seconds: int
    mode: str
    #: Answers by verb, then verdict.
    queries: Mapping[str, Mapping[str, int]]
    queries_total: int
    blocks: BlockCounts
    unblocks: int
    #: Early warnings given (``limits.warn_at``).
    warnings: int = 0
    tracked_users: int
    blocked_users: int
    would_block_users: int
    open_connections: int
    errors: ErrorCounts
    #: Percentiles in ms (``p50``...``p99_9``); None past the last bucket; empty before a query.
    latency_ms: Mapping[str, float | None]
    block_file: BlockFileInfo = BlockFileInfo()
    #: Fleet mode only (absent for a single host).
    cluster: ClusterInfo | None = attrs.field(default=None, metadata={"omit_none": True})
    #: Only when blocks expire (``block.expire``).
    expiry: ExpiryInfo | None = attrs.field(default=None, metadata=_OMIT_NONE)

    @classmethod
    def from_statistics(cls, stats: Statistics) -> StatsReply:
        """The reply for the daemon's statistics."""
        queries: dict[str, dict[str, int]] = {}
        for (verb, verdict), count in sorted(stats.server.queries.items()):
            queries.setdefault(verb, {})[verdict] = count
        fleet = stats.cluster
        cluster = (
            None
            if fleet is None
            else ClusterInfo(
                relay=fleet.relay,
                store=fleet.store,
                up=fleet.up,
                down_since=None if fleet.down_since is None else format_time(fleet.down_since),
                outages=fleet.outages,
                store_counts=fleet.store_counts,
                local_counts=fleet.local_counts,
                timeouts=fleet.timeouts,
                errors=fleet.errors,
                remote_changes=fleet.remote_changes,
                pushed=fleet.pushed,
            )
        )
        return cls(
            version=stats.version,
            started_at=format_time(stats.started_at),
            uptime_seconds=max(0, int(stats.now - stats.started_at)),
            mode=stats.mode,
            queries=queries,
            queries_total=sum(stats.server.queries.values()),
            blocks=BlockCounts(
                auto=stats.effects.auto_blocks,
                admin=stats.effects.admin_blocks,
                volume=stats.effects.volume_blocks or None,
            ),
            unblocks=stats.effects.unblocks,
            warnings=stats.effects.warnings,
            tracked_users=stats.policy.tracked_users,
            blocked_users=stats.policy.blocked_users,
            would_block_users=stats.policy.would_block_users,
            open_connections=stats.server.open_connections,
            errors=ErrorCounts(
                protocol=stats.server.protocol_errors,
                internal=stats.server.internal_errors,
                busy=stats.server.busy,
                store=stats.effects.store_failures,
                admin=stats.admin_errors + stats.effects.journal_failures,
            ),
            latency_ms=percentiles(stats.latency.bounds, stats.latency.counts),
            block_file=BlockFileInfo(
                ok=stats.effects.store_error is None,
                failing_since=None
                if stats.effects.store_failing_since is None
                else format_time(stats.effects.store_failing_since),
                error=stats.effects.store_error,
                unsaved_users=stats.effects.unsaved_users,
            ),
            cluster=cluster,
            expiry=None
            if stats.expiry is None
            else ExpiryInfo(
                steps=stats.expiry.steps,
                repeat_within=format_span(stats.expiry.repeat_within),
                lifted=stats.expiry.lifted,
                repeat_users=stats.expiry.repeat_users,
                next_at=None if stats.expiry.next_at is None else format_time(stats.expiry.next_at),
            ),
        )


@attrs.frozen(kw_only=True)
class MetricsReply:
    """``metrics``: the Prometheus text exposition."""

    text: str


@attrs.frozen(kw_only=True)
class ReloadReply:
    """``reload``: the configuration was re-read and applied."""

    config: str
    #: Settings that changed but keep their running values until the next start.
    needs_restart: tuple[str, ...]
    #: Users whose counters were carried over to changed limits.
    carried_users: int


@attrs.frozen(kw_only=True)
class ErrorReply:
    """Any command that failed: ``{"ok": false, "error": ...}``."""

    error: str


Reply = (
    ListReply
    | ShowReply
    | BlockReply
    | UnblockReply
    | ResetReply
    | StatsReply
    | MetricsReply
    | ReloadReply
    | ErrorReply
)

#: The success reply of each command.
REPLY_TYPES: Final[Mapping[Verb, type[Any]]] = {
    Verb.LIST: ListReply,
    Verb.SHOW: ShowReply,
    Verb.BLOCK: BlockReply,
    Verb.UNBLOCK: UnblockReply,
    Verb.RESET: ResetReply,
    Verb.STATS: StatsReply,
    Verb.METRICS: MetricsReply,
    Verb.RELOAD: ReloadReply,
}


def reply_to_json(reply: Reply) -> dict[str, Any]:
    """The reply object, ``"ok"`` included."""
    return {"ok": not isinstance(reply, ErrorReply), **_unstructure(reply)}


def reply_from_json(raw: Any, verb: Verb) -> Reply:
    """The reply to a *verb* command from its parsed JSON.

    Raises:
        AdminReplyError: not an object with a boolean ``ok``, or a field is missing or of the
            wrong type (the message names it).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
        raise AdminReplyError('reply is not a JSON object with "ok"')
    fields = {key: value for key, value in raw.items() if key != "ok"}
    kind = REPLY_TYPES[verb] if raw["ok"] else ErrorReply
    try:
        reply: Reply = _structure(fields, kind, "")
    except _ShapeError as exc:
        raise AdminReplyError(f"{verb} reply: {exc}") from None
    return reply


def _unstructure(value: Any) -> Any:
    if attrs.has(type(value)):
        return {
            field.name: _unstructure(getattr(value, field.name))
            for field in attrs.fields(type(value))
            if not (field.metadata.get("omit_none") and getattr(value, field.name) is None)
        }
    if isinstance(value, tuple | list):
        return [_unstructure(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _unstructure(item) for key, item in value.items()}
    return value


class _ShapeError(Exception):
    """A JSON value does not have the type a reply field declares."""


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _structure(value: Any, kind: Any, where: str) -> Any:  # noqa: C901, PLR0911, PLR0912 - one case per kind
    """*value* (parsed JSON) as *kind*, checked all the way down."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if attrs.has(kind):
        if not isinstance(value, dict):
            raise _ShapeError(f"{where or 'reply'}: expected an object")
        hints = _hints(kind)
        out = {}
        for field in attrs.fields(kind):
            path = f"{where}.{field.name}" if where else field.name
            if field.name in value:
                out[field.name] = _structure(value[field.name], hints[field.name], path)
            elif field.default is attrs.NOTHING:
                raise _ShapeError(f"{path}: missing")
        return kind(**out)
    if origin in {typing.Union, types.UnionType}:
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _structure(value, option, where)
            except _ShapeError as exc:
                errors.append(str(exc))
        raise _ShapeError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, list):
            raise _ShapeError(f"{where}: expected an array")
        item = typing.get_args(kind)[0]
        return tuple(_structure(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in {Mapping, dict}:
        if not isinstance(value, dict):
            raise _ShapeError(f"{where}: expected an object")
        item = typing.get_args(kind)[1]
        return {k: _structure(v, item, f"{where}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind in {str, int, bool} and type(value) is kind:
        return value
    raise _ShapeError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r:.40}")


# -- the connection ---------------------------------------------------------------------------


class Role(enum.Enum):
    """Which end of the connection this object serves."""

    CLIENT = enum.auto()
    SERVER = enum.auto()


class Event(enum.Enum):
    """What :meth:`AdminConnection.next_event` returns when there is no message."""

    NEED_DATA = enum.auto()
    #: The peer finished sending (EOF), or the connection cannot go on.
    CLOSED = enum.auto()


NEED_DATA: Final = Event.NEED_DATA
CLOSED: Final = Event.CLOSED


class AdminConnection:
    """One admin connection without I/O: lines in, typed messages out, and back.

    The server reads :class:`Command` values and sends replies; the client sends commands and
    reads the replies to them, in order. Feed what arrives to :meth:`receive_data` (``b""`` at
    EOF) and call :meth:`next_event` until it says :data:`NEED_DATA` or :data:`CLOSED`.

    Invariant: a line longer than the reading side's limit (:data:`MAX_REQUEST` for the daemon,
    :data:`MAX_REPLY` for the client) is refused without being buffered past the limit, and
    the connection is closed after it: nothing after it can be framed.
    """

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self._limit = MAX_REQUEST if our_role is Role.SERVER else MAX_REPLY
        self._buffer = bytearray()
        self._eof = False
        self._broken = False
        #: Client: the commands sent and not answered yet, oldest first.
        self._awaiting: list[Verb] = []

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer; ``b""`` marks EOF."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Command | Reply | Event:
        """The next message, :data:`NEED_DATA`, or :data:`CLOSED`.

        Raises:
            AdminRequestError: (daemon) a request line that cannot be served; the line is
                consumed and the next one may follow (unless it was too long).
            AdminReplyError: (client) a line that is not a reply in this protocol.
        """
        if self._broken:
            return CLOSED
        line = self._next_line()
        if line is None:
            return CLOSED if self._eof else NEED_DATA
        if self.our_role is Role.SERVER:
            return Command.from_json(_load(line, AdminRequestError, "request"))
        if not self._awaiting:
            raise AdminReplyError("a reply came before any request")
        return reply_from_json(_load(line, AdminReplyError, "reply"), self._awaiting.pop(0))

    def send(self, message: Command | Reply) -> bytes:
        """The line to write for *message*: a command (client) or a reply (daemon)."""
        if isinstance(message, Command):
            if self.our_role is not Role.CLIENT:
                raise TypeError("the daemon sends replies, not commands")
            self._awaiting.append(message.command)
            return _line(message.to_json())
        if self.our_role is not Role.SERVER:
            raise TypeError("the client sends commands, not replies")
        return _line(reply_to_json(message))

    def _next_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", 0, self._limit)
        if end >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            return line
        if len(self._buffer) >= self._limit:
            self._broken = True
            self._buffer.clear()
            error = AdminRequestError if self.our_role is Role.SERVER else AdminReplyError
            raise error(f"line longer than {self._limit} bytes")
        if self._eof and self._buffer.strip():
            line = bytes(self._buffer)
            self._buffer.clear()
            return line
        return None


def _load(line: bytes, error: type[ValueError], what: str) -> Any:
    try:
        return json.loads(line)
    except RecursionError:
        raise error(f"{what} is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise error(f"{what} is not a JSON object: {exc}") from None


def _line(value: Mapping[str, Any]) -> bytes:
    text = json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"
