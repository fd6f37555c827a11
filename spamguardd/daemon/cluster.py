"""Fleet mode: this relay's link to the shared store (Redis or Valkey), through coredis.

Relays share two things through the store: the counting of failed recipients (one script call
per failure, atomic on the server: refill, de-duplicate, take a token in every window, and make
the block when a bucket empties) and the block list (a hash every relay mirrors, and a stream of
changes every relay follows). Recipients that verify never reach the store: a blocked user is
answered from this relay's own block list, which the stream keeps in step.

The store is a help, never a condition of service:

* no query waits for it longer than ``cluster.timeout``; a query that would, and every query
  while the store is away, is counted locally as a single host would (degraded mode);
* going away and coming back are logged once each (``cluster_down``, ``cluster_up``) and shown
  in ``stats`` and ``spamguardd_cluster_up``;
* on its return (and at start) this relay catches up: it adopts the blocks the fleet made
  meanwhile, lifts the ones unblocked elsewhere, and pushes the blocks it made alone
  (:func:`spamguardd.core.cluster.plan_catch_up`); unblocks and resets an admin made here while
  it was away are pushed first.

Changes made on other relays are carried out by the effects executor with their relay's name:
logged, journaled and written to the block file like local ones, with no second notice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.resources
import logging
import math
import select
import ssl
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import coredis
import structlog
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from spamguardd.core import cluster
from spamguardd.core.cluster import (
    UNBLOCK_RETENTION,
    CountCall,
    Event,
    Keys,
    Op,
    StoredBlock,
    count_call,
    decode_record,
    encode_record,
    parse_count,
    parse_event,
    plan_catch_up,
    policy_digest,
)
from spamguardd.core.config import ClusterConfig
from spamguardd.core.errors import ConfigError, StoreError
from spamguardd.core.policy import (
    Block,
    Change,
    Decision,
    Policy,
    Reset,
    StoreCountStatus,
    WindowView,
)
from spamguardd.core.protocol import RcptRequest, Request
from spamguardd.core.rate import Rate
from spamguardd.core.resp import NEED_DATA, ErrorReply, Reply
from spamguardd.core.statistics import ClusterStatistics
from spamguardd.core.timestamps import format_time
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.daemon.store_link import PendingCall, StoreLink, StoreLinkError

log = structlog.get_logger("spamguardd.daemon.cluster")
T = TypeVar("T")

#: Seconds between two attempts to reach a store that went away.
RETRY_INTERVAL: Final = 0.5
#: The budget of what runs off the query path: catching up, admin changes, pushes, one read of
#: the events stream beyond its blocking wait.
BACKGROUND_TIMEOUT: Final = 5.0
#: Calls in a row that get no answer within ``cluster.timeout`` before the relay counts locally
#: (degraded mode) until the store has caught up again; each of them is counted locally anyway.
SLOW_CALLS_TO_GO_DOWN: Final = 3
#: How long a failed recipient's count waits for the store's answer on the spot, holding the
#: event loop (while no new query is waiting), before it waits in the scheduler instead. On
#: loopback the answer takes about 0.1 ms; a wait in the scheduler costs a task, a scheduler
#: turn and epoll bookkeeping besides (docs/fleet.md).
ANSWER_ON_THE_SPOT: Final = 0.001
#: How long an admin's change (block, unblock, reset, reload) waits for the store before it is
#: made here alone and kept to be pushed when the store is back: the admin is waiting, and a
#: block is not in force until this is settled.
ADMIN_TIMEOUT: Final = 1.0
#: ``PING``s tried before counting goes back to a store that was away; the fastest must come
#: back within ``cluster.timeout``.
PROBES: Final = 3
#: How long ``show`` waits for the fleet's counts before it shows this relay's own.
SHOW_TIMEOUT: Final = 2.0
#: How long one read of the events stream waits on the server for something new.
FOLLOW_WAIT_MS: Final = 1000
#: Events read at once.
FOLLOW_BATCH: Final = 500
SCRIPT: Final = importlib.resources.files(__package__).joinpath("fleet.lua").read_bytes()
SCRIPT_SHA: Final = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest().encode()

# coredis logs every failed connection attempt with a traceback; the daemon says it once itself
# (cluster_down / cluster_up) with the reason.
logging.getLogger("coredis").setLevel(logging.CRITICAL)


class StoreUnavailableError(Exception):
    """The store did not answer, or answered what the script never returns."""


def read_password(path: Path, *, source: str) -> tuple[str, list[str]]:
    """The first line of ``cluster.password_file``, and warnings about the file (it is readable
    by every local user). *source* is the configuration file, named in every message.

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    where = f"{source}: cluster.password_file: {path}"
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError([f"{where}: cannot read: {reason}"]) from exc
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise ConfigError([f"{where}: empty"])
    warnings = []
    if mode & stat.S_IROTH:
        warnings.append(
            f"{where}: readable by every local user (mode {stat.S_IMODE(mode):04o}); "
            "make it 0640 root:spamguardd"
        )
    return password, warnings


