"""The admin socket: ``spamguardctl`` asks here to list, show, block, unblock, reset, reload.

Unlike the query socket, this one changes state, so every connection is checked: the peer's
credentials (``SO_PEERCRED``, filled in by the kernel at connect time and impossible to forge)
must be root's, or name a user or group in ``admin.allowed_users``/``admin.allowed_groups``.
Anyone else gets one ``{"ok": false, ...}`` line saying so, the refusal is logged with the uid,
and the connection is closed.

Admin traffic is rare and small, so this is plain trio code: ``trio.serve_listeners`` (which
retries accept when descriptors run out) with a task per connection, each driving an
:class:`~spamguardd.core.adminproto.AdminConnection`; it never holds up the query path. A change
is carried out by the daemon's effects executor exactly like an automatic block, and answered
once it is durable (block file written and fsynced, journal entry fsynced).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import structlog
import trio

from spamguardd.core.adminproto import (
    CLOSED,
    NEED_DATA,
    AdminConnection,
    AdminRequestError,
    BlockInfo,
    BlockReply,
    Command,
    ErrorReply,
    FailureInfo,
    JournalNotes,
    ListReply,
    MetricsReply,
    ReloadReply,
    RepeatInfo,
    Reply,
    ResetReply,
    Role,
    ShowReply,
    StatsReply,
    UnblockReply,
    Verb,
    WindowInfo,
)
from spamguardd.core.config import AdminConfig, Config
from spamguardd.core.errors import StoreError
from spamguardd.core.expiry import expires, format_span, format_steps, step_for
from spamguardd.core.policy import Block, Change, Policy, Reset, Unblocked
from spamguardd.core.statistics import Statistics
from spamguardd.core.timestamps import format_time
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.daemon.metrics import render_metrics
from spamguardd.state.journal import JournalContents, read_journal

if TYPE_CHECKING:
    from spamguardd.daemon.cluster import Cluster

log = structlog.get_logger("spamguardd.daemon.admin_server")

#: Seconds a connected admin client may take to send a request line.
READ_TIMEOUT: Final = 30.0
#: After a refusal, how long the client's request is read and dropped before closing.
DRAIN_TIMEOUT: Final = 1.0
#: Admin connections served at once. spamguardctl uses one at a time; a script gone wrong that
#: opens them in a loop would otherwise hold descriptors the state files need (each may stay
#: up to READ_TIMEOUT): past the bound a connection gets one error line (and its request is
#: drained for up to DRAIN_TIMEOUT, at most as many again at once) and is closed.
MAX_ADMIN_CONNECTIONS: Final = 64
DEFAULT_BLOCK_REASON: Final = "blocked by an admin"
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ReloadOutcome(Protocol):
    """What the daemon's reload reports (``daemon.app.ReloadResult``)."""

    @property
    def ok(self) -> bool: ...  # pragma: no cover - protocol

    @property
    def source(self) -> str: ...  # pragma: no cover - protocol

    @property
    def problems(self) -> tuple[str, ...]: ...  # pragma: no cover - protocol

    @property
    def carried_users(self) -> int: ...  # pragma: no cover - protocol

    @property
    def needs_restart(self) -> tuple[str, ...]: ...  # pragma: no cover - protocol


class AdminTarget(Protocol):
    """What the admin socket works on: the running daemon."""

    @property
    def config(self) -> Config: ...  # pragma: no cover - protocol

    @property
    def policy(self) -> Policy: ...  # pragma: no cover - protocol

    @property
    def effects(self) -> EffectExecutor: ...  # pragma: no cover - protocol

    @property
    def cluster(self) -> Cluster | None: ...  # pragma: no cover - protocol

    def statistics(self) -> Statistics:
        """The daemon's counters now."""

    def reload(self) -> ReloadOutcome:
        """Re-read the configuration; a bad one is refused and the running one kept."""


