"""Fleet mode's pure side: the shared store's keys, what the script is asked and answers, block
records, the events relays announce, and how a relay that was away catches up.

The I/O (the client, the script, the stream) is in :mod:`spamguardd.daemon.cluster`; everything
here is values and functions of values, so the formats and the catch-up rules are tested without
a server.

Keys, all under ``cluster.key_prefix`` (``P``)::

    P:blocks            hash: user -> "blocked_at=SECONDS reason=... by=... relay=..."
    P:unblocked         sorted set: user, scored by the time of its last unblock (kept 30 days)
    P:events            stream: one entry per block, unblock, reset, reload (about 10,000 kept)
    P:count:USER        one user's buckets and recent failures; expires with its longest window
    P:would:USER        monitor mode's "would block" mark; expires with the longest window
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from spamguardd.core import buckets
from spamguardd.core.config import Mode, PolicyConfig
from spamguardd.core.errors import RemoteProtocolError
from spamguardd.core.policy import Block, StoreCount, StoreCountStatus
from spamguardd.core.protocol import ENCODING, ERRORS, parse_pairs, quote
from spamguardd.core.rate import Rate, format_duration

#: Stream entries kept (approximately): far more than a relay misses between two reads; a relay
#: away for longer catches up from ``P:blocks`` and ``P:unblocked`` instead.
EVENTS_KEPT: Final = 10_000
#: How long an unblock is remembered, so that a relay that was away drops its copy of the block.
#: A relay away for longer pushes the block back (the safe side: mail stays frozen).
UNBLOCK_RETENTION: Final = 30 * 86400


@attrs.frozen
class Keys:
    """The store's key names for one ``key_prefix``."""

    prefix: bytes

    @classmethod
    def for_prefix(cls, prefix: str) -> Keys:
        """The keys under *prefix* (ASCII, checked by the configuration)."""
        return cls(prefix.encode("ascii"))

    @property
    def blocks(self) -> bytes:
        """The fleet's block list."""
        return self.prefix + b"blocks"

    @property
    def unblocked(self) -> bytes:
        """When each user was last unblocked."""
        return self.prefix + b"unblocked"

    @property
    def events(self) -> bytes:
        """The stream of changes every relay follows."""
        return self.prefix + b"events"

    def count(self, user: str) -> bytes:
        """One user's counting state."""
        return self.prefix + b"count:" + user.encode(ENCODING, ERRORS)

    def would_block(self, user: str) -> bytes:
        """Monitor mode's mark that *user* was reported as "would block"."""
        return self.prefix + b"would:" + user.encode(ENCODING, ERRORS)


def _number(value: float) -> bytes:
    return repr(float(value)).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Block records


def record_tail(
    reason: str, by: str, relay: str, *, origin: str = "", rate: Rate | None = None
) -> bytes:
    """A block record without its ``blocked_at=`` (the script prepends the server's time)."""
    tail = b"reason=%s by=%s relay=%s" % (quote(reason), quote(by), quote(relay))
    if origin:
        tail += b" origin=" + quote(origin)
    if rate is not None:
        tail += b" limit=" + quote(str(rate))
    return tail


def encode_record(block: Block, relay: str, *, origin: str = "") -> bytes:
    """*block* as the store keeps it, made on *relay* (by the daemon *origin*)."""
    tail = record_tail(block.reason, block.by, relay, origin=origin)
    return b"blocked_at=%d %s" % (int(block.blocked_at), tail)


@attrs.frozen
class StoredBlock:
    """A block as the store keeps it: the block, the relay and daemon that made it, and the
    window that emptied (automatic blocks)."""

    block: Block
    relay: str
    origin: str = ""
    rate: Rate | None = None


def decode_record(user: str, record: bytes) -> StoredBlock:
    """The block of *user* from its record.

    Raises:
        ValueError: the record is damaged (not ``key=value`` pairs, no whole ``blocked_at``).
    """
    try:
        fields = parse_pairs(record)
    except RemoteProtocolError as exc:
        raise ValueError(f"damaged block record of {user!r}: {exc}") from None
    at = fields.get("blocked_at", "")
    if not at.isdigit():
        raise ValueError(f"block record of {user!r} has no blocked_at")
    block = Block(
        user=user,
        blocked_at=float(at),
        reason=fields.get("reason", ""),
        by=fields.get("by", "auto"),
    )
    try:
        rate = Rate.parse(fields["limit"]) if "limit" in fields else None
    except ValueError:
        rate = None  # the block stands; only the notice's detail is lost
    return StoredBlock(block, fields.get("relay", ""), fields.get("origin", ""), rate)


# ---------------------------------------------------------------------------------------------
# Counting


def block_reason(rate: Rate) -> str:
    """Why a user whose *rate* bucket emptied is blocked (as the local policy words it)."""
    return f"{rate.count} failed recipients within {format_duration(rate.period)}"


@attrs.frozen
class CountCall:
    """One call of the script's ``count`` (or ``peek``): its keys and arguments, and the
    limits it counts under, which its answer is read with (:func:`parse_count`)."""

    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]
    rates: tuple[Rate, ...] = ()