def _tls_context(config: ClusterConfig) -> ssl.SSLContext | None:
    """The TLS context of a ``rediss://`` URL, checked against ``cluster.tls_ca_file`` or the
    system's CAs; None for plain connections."""
    if config.url is None or not config.url.tls:
        return None
    cafile = None if config.tls_ca_file is None else str(config.tls_ca_file)
    return ssl.create_default_context(cafile=cafile)


def make_client(config: ClusterConfig, *, password: str | None, relay: str) -> coredis.Redis[bytes]:
    """A coredis client for ``cluster.url``: bytes in and out, no retries (the caller's budget
    decides), TLS checked against ``cluster.tls_ca_file`` or the system's CAs."""
    address = config.url
    if address is None:
        raise ValueError("fleet mode needs cluster.url")
    common: dict[str, Any] = {
        "db": address.db,
        "username": address.username,
        "password": password,
        "decode_responses": False,
        "retry_policy": NoRetryPolicy(),
        "connect_timeout": BACKGROUND_TIMEOUT,
        "client_name": f"spamguardd-{relay}",
    }
    if address.path is not None:
        return coredis.Redis(host=None, port=None, unix_socket_path=address.path, **common)
    context = _tls_context(config)
    return coredis.Redis(
        host=address.host, port=address.port, ssl=context is not None, ssl_context=context, **common
    )


def make_link(config: ClusterConfig, *, password: str | None, relay: str) -> StoreLink:
    """The script calls' own connections to ``cluster.url`` (see :mod:`.store_link`)."""
    if config.url is None:
        raise ValueError("fleet mode needs cluster.url")
    return StoreLink(
        config.url,
        password=password,
        tls=_tls_context(config),
        client_name=f"spamguardd-{relay}-calls",
    )