def peer_credentials(conn: trio.socket.SocketType) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def is_allowed(config: AdminConfig, uid: int, gid: int) -> bool:
    """Whether a peer with *uid* and primary *gid* may use the admin socket.

    Root always may. Names are looked up now, not at start, so users and groups created or
    changed later count without a restart.
    """
    if uid == 0:
        return True
    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    if uid in config.allowed_users or (name is not None and name in config.allowed_users):
        return True
    if not config.allowed_groups:
        return False
    gids = {gid}
    if name is not None:
        with contextlib.suppress(OSError):
            gids.update(os.getgrouplist(name, gid))
    for group in config.allowed_groups:
        if isinstance(group, int):
            if group in gids:
                return True
            continue
        with contextlib.suppress(KeyError):
            if grp.getgrnam(group).gr_gid in gids:
                return True
    return False


class AdminServer:
    """Serves the admin protocol for one daemon."""

    def __init__(self, target: AdminTarget, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.wall_clock = wall_clock
        #: Requests refused as malformed, or that hit a bug; connections turned away because
        #: :data:`MAX_ADMIN_CONNECTIONS` were open.
        self.errors = 0
        self._serving = 0
        self._turning_away = 0
        #: Whether connections were turned away since the last time there was room (logged once).
        self._full = False
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Stop accepting; connections in progress are cancelled when :meth:`serve` returns."""
        self._stopping.set()

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept admin connections on *listener* until :meth:`stop`; closes the listener."""
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(listener))]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()
            await self._stopping.wait()
            nursery.cancel_scope.cancel()
        for each in listeners:
            await each.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._serving >= MAX_ADMIN_CONNECTIONS:
                # told why, unless as many again are being told: then closed at once
                if self._turning_away < MAX_ADMIN_CONNECTIONS:
                    self._turning_away += 1
                    try:
                        await self._turn_away(stream)
                    finally:
                        self._turning_away -= 1
                else:
                    self.errors += 1
                return
            self._serving += 1
            try:
                await self._converse(stream)
            except (OSError, trio.BrokenResourceError):
                pass  # the client went away; nothing to tell it
            except Exception:  # a bug here must not take the daemon down with it
                self.errors += 1
                log.exception("admin_internal_error")
            finally:
                self._serving -= 1
                self._full = False

    async def _turn_away(self, stream: trio.SocketStream) -> None:
        """One error line for a connection past :data:`MAX_ADMIN_CONNECTIONS`; its request is
        drained, not read."""
        if not self._full:
            log.warning("admin_connections_full", limit=MAX_ADMIN_CONNECTIONS)
            self._full = True
        self.errors += 1
        message = (
            f"{MAX_ADMIN_CONNECTIONS} admin connections are open already; try again when "
            "one has closed"
        )
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            with trio.move_on_after(DRAIN_TIMEOUT):
                await stream.send_all(AdminConnection(Role.SERVER).send(ErrorReply(error=message)))
            await _drain(stream)

    async def _converse(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_credentials(stream.socket)
        connection = AdminConnection(Role.SERVER)
        # user and group lookups may go to LDAP and the like: never on the query path's thread
        allowed = uid == 0 or await trio.to_thread.run_sync(
            is_allowed, self.target.config.admin, uid, gid
        )
        if not allowed:
            log.warning("admin_refused", uid=uid, gid=gid, pid=pid)
            message = (
                f"uid {uid} may not use the spamguardd admin socket "
                "(see admin.allowed_users and admin.allowed_groups)"
            )
            await stream.send_all(connection.send(ErrorReply(error=message)))
            await _drain(stream)
            return
        while True:
            try:
                event = connection.next_event()
            except AdminRequestError as exc:
                self.errors += 1
                await stream.send_all(connection.send(ErrorReply(error=str(exc))))
                continue
            if event is CLOSED:
                return
            if event is NEED_DATA:
                with trio.move_on_after(READ_TIMEOUT) as idle:
                    connection.receive_data(await stream.receive_some(65536))
                if idle.cancelled_caught:
                    return  # the client went quiet
                continue
            assert isinstance(event, Command)  # noqa: S101 - the server's connection reads commands
            await stream.send_all(connection.send(await self._answer(event, f"admin:{uid}")))

    async def _answer(self, command: Command, actor: str) -> Reply:
        try:
            return await self._dispatch(command, actor)
        except Exception:  # one bad command must not take the admin socket down
            self.errors += 1
            log.exception("admin_internal_error", command=command.command.value)
            return ErrorReply(error="internal error in spamguardd; see its log")

    async def _dispatch(self, command: Command, actor: str) -> Reply:
        verb = command.command
        if verb is Verb.LIST:
            policy = self.target.policy
            verdict = policy.config.verdict.value
            blocks = sorted(policy.blocks.values(), key=lambda b: b.user)
            within = policy.config.repeat_within
            return ListReply(
                blocked=tuple(BlockInfo.from_block(b, verdict, within) for b in blocks)
            )
        if verb is Verb.STATS:
            return StatsReply.from_statistics(self.target.statistics())
        if verb is Verb.METRICS:
            return MetricsReply(text=render_metrics(self.target.statistics()))
        if verb is Verb.RELOAD:
            return await self._reload(actor)
        user = command.user
        assert user is not None  # noqa: S101 - Command.from_json guarantees it for these verbs
        if verb is Verb.BLOCK:
            return await self._block(
                user, command.reason or DEFAULT_BLOCK_REASON, actor, command.expires_at
            )
        user_commands = {
            Verb.SHOW: self._show,
            Verb.UNBLOCK: self._unblock,
            Verb.RESET: self._reset,
        }
        return await user_commands[verb](user, actor)

    async def _show(self, user: str, _actor: str) -> Reply:
        policy = self.target.policy
        view = policy.inspect(user, now=trio.current_time(), wall_now=self.wall_clock())
        path = self.target.effects.journal.journal.path
        unreadable = None
        try:
            journal = await trio.to_thread.run_sync(lambda: read_journal(path, user=user))
        except StoreError as exc:  # the rest of show is still worth having
            journal, unreadable = JournalContents([]), str(exc)
        verdict = policy.config.verdict.value
        # fleet mode: the store counts the failures, so its windows are the ones that matter
        windows, counted_in = view.windows, None
        cluster = self.target.cluster
        if cluster is not None and not view.exempt:
            fleet = await cluster.windows(user)
            windows, counted_in = (windows, "relay") if fleet is None else (fleet, "fleet")
        return ShowReply(
            user=user,
            blocked=view.block is not None,
            block=None
            if view.block is None
            else BlockInfo.from_block(view.block, verdict, policy.config.repeat_within),
            exempt=view.exempt,
            mode=policy.config.mode.value,
            windows=tuple(
                WindowInfo(
                    limit=str(window.rate),
                    counted=window.counted,
                    tokens_left=round(window.tokens_left, 3),
                    clears_at=None
                    if window.clears_at is None
                    else format_time(window.clears_at + 0.999),
                    warned=window.rate in view.warned,
                )
                for window in windows
            ),
            counted_in=counted_in,
            accepted_windows=()
            if view.accepted is None
            else tuple(
                WindowInfo(
                    limit=str(window.rate),
                    # accepted recipients are not remembered one by one: the tokens used
                    counted=round(window.rate.count - window.tokens_left),
                    tokens_left=round(window.tokens_left, 3),
                    clears_at=None
                    if window.clears_at is None
                    else format_time(window.clears_at + 0.999),
                    warned=window.rate in view.accepted.warned,
                )
                for window in view.accepted.windows
            ),
            recent_failures=tuple(
                FailureInfo(
                    rcpt=sample.rcpt,
                    ip=None if sample.ip is None else str(sample.ip),
                    at=format_time(sample.at),
                )
                for sample in view.samples
            ),
            history=tuple(journal.entries),
            journal=JournalNotes(
                truncated_line=journal.truncated_line,
                damaged_lines=journal.damaged_lines,
                unreadable=unreadable,
            ),
            repeats=_repeats(policy, user, self.wall_clock()),
        )

    async def _apply(self, change: Change, what: str) -> ErrorReply | None:
        """Carry out *change*; an error reply when its block list could not be written."""
        try:
            await self.target.effects.apply(change)
        except StoreError as exc:
            return ErrorReply(error=f"{what} in memory but not on disk: {exc}")
        return None

    async def _block(
        self,
        user: str,
        reason: str,
        actor: str,
        expires: Callable[[float], float | None] = lambda _now: None,
    ) -> Reply:
        policy = self.target.policy
        verdict = policy.config.verdict.value
        now = self.wall_clock()
        expires_at = expires(now)
        if expires_at is not None and expires_at <= now:
            return ErrorReply(error=f"until {format_time(expires_at)} is not in the future")
        cluster = self.target.cluster
        if cluster is not None and expires_at is not None:
            return ErrorReply(
                error="blocks cannot expire in fleet mode (a lift would not reach the other "
                "relays); block without --for/--until, and unblock when it is time"
            )
        if cluster is not None and user not in policy.blocks:
            # the fleet's block list first: a user blocked on another relay meanwhile keeps
            # that block (one block, one notice) and this relay adopts it
            fleets = await cluster.claim_block(Block(user, float(int(now)), reason, actor))
            if fleets is not None:
                await cluster.adopt(fleets)
                current = policy.blocks.get(user, fleets.block)
                return BlockReply(
                    user=user, changed=False, block=BlockInfo.from_block(current, verdict)
                )
        change = policy.block(user, reason, by=actor, wall_now=now, expires_at=expires_at)
        block = BlockInfo.from_block(policy.blocks[user], verdict)
        if not change.effects:
            return BlockReply(user=user, changed=False, block=block)
        return await self._apply(change, f"{user} is blocked") or BlockReply(
            user=user, changed=True, block=block
        )

    async def _unblock(self, user: str, actor: str) -> Reply:
        policy = self.target.policy
        lifted = policy.blocks.get(user)
        change = policy.unblock(user, by=actor, wall_now=self.wall_clock())
        if lifted is None or not change.effects:
            return ErrorReply(error=f"{user} is not blocked")
        failed = await self._apply(change, f"{user} is unblocked")
        cluster = self.target.cluster
        if cluster is not None:
            lift = change.effects[0]
            at = lift.at if isinstance(lift, Unblocked) else self.wall_clock()
            await cluster.unblocked(user, by=actor, at=at)
        return failed or UnblockReply(
            user=user, unblocked=BlockInfo.from_block(lifted, policy.config.verdict.value)
        )

    async def _reset(self, user: str, actor: str) -> Reply:
        policy = self.target.policy
        now = self.wall_clock()
        change = policy.reset(user, by=actor, wall_now=now)
        cluster = self.target.cluster
        if cluster is not None and user not in policy.blocks:
            in_store = await cluster.reset(user, by=actor, at=now)
            if in_store is not False and not change.effects:
                # the store's counters were forgotten (or will be, when it is back)
                change = Change((Reset(user, actor, now),))
        if not change.effects:
            if user in policy.blocks:
                return ErrorReply(error=f"{user} is blocked and has no counters; use unblock")
            return ErrorReply(error=f"{user} has no counters to forget")
        await self.target.effects.apply(change)
        return ResetReply(user=user)

    async def _reload(self, actor: str) -> Reply:
        result = self.target.reload()  # logs reloaded / reload_failed itself
        if not result.ok:
            return ErrorReply(
                error="configuration not reloaded, the running one stays:\n"
                + "\n".join(result.problems)
            )
        journal = self.target.effects.journal
        journal.record({"at": format_time(self.wall_clock()), "event": "reload", "actor": actor})
        await journal.wait_written()
        if self.target.cluster is not None:
            await self.target.cluster.reloaded(by=actor)
        return ReloadReply(
            config=result.source,
            needs_restart=result.needs_restart,
            carried_users=result.carried_users,
        )


def _repeats(policy: Policy, user: str, wall_now: float) -> RepeatInfo | None:
    """*user*'s automatic blocks in the span, when blocks expire (``block.expire``)."""
    config = policy.config
    if not expires(config.expire):
        return None
    count = policy.repeats.count(user, now=wall_now, within=config.repeat_within)
    return RepeatInfo(
        blocks=count,
        within=format_span(config.repeat_within),
        next_lasts=format_steps((step_for(config.expire, count + 1),)),
    )


async def _drain(stream: trio.SocketStream) -> None:
    """After a refusal, read and drop what the client sends (briefly), then let it go.

    Closing with unread input resets the connection, and the client could lose the refusal it
    has not read yet; half-closing and draining lets it read the reason.
    """
    await stream.send_eof()
    budget = 64 * 1024
    with trio.move_on_after(DRAIN_TIMEOUT):
        while budget > 0 and (chunk := await stream.receive_some(65536)):
            budget -= len(chunk)