def count_call(  # noqa: PLR0913 - every argument is part of the one call
    keys: Keys,
    user: str,
    rcpt: str,
    rates: tuple[Rate, ...],
    *,
    mode: Mode,
    relay: str,
    origin: str,
    now: float | None = None,
) -> CountCall:
    """The script call that counts *rcpt* failing for *user* under *rates*.

    *now* is for tests; the daemon leaves it to the server's clock.
    """
    return CountCall(
        keys=(keys.count(user), keys.blocks, keys.events, keys.would_block(user)),
        args=(
            b"count",
            user.encode(ENCODING, ERRORS),
            b"%d" % int(buckets.fingerprint(rcpt)),
            b"" if now is None else _number(now),
            *_window_args(rates, mode, relay, origin),
        ),
        rates=rates,
    )


@functools.lru_cache(maxsize=256)
def _window_args(rates: tuple[Rate, ...], mode: Mode, relay: str, origin: str) -> tuple[bytes, ...]:
    """The arguments of a count that depend only on the limits and the relay (made once per
    set of limits, not per failure: they are on the query path)."""
    args = [
        mode.value.encode("ascii"),
        relay.encode("ascii"),
        origin.encode("ascii"),
        b"%d" % max(buckets.MIN_RECENT, *(rate.count for rate in rates)),
        b"%d" % EVENTS_KEPT,
        b"%d" % len(rates),
    ]
    for rate in rates:
        args += [
            b"%d" % rate.count,
            b"%d" % rate.period,
            record_tail(block_reason(rate), "auto", relay, origin=origin, rate=rate),
        ]
    return tuple(args)


def peek_call(
    keys: Keys, user: str, rates: Sequence[Rate], *, now: float | None = None
) -> CountCall:
    """The script call that reads *user*'s fleet-wide counting state under *rates*, for
    ``show``; it changes nothing. *now* is for tests (the server's clock otherwise)."""
    windows: list[bytes] = []
    for rate in rates:
        windows += [b"%d" % rate.count, b"%d" % rate.period]
    return CountCall(
        keys=(keys.count(user),),
        args=(
            b"peek",
            user.encode(ENCODING, ERRORS),
            b"" if now is None else _number(now),
            b"%d" % buckets.recent_limit(rates),
            b"%d" % len(rates),
            *windows,
        ),
    )


@attrs.frozen
class FleetWindows:
    """A user's counting state in the store, as ``peek`` answers it."""

    #: The server's clock (seconds since the epoch) the state is as of.
    now: float
    #: Tokens left per window, refilled up to :attr:`now`.
    tokens_left: tuple[float, ...]
    #: Distinct failures remembered within each window's period.
    counted: tuple[int, ...]


def parse_peek(rates: Sequence[Rate], reply: object) -> FleetWindows:
    """The script's answer to ``peek``.

    Raises:
        ValueError: the answer is not what the script returns.
    """
    w = len(rates)
    if not isinstance(reply, list) or len(reply) != 1 + 2 * w:
        raise ValueError(f"unexpected answer to peek: {reply!r:.200}")
    counted = reply[1 + w :]
    if not all(isinstance(value, int) for value in counted):
        raise ValueError(f"unexpected counts in the answer to peek: {reply!r:.200}")
    try:
        now, *tokens = (float(_text(value)) for value in reply[: 1 + w])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unexpected numbers in the answer to peek: {exc}") from None
    return FleetWindows(now=now, tokens_left=tuple(tokens), counted=tuple(counted))