class Store:
    """The store's operations as spamguardd uses them; every failure is
    :class:`StoreUnavailableError`."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        link: StoreLink,
        keys: Keys,
        *,
        relay: str,
        origin: str,
    ) -> None:
        self.client = client
        self.link = link
        self.keys = keys
        self.relay = relay
        self.origin = origin

    async def _call(self, keys: Sequence[bytes], args: Sequence[bytes]) -> Reply:
        """One ``EVALSHA`` of the script, loading it first if the server does not know it (a
        restart, a failover).

        The call goes through :class:`StoreLink`, written and read by the calling task (the
        query path's cost; see :mod:`.store_link`); loading the script goes through coredis.
        """
        reply = await self._evalsha(keys, args)
        if isinstance(reply, ErrorReply) and reply.code == "NOSCRIPT":
            try:
                await self.client.script_load(SCRIPT)
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
            reply = await self._evalsha(keys, args)
        if isinstance(reply, ErrorReply):
            raise StoreUnavailableError(reply.message)
        return reply

    async def _evalsha(self, keys: Sequence[bytes], args: Sequence[bytes]) -> Reply:
        try:
            return await self.link.call(b"EVALSHA", SCRIPT_SHA, b"%d" % len(keys), *keys, *args)
        except StoreLinkError as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the script calls' connections (coredis closes its own)."""
        await self.link.aclose()

    async def count(self, call: cluster.CountCall) -> Reply:
        """The script's raw answer to one ``count``."""
        return await self._call(call.keys, call.args)

    async def peek(
        self, user: str, rates: Sequence[Rate], *, now: float | None = None
    ) -> cluster.FleetWindows:
        """*user*'s counting state in the store (for ``show``); *now* is for tests."""
        call = cluster.peek_call(self.keys, user, rates, now=now)
        try:
            return cluster.parse_peek(rates, await self._call(call.keys, call.args))
        except ValueError as exc:
            raise StoreUnavailableError(str(exc)) from exc

    def start_count(self, call: cluster.CountCall) -> PendingCall | None:
        """Write one ``count`` at once (:meth:`StoreLink.start`); None: use :meth:`count`."""
        keys = call.keys
        return self.link.start(b"EVALSHA", SCRIPT_SHA, b"%d" % len(keys), *keys, *call.args)

    async def finish_count(self, call: cluster.CountCall, pending: PendingCall) -> Reply:
        """The script's raw answer to a ``count`` begun by :meth:`start_count`."""
        try:
            reply = await pending.result()
        except StoreLinkError as exc:
            raise StoreUnavailableError(str(exc)) from exc
        if isinstance(reply, ErrorReply) and reply.code == "NOSCRIPT":
            return await self._call(call.keys, call.args)  # the script did not run: load it
        if isinstance(reply, ErrorReply):
            raise StoreUnavailableError(reply.message)
        return reply

    async def block(self, block: Block, *, pushed: bool) -> tuple[str, bytes]:
        """Write *block* unless the fleet has one; ``(status, record)`` as the script answers."""
        keys = self.keys
        answer = await self._call(
            (
                keys.blocks,
                keys.events,
                keys.count(block.user),
                keys.would_block(block.user),
                keys.unblocked,
            ),
            (
                b"block",
                _user(block.user),
                encode_record(block, self.relay, origin=self.origin),
                b"%d" % int(block.blocked_at),
                self.origin.encode(),
                self.relay.encode(),
                b"%d" % cluster.EVENTS_KEPT,
                b"1" if pushed else b"0",
            ),
        )
        return _pair(answer)

    async def unblock(self, user: str, *, by: str, at: float) -> tuple[str, bytes]:
        """Lift *user*'s block fleet-wide; ``(status, record)`` as the script answers."""
        keys = self.keys
        answer = await self._call(
            (keys.blocks, keys.events, keys.count(user), keys.would_block(user), keys.unblocked),
            (
                b"unblock",
                _user(user),
                repr(float(at)).encode(),
                _user(by),
                self.origin.encode(),
                self.relay.encode(),
                b"%d" % cluster.EVENTS_KEPT,
                b"%d" % UNBLOCK_RETENTION,
            ),
        )
        return _pair(answer)

    async def reset(self, user: str, *, by: str, at: float) -> bool:
        """Forget *user*'s counters fleet-wide; whether the store had any."""
        keys = self.keys
        answer = await self._call(
            (keys.count(user), keys.would_block(user), keys.events),
            (
                b"reset",
                _user(user),
                _user(by),
                repr(float(at)).encode(),
                self.origin.encode(),
                self.relay.encode(),
                b"%d" % cluster.EVENTS_KEPT,
            ),
        )
        return isinstance(answer, int) and answer > 0

    async def announce_reload(self, digest: str, *, by: str) -> None:
        """Tell every relay to re-read its configuration (asked by *by*)."""
        fields = cluster.event_fields(
            Event(Op.RELOAD, "", self.origin, self.relay, digest=digest, by=by)
        )
        try:
            await self.client.xadd(self.keys.events, fields)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc

    async def last_event_id(self) -> bytes:
        """The newest event's id (``0-0`` for none): where following starts after a catch-up."""
        try:
            newest = await self.client.xrevrange(self.keys.events, "+", "-", count=1)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
        return _bytes(newest[0].identifier) if newest else b"0-0"

    async def fleet_blocks(self) -> tuple[dict[str, StoredBlock], dict[str, float]]:
        """The fleet's block list and when each user was last unblocked."""
        try:
            raw = await self.client.hgetall(self.keys.blocks)
            scored = await self.client.zrange(self.keys.unblocked, 0, -1, withscores=True)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
        blocks: dict[str, StoredBlock] = {}
        for field, record in raw.items():
            user = _text(field)
            try:
                blocks[user] = decode_record(user, _bytes(record))
            except ValueError as exc:
                log.error("cluster_record_damaged", user=user, error=str(exc))
        unblocked = {_text(member.member): float(member.score) for member in scored}
        return blocks, unblocked

    async def read_events(self, after: bytes) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Events after *after*, waiting up to :data:`FOLLOW_WAIT_MS` for one."""
        try:
            found = await self.client.xread(
                {self.keys.events: after}, count=FOLLOW_BATCH, block=FOLLOW_WAIT_MS
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(str(exc) or type(exc).__name__) from exc
        if not found:
            return []
        entries = next(iter(found.values()))
        return [
            (
                _bytes(entry.identifier),
                {_bytes(k): _bytes(v) for k, v in entry.field_values.items()},
            )
            for entry in entries
        ]


def _user(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _pair(answer: Any) -> tuple[str, bytes]:
    if (
        not isinstance(answer, list)
        or len(answer) != 2
        or not all(isinstance(item, bytes) for item in answer)
    ):
        raise StoreUnavailableError(f"unexpected answer from the store: {answer!r:.200}")
    return answer[0].decode("ascii", "replace"), answer[1]


class Cluster:
    """One relay's part in the fleet: counting through the store, following its changes,
    degraded mode while it is away. See the module docstring.

    Args:
        config: the ``[cluster]`` section (``url`` set).
        policy: the relay's policy.
        effects: where changes (local or from other relays) are carried out.
        reload: re-reads this relay's configuration (a fleet-wide reload); returns whether the
            new one was taken.
        password: the store's password, read from ``password_file``.
        relay: this relay's name (``cluster.name``, else the host name).
        wall_clock: the wall clock.
    """

    def __init__(  # noqa: PLR0913 - keyword-only seams, one per collaborator
        self,
        config: ClusterConfig,
        policy: Policy,
        effects: EffectExecutor,
        *,
        reload: Callable[[], bool],
        password: str | None = None,
        relay: str,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.policy = policy
        self.effects = effects
        self.relay = relay
        #: Tells this daemon's own events from those of a relay of the same name (a restart).
        self.origin = uuid.uuid4().hex
        self.wall_clock = wall_clock
        self._reload = reload
        self.client = make_client(config, password=password, relay=relay)
        self.store = Store(
            self.client,
            make_link(config, password=password, relay=relay),
            Keys.for_prefix(config.key_prefix),
            relay=relay,
            origin=self.origin,
        )
        #: Whether the store answers (False until the first catch-up is done).
        self.up = False
        self._down_since: float | None = wall_clock()
        self._reported_down = False
        self._slow_in_a_row = 0
        #: Whether the store's last answer came within :data:`ANSWER_ON_THE_SPOT`: only then is
        #: the next one read on the spot (see :meth:`start_count`).
        self._quick = True
        #: Users whose admin block is being written to the store (:meth:`claim_block`).
        self._claiming: set[str] = set()
        #: Admin changes made while the store was away, pushed first when it returns, in order.
        self._pending: list[tuple[Op, str, str, float]] = []
        self._outages = self._store_counts = self._local_counts = 0
        self._timeouts = self._errors = self._remote_changes = self._pushed = 0

    def statistics(self) -> ClusterStatistics:
        """Current state and counters."""
        return ClusterStatistics(
            relay=self.relay,
            store=str(self.config.url),
            up=self.up,
            down_since=self._down_since,
            outages=self._outages,
            store_counts=self._store_counts,
            local_counts=self._local_counts,
            timeouts=self._timeouts,
            errors=self._errors,
            remote_changes=self._remote_changes,
            pushed=self._pushed,
        )

    # -- the query path -----------------------------------------------------------------------

    def to_count(self, request: Request) -> RcptRequest | None:
        """The failure *request* makes the store count, or None: it is decided here alone (a
        verifying recipient, a blocked user, ...; or any request while the store is away)."""
        counted = self.policy.to_count(request)
        if counted is not None and not self.up:
            self._local_counts += 1
            return None
        return counted

    def start_count(
        self, request: RcptRequest, *, watching: select.poll
    ) -> Decision | Callable[[], Awaitable[Decision]]:
        """Count *request* in the store without leaving the caller when the answer is quick.

        The script call is written at once and its answer waited for on the spot for up to
        :data:`ANSWER_ON_THE_SPOT`, while no descriptor in *watching* (the query listeners)
        has input: something else wants the event loop then. Returns the decision, or a
        coroutine function that finishes the count in the scheduler within ``cluster.timeout``
        (as :meth:`decide`).
        A store that did not answer on the spot is not waited for so again until one of its
        answers comes back quick: a slow store costs the event loop nothing.
        """
        call = self._count_call(request)
        pending = self.store.start_count(call) if self._quick else None
        if pending is None:
            return functools.partial(self.decide, request)
        started = time.monotonic()
        try:
            reply = pending.read_now(ANSWER_ON_THE_SPOT, watching)
        except StoreLinkError as exc:
            return self._failed(request, str(exc))
        if isinstance(reply, type):  # NEED_DATA
            if time.monotonic() - started >= ANSWER_ON_THE_SPOT:
                self._quick = False
            return functools.partial(self._finish, request, call, pending, started)
        if isinstance(reply, ErrorReply):
            if reply.code == "NOSCRIPT":  # the script did not run: count afresh (it loads it)
                return functools.partial(self.decide, request)
            return self._failed(request, reply.message)
        return self._counted(request, call.rates, reply)

    async def _finish(
        self, request: RcptRequest, call: CountCall, pending: PendingCall, started: float
    ) -> Decision:
        """The rest of a count begun by :meth:`start_count`."""
        return await self.decide(request, _begun=(call, pending, started))

    async def decide(
        self,
        request: RcptRequest,
        *,
        _begun: tuple[CountCall, PendingCall, float] | None = None,
    ) -> Decision:
        """Count *request* in the store and decide it; locally when the store cannot answer in
        ``cluster.timeout``. Never raises for the store's sake."""
        reply: Reply | type[NEED_DATA] = NEED_DATA
        budget = self.config.timeout
        if _begun is not None:  # the wait on the spot was part of the budget
            budget -= time.monotonic() - _begun[2]
        with trio.move_on_after(budget):
            try:
                if _begun is None:
                    started = time.monotonic()
                    call = self._count_call(request)
                    reply = await self.store.count(call)
                else:
                    call, pending, started = _begun
                    reply = await self.store.finish_count(call, pending)
                self._quick = time.monotonic() - started < ANSWER_ON_THE_SPOT
            except StoreUnavailableError as exc:
                return self._failed(request, str(exc))
        if isinstance(reply, type):  # NEED_DATA
            # the budget ran out: slow once may be a moment; slow in a row is down
            self._timeouts += 1
            self._slow_in_a_row += 1
            if self._slow_in_a_row >= SLOW_CALLS_TO_GO_DOWN:
                self._went_down(
                    f"{self._slow_in_a_row} calls in a row without an answer within "
                    f"{self.config.timeout * 1000:g} ms"
                )
            return self._decide_here(request)
        return self._counted(request, call.rates, reply)

    def _count_call(self, request: RcptRequest) -> CountCall:
        return count_call(
            self.store.keys,
            request.user,
            request.rcpt,
            self.policy.config.limits_for(request.user),
            mode=self.policy.config.mode,
            relay=self.relay,
            origin=self.origin,
        )

    def _decide_here(self, request: RcptRequest) -> Decision:
        """Count *request* locally (the store did not answer in time, or failed)."""
        self._local_counts += 1
        return self.policy.decide(request, now=trio.current_time(), wall_now=self.wall_clock())

    def _failed(self, request: RcptRequest, error: str) -> Decision:
        self._errors += 1
        self._went_down(error)
        return self._decide_here(request)

    def _counted(self, request: RcptRequest, rates: tuple[Rate, ...], reply: Reply) -> Decision:
        """Decide *request* from the script's answer to a count under *rates*."""
        policy = self.policy
        try:
            count = parse_count(request.user, rates, reply)
        except ValueError as exc:
            return self._failed(request, str(exc))
        self._slow_in_a_row = 0
        self._store_counts += 1
        block = count.block
        if count.status is StoreCountStatus.BLOCKED and block is not None:
            if count.made_by == self.origin:
                # made by another query of ours whose answer is not settled yet: whichever of
                # the two is settled first makes the block here, with its one notice
                count = attrs.evolve(count, status=StoreCountStatus.BLOCK)
            else:
                # blocked elsewhere; its event has not reached us yet: take the block now
                self._adopt_now(StoredBlock(block, count.made_on or "fleet"))
                return policy.decide(request, now=trio.current_time(), wall_now=self.wall_clock())
        return policy.settle(request, count, wall_now=self.wall_clock())

    async def windows(self, user: str) -> tuple[WindowView, ...] | None:
        """*user*'s windows as the fleet counts them (``show``); None when the store does not
        answer within :data:`SHOW_TIMEOUT` or is away (the caller shows this relay's own)."""
        if not self.up:
            return None
        rates = self.policy.config.limits_for(user)
        try:
            with trio.fail_after(SHOW_TIMEOUT):
                fleet = await self.store.peek(user, rates)
        except (StoreUnavailableError, trio.TooSlowError):
            return None
        return tuple(
            WindowView.at(rate, counted, tokens, fleet.now)
            for rate, counted, tokens in zip(rates, fleet.counted, fleet.tokens_left, strict=True)
        )

    def _adopt_now(self, stored: StoredBlock) -> None:
        change = self.policy.adopt_block(stored.block)
        if change.effects:
            self._remote_changes += 1
            self.effects.carry_out(change.effects, relay=stored.relay or "fleet")

    # -- admin changes, fleet-wide ------------------------------------------------------------

    async def claim_block(self, block: Block) -> StoredBlock | None:
        """Write an admin's *block* to the fleet before it is made here.

        Returns:
            The fleet's own block of that user when it has one (it stands, and this relay
            adopts it instead: one block, one notice), else None (written, or the store is away
            and catching up will push it).
        """
        if not self.up:  # made here now, pushed when the store is back
            return None
        # the store announces the block to every relay, this one too: the caller makes it
        # here, with the admin's answer, so its announcement is not taken as a count's
        self._claiming.add(block.user)
        try:
            with trio.fail_after(ADMIN_TIMEOUT):
                status, record = await self.store.block(block, pushed=False)
        except (StoreUnavailableError, trio.TooSlowError) as exc:
            self._went_down(str(exc) or "no answer")
            return None
        finally:
            self._claiming.discard(block.user)
        if status != "exists":
            return None
        return decode_record(block.user, record)

    async def unblocked(self, user: str, *, by: str, at: float) -> None:
        """Announce an unblock made here; kept for later while the store is away."""
        await self._send(Op.UNBLOCK, user, by, at)

    async def reset(self, user: str, *, by: str, at: float) -> bool | None:
        """Forget *user*'s counters in the store; None when it is away (done on its return)."""
        return await self._send(Op.RESET, user, by, at)

    async def reloaded(self, *, by: str) -> None:
        """Tell the other relays to reload their configuration (an admin's ``reload``)."""
        if not self.up:
            log.warning("cluster_reload_not_announced", reason="the store is away")
            return
        try:
            with trio.fail_after(ADMIN_TIMEOUT):
                await self.store.announce_reload(policy_digest(self.policy.config), by=by)
        except (StoreUnavailableError, trio.TooSlowError) as exc:
            self._went_down(str(exc) or "no answer")

    async def _send(self, op: Op, user: str, by: str, at: float) -> bool | None:
        if self.up:
            try:
                with trio.fail_after(ADMIN_TIMEOUT):
                    return await self._push_one(op, user, by, at)
            except (StoreUnavailableError, trio.TooSlowError) as exc:
                self._went_down(str(exc) or "no answer")
        self._pending.append((op, user, by, at))
        return None

    async def _push_one(self, op: Op, user: str, by: str, at: float) -> bool:
        if op is Op.RESET:
            return await self.store.reset(user, by=by, at=at)
        status, record = await self.store.unblock(user, by=by, at=at)
        if status == "newer":  # blocked again elsewhere after this unblock: that block stands
            await self.adopt(decode_record(user, record))
        return status == "lifted"

    # -- following the fleet ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link: connect, catch up, follow the events; after a failure, wait and again."""
        async with self.client:
            task_status.started()
            try:
                while True:
                    try:
                        after = await self._catch_up()
                        await self._follow(after)
                    except (StoreUnavailableError, trio.TooSlowError) as exc:
                        self._went_down(str(exc) or "no answer")
                    await trio.sleep(RETRY_INTERVAL)
            finally:
                with trio.CancelScope(shield=True):
                    await self.store.aclose()

    async def _catch_up(self) -> bytes:
        """Agree with the store after being away (or at start); returns the event id to follow
        from.

        Counting goes back to the store first: decisions are synchronous, so from then on no
        block can be made here alone, and the block list read next holds every block made here
        while the store was away.
        """
        await self._probe()
        # each call has the background budget, not the whole catch-up: a fleet with many
        # blocks to push back (a store that lost its data) takes as long as it takes
        after = await _bounded(self.store.last_event_id())
        while self._pending:
            op, user, by, at = self._pending[0]
            await _bounded(self._push_one(op, user, by, at))
            self._pending.pop(0)
        self.up = True
        remote, unblocked = await _bounded(self.store.fleet_blocks())
        plan = plan_catch_up(
            self.policy.blocks, {user: s.block for user, s in remote.items()}, unblocked
        )
        own = [remote[b.user] for b in plan.adopt if remote[b.user].origin == self.origin]
        changes = [
            (self.policy.adopt_block(block), remote[block.user].relay or "fleet")
            for block in plan.adopt
            if remote[block.user].origin != self.origin
        ]
        changes += [self._lift(user, by="fleet", at=at, relay="fleet") for user, at in plan.lift]
        pushed = 0
        for block in plan.push:
            status, _ = await _bounded(self.store.block(block, pushed=True))
            if status == "unblocked":  # lifted elsewhere after it was made: lift it here too
                changes.append(
                    self._lift(block.user, by="fleet", at=self.wall_clock(), relay="fleet")
                )
            elif status == "new":  # not when another relay pushed the same block first
                pushed += 1
                log.info("cluster_block_pushed", user=block.user, reason=block.reason)
        self._pushed += pushed
        await self._carry_out(changes)
        for stored in own:
            await self._own_block(stored.block, stored.rate)
        self._came_back(len(plan.adopt), len(plan.lift), pushed)
        return after

    async def _probe(self) -> None:
        """Make sure the store answers within ``cluster.timeout`` before counting goes back to
        it: one that answers, but slower (a saturated server, a congested link), would have
        every count given up on, and the relay would go up and down all the time.

        Raises:
            StoreUnavailableError: no ``PING`` of :data:`PROBES` came back within the budget.
        """
        budget = self.config.timeout
        fastest = math.inf
        for _ in range(PROBES):
            started = time.monotonic()
            try:
                with trio.fail_after(BACKGROUND_TIMEOUT):
                    await self.store.link.call(b"PING")
            except StoreLinkError as exc:
                raise StoreUnavailableError(str(exc)) from exc
            fastest = min(fastest, time.monotonic() - started)
            if fastest <= budget:
                return
        raise StoreUnavailableError(
            f"the store answers, but in {fastest * 1000:.0f} ms at best, more than "
            f"cluster.timeout ({budget * 1000:g} ms)"
        )

    async def _follow(self, after: bytes) -> None:
        """Apply the other relays' changes as they come, until the store fails."""
        while self.up:
            with trio.fail_after(FOLLOW_WAIT_MS / 1000 + BACKGROUND_TIMEOUT):
                entries = await self.store.read_events(after)
            changes = []
            for identifier, fields in entries:
                after = identifier
                try:
                    event = parse_event(fields)
                except ValueError as exc:
                    log.error("cluster_event_damaged", id=identifier.decode(), error=str(exc))
                    continue
                if event.origin != self.origin:
                    changes.append(self._change_for(event))
                elif (
                    event.op is Op.BLOCK
                    and event.block is not None
                    and event.block.user not in self._claiming
                ):
                    # ours: made by a count whose answer we stopped waiting for (or is still
                    # on its way); whichever comes first makes the block here, with the notice
                    await self._own_block(event.block, event.rate)
            await self._carry_out(changes)

    def _change_for(self, event: Event) -> tuple[Change, str]:
        if event.op is Op.BLOCK and event.block is not None:
            return self.policy.adopt_block(event.block), event.relay
        if event.op is Op.UNBLOCK:
            return self._lift(event.user, by=event.by, at=event.at, relay=event.relay)
        if event.op is Op.RESET:
            change = self.policy.reset(event.user, by=event.by, wall_now=event.at)
            if not change.effects:  # counted in the store only: still logged and journaled here
                change = Change((Reset(event.user, event.by, event.at),))
            return change, event.relay
        if event.op is Op.RELOAD:
            self._reload_for(event)
        return Change(), event.relay

    def _reload_for(self, event: Event) -> None:
        ok = self._reload()  # logs reloaded, or reload_failed and keeps the running configuration
        log.info("cluster_reload", relay=event.relay, by=event.by, reloaded=ok)
        if not ok:
            return
        self.effects.journal.record(
            {
                "at": format_time(self.wall_clock()),
                "event": "reload",
                "actor": event.by or "fleet",
                "relay": event.relay,
            }
        )
        mine = policy_digest(self.policy.config)
        if event.digest and event.digest != mine:
            log.warning(
                "cluster_config_differs",
                relay=event.relay,
                their_digest=event.digest,
                our_digest=mine,
                hint="every relay must have the same limits, overrides and mode",
            )

    async def _own_block(self, block: Block, rate: Rate | None) -> None:
        change = self.policy.own_block(block, rate)
        if not change.effects:
            return
        log.info("cluster_own_block_settled", user=block.user, reason=block.reason)
        with contextlib.suppress(StoreError):  # logged and counted by the executor
            await self.effects.apply(change)

    async def adopt(self, stored: StoredBlock) -> None:
        """Take over a block the fleet has (made on ``stored.relay``), durably, without notice."""
        await self._carry_out([(self.policy.adopt_block(stored.block), stored.relay or "fleet")])

    def _lift(self, user: str, *, by: str, at: float, relay: str) -> tuple[Change, str]:
        block = self.policy.blocks.get(user)
        if block is None or block.blocked_at > at:
            return Change(), relay  # not blocked here, or blocked here again after the unblock
        return self.policy.unblock(user, by=by, wall_now=at), relay

    async def _carry_out(self, changes: Iterable[tuple[Change, str]]) -> None:
        """Carry out changes made elsewhere; the block file is written once for all of them."""
        generation = None
        for change, relay in changes:
            if not change.effects:
                continue
            self._remote_changes += 1
            self.effects.carry_out(change.effects, relay=relay)
            if change.needs_generation is not None:
                generation = change.needs_generation
        if generation is None:
            return
        # a failed write is logged and counted by the executor; the changes hold in memory
        with contextlib.suppress(StoreError):
            await self.effects.wait_durable(generation)

    # -- up and down --------------------------------------------------------------------------

    def _went_down(self, reason: str) -> None:
        if self.up:
            self.up = False
            if self._reported_down:  # catching up failed half-way: still the same outage
                return
            self._down_since = self.wall_clock()
        elif self._reported_down:
            return
        self._reported_down = True
        self._outages += 1
        log.warning(
            "cluster_down",
            store=str(self.config.url),
            reason=reason,
            action="counting locally until the store is back",
        )

    def _came_back(self, adopted: int, lifted: int, pushed: int) -> None:
        was_down_since = self._down_since
        self._down_since = None
        self._reported_down = False
        log.info(
            "cluster_up",
            store=str(self.config.url),
            relay=self.relay,
            adopted=adopted,
            lifted=lifted,
            pushed=pushed,
            down_for=None
            if was_down_since is None
            else round(self.wall_clock() - was_down_since, 3),
        )


async def _bounded(call: Awaitable[T]) -> T:
    """*call* within :data:`BACKGROUND_TIMEOUT` (raises ``trio.TooSlowError`` past it)."""
    with trio.fail_after(BACKGROUND_TIMEOUT):
        return await call