def parse_count(user: str, rates: Sequence[Rate], reply: object) -> StoreCount:
    """The script's answer to ``count`` as a :class:`~spamguardd.core.policy.StoreCount`.

    Raises:
        ValueError: the answer is not what the script returns (another script under that name,
            a store that is not Redis).
    """
    if not isinstance(reply, list) or len(reply) < 4:
        raise ValueError(f"unexpected answer to count: {reply!r:.200}")
    status_raw, counted, tripped, record = reply[:4]
    try:
        status = StoreCountStatus(_text(status_raw))
    except (TypeError, ValueError):
        raise ValueError(f"unexpected status in the answer to count: {status_raw!r:.80}") from None
    if not isinstance(counted, int) or not isinstance(tripped, int):
        # ValueError like every other malformed answer: the caller handles one kind
        raise ValueError(f"unexpected answer to count: {reply!r:.200}")  # noqa: TRY004
    if not 0 <= tripped <= len(rates):
        raise ValueError(f"count names window {tripped} of {len(rates)}")
    stored = None
    if status in (StoreCountStatus.BLOCKED, StoreCountStatus.BLOCK):
        if not isinstance(record, bytes):
            raise ValueError(f"unexpected block record in the answer to count: {record!r:.80}")
        stored = decode_record(user, record)
    tokens: tuple[float, ...] | None = None
    if status is not StoreCountStatus.BLOCKED:
        if len(reply) != 4 + len(rates):
            raise ValueError(f"count answered {len(reply) - 4} windows, expected {len(rates)}")
        try:
            tokens = tuple(float(_text(value)) for value in reply[4:])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"unexpected tokens in the answer to count: {exc}") from None
    return StoreCount(
        status=status,
        counted=bool(counted),
        tripped=rates[tripped - 1] if tripped else (stored.rate if stored else None),
        tokens_left=tokens,
        block=None if stored is None else stored.block,
        made_by="" if stored is None else stored.origin,
        made_on="" if stored is None else stored.relay,
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string (got {value!r:.80})")


# ---------------------------------------------------------------------------------------------
# Events


class Op(enum.StrEnum):
    """What an event announces."""

    BLOCK = "block"
    UNBLOCK = "unblock"
    RESET = "reset"
    RELOAD = "reload"


@attrs.frozen
class Event:
    """One entry of the events stream: a change made on *relay* by the daemon *origin*."""

    op: Op
    user: str
    origin: str
    relay: str
    #: The block, for ``block``.
    block: Block | None = None
    #: The window that emptied, for an automatic ``block``.
    rate: Rate | None = None
    #: Who lifted the block, forgot the counters or reloaded, for ``unblock``, ``reset`` and
    #: ``reload``.
    by: str = ""
    #: Wall-clock time of an unblock or reset.
    at: float = 0.0
    #: The sender's :func:`policy_digest`, for ``reload``.
    digest: str = ""


def event_fields(event: Event) -> dict[bytes, bytes]:
    """The stream fields of *event* (block events are written by the script itself)."""
    fields = {
        b"op": event.op.value.encode("ascii"),
        b"user": event.user.encode(ENCODING, ERRORS),
        b"origin": event.origin.encode("ascii"),
        b"relay": event.relay.encode("ascii"),
    }
    if event.digest:
        fields[b"digest"] = event.digest.encode("ascii")
    if event.by:
        fields[b"by"] = event.by.encode(ENCODING, ERRORS)
    return fields


def parse_event(fields: Mapping[bytes, bytes]) -> Event:
    """An event from its stream fields.

    Raises:
        ValueError: an unknown operation, or a field missing or damaged.
    """

    def text(name: bytes) -> str:
        value = fields.get(name)
        if value is None:
            raise ValueError(f"event without {name.decode()}")
        return value.decode(ENCODING, ERRORS)

    op = Op(text(b"op"))
    user = text(b"user") if op is not Op.RELOAD else fields.get(b"user", b"").decode()
    origin, relay = text(b"origin"), text(b"relay")
    if op is Op.BLOCK:
        stored = decode_record(user, fields.get(b"record", b""))
        return Event(op, user, origin, relay or stored.relay, block=stored.block, rate=stored.rate)
    if op is Op.RELOAD:
        return Event(
            op,
            "",
            origin,
            relay,
            digest=fields.get(b"digest", b"").decode("ascii"),
            by=fields.get(b"by", b"").decode(ENCODING, ERRORS),
        )
    try:
        at = float(text(b"at"))
    except ValueError:
        raise ValueError(f"{op} event with a damaged time") from None
    return Event(op, user, origin, relay, by=text(b"by"), at=at)


# ---------------------------------------------------------------------------------------------
# Catching up


@attrs.frozen
class CatchUp:
    """What a relay does to agree with the store after being away (or at start)."""

    #: Blocks the fleet made meanwhile: apply them here (no notice: their maker sent it).
    adopt: tuple[Block, ...] = ()
    #: Local blocks lifted elsewhere meanwhile (user, when): lift them here.
    lift: tuple[tuple[str, float], ...] = ()
    #: Local blocks the store does not know (made here while it was away, or the store lost its
    #: data): push them, so the fleet has them.
    push: tuple[Block, ...] = ()


def plan_catch_up(
    local: Mapping[str, Block], remote: Mapping[str, Block], unblocked: Mapping[str, float]
) -> CatchUp:
    """Reconcile this relay's block list with the store's.

    A block the store has and this relay lacks is adopted. A block this relay has and the store
    lacks was either lifted elsewhere (an unblock recorded at or after its time: lift it here)
    or never reached the store (push it). Blocks both have stay as they are.
    """
    adopt = tuple(block for user, block in sorted(remote.items()) if user not in local)
    lift: list[tuple[str, float]] = []
    push: list[Block] = []
    for user, block in sorted(local.items()):
        if user in remote:
            continue
        at = unblocked.get(user)
        if at is not None and at >= block.blocked_at:
            lift.append((user, at))
        else:
            push.append(block)
    return CatchUp(adopt, tuple(lift), tuple(push))


def policy_digest(config: PolicyConfig) -> str:
    """A short fingerprint of what every relay must agree on: mode, limits, overrides.

    Relays compare it after a fleet-wide reload: relays counting one user under different
    limits would carry the user's buckets back and forth between them.
    """
    text = repr(
        (
            config.mode.value,
            tuple(map(str, config.failed_recipients)),
            sorted((user, tuple(map(str, rates))) for user, rates in config.overrides.items()),
        )
    )
    return hashlib.blake2b(text.encode(ENCODING, ERRORS), digest_size=8).hexdigest()
