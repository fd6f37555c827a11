"""The admin socket: ``spamguardctl`` asks here to list, show, block, unblock, reset, reload.

Unlike the query socket, this one changes state, so every connection is checked: the peer's
credentials (``SO_PEERCRED``, filled in by the kernel at connect time and impossible to forge)
must be root's, or name a user or group in ``admin.allowed_users``/``admin.allowed_groups``.
Anyone else gets one ``{"ok": false, ...}`` line saying so, the refusal is logged with the uid,
and the connection is closed.

Admin traffic is rare and small, so this is plain trio code with a task per connection; it never
holds up the query path. A change to the block list is durable (block file written and fsynced,
journal entry fsynced) before the answer, exactly like an automatic block.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import structlog
import trio

from spamguardd import __version__
from spamguardd.core import adminproto
from spamguardd.core.adminproto import AdminRequestError, Command
from spamguardd.core.config import AdminConfig, Config
from spamguardd.core.errors import StoreError
from spamguardd.core.latency import percentiles
from spamguardd.core.policy import Block, Blocked, Effect, Policy
from spamguardd.daemon.notices import Notice, NoticeDispatcher
from spamguardd.daemon.persist import BlockPersister
from spamguardd.daemon.query_server import QueryServer
from spamguardd.state.blockfile import format_time
from spamguardd.state.journal import Journal, read_journal

log = structlog.get_logger("spamguardd.daemon.admin_server")

#: Seconds a connected admin client may take to send a request line.
READ_TIMEOUT: Final = 30.0
#: After a refusal, how long the client's request is read and dropped before closing.
DRAIN_TIMEOUT: Final = 1.0
ACCEPT_RETRY_SLEEP: Final = 0.1
DEFAULT_BLOCK_REASON: Final = "blocked by an admin"
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ReloadOutcome(Protocol):
    """What the daemon's reload reports (``daemon.ReloadResult``)."""

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
    def persister(self) -> BlockPersister: ...  # pragma: no cover - protocol

    @property
    def server(self) -> QueryServer: ...  # pragma: no cover - protocol

    @property
    def journal(self) -> Journal: ...  # pragma: no cover - protocol

    @property
    def started_at(self) -> float: ...  # pragma: no cover - protocol

    @property
    def notices(self) -> NoticeDispatcher: ...  # pragma: no cover - protocol

    @property
    def events(self) -> dict[str, int]: ...  # pragma: no cover - protocol

    def render_metrics(self) -> str:
        """The metrics in the Prometheus text format."""

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


def block_fields(block: Block, verdict: str) -> dict[str, Any]:
    """A block as the admin protocol shows it."""
    return {
        "user": block.user,
        "since": format_time(block.blocked_at),
        "reason": block.reason,
        "by": block.by,
        "verdict": verdict,
    }


class AdminServer:
    """Serves the admin protocol for one daemon."""

    def __init__(self, target: AdminTarget, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.wall_clock = wall_clock
        self.auto_blocks = 0
        self.admin_blocks = 0
        self.unblocks = 0
        self.errors = 0
        self._stopping = trio.Event()

    def stop(self) -> None:
        """Stop accepting; connections in progress are cancelled when :meth:`serve` returns."""
        self._stopping.set()

    def on_effect(self, effect: Effect) -> None:
        """Journal an automatic block (called by the query server; never raises)."""
        if not isinstance(effect, Blocked):
            return
        self.auto_blocks += 1
        block = effect.block
        try:
            self.target.journal.append(
                {
                    "at": format_time(block.blocked_at),
                    "event": "block",
                    "user": block.user,
                    "actor": block.by,
                    "reason": block.reason,
                    "limit": str(effect.rate),
                }
            )
        except StoreError as exc:
            self.errors += 1
            log.error("journal_write_failed", error=str(exc))

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept admin connections on *listener* until :meth:`stop`; closes the listener."""
        sock = trio.socket.from_stdlib_socket(listener)
        with sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, sock, nursery)
                task_status.started()
                await self._stopping.wait()
                nursery.cancel_scope.cancel()

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:  # out of descriptors or memory for now: the queries go on
                log.error("admin_accept_failed", error=exc.strerror or str(exc))
                await trio.sleep(ACCEPT_RETRY_SLEEP)
                continue
            nursery.start_soon(self._handle, conn)

    async def _handle(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            try:
                await self._converse(stream, conn)
            except (OSError, trio.BrokenResourceError):
                pass  # the client went away; nothing to tell it
            except Exception:  # a bug here must not take the daemon down with it
                self.errors += 1
                log.exception("admin_internal_error")

    async def _converse(self, stream: trio.SocketStream, conn: trio.socket.SocketType) -> None:
        pid, uid, gid = peer_credentials(conn)
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
            await stream.send_all(adminproto.encode_reply(adminproto.error(message)))
            await _drain(stream)
            return
        buffer = bytearray()
        while True:
            with trio.move_on_after(READ_TIMEOUT) as idle:
                line = await _read_line(stream, buffer)
            if idle.cancelled_caught or line is None:
                return  # the client went quiet, or is done
            reply = await self._answer(line, uid)
            await stream.send_all(adminproto.encode_reply(reply))

    async def _answer(self, line: bytes, uid: int) -> dict[str, Any]:
        try:
            command = adminproto.parse_command(line)
        except AdminRequestError as exc:
            self.errors += 1
            return adminproto.error(str(exc))
        try:
            return await self._dispatch(command, f"admin:{uid}")
        except Exception:  # one bad command must not take the admin socket down
            self.errors += 1
            log.exception("admin_internal_error", command=command.command)
            return adminproto.error("internal error in spamguardd; see its log")

    async def _dispatch(self, command: Command, actor: str) -> dict[str, Any]:
        policy = self.target.policy
        if command.command == "list":
            verdict = policy.config.verdict.value
            blocks = sorted(policy.blocks.values(), key=lambda b: b.user)
            return adminproto.ok(blocked=[block_fields(b, verdict) for b in blocks])
        if command.command == "stats":
            return adminproto.ok(**self._stats())
        if command.command == "metrics":
            return adminproto.ok(text=self.target.render_metrics())
        if command.command == "reload":
            return await self._reload(actor)
        user = command.user
        assert user is not None  # noqa: S101 - parse_command guarantees it for these commands
        if command.command == "block":
            return await self._block(user, command.reason or DEFAULT_BLOCK_REASON, actor)
        handlers = {"show": self._show, "unblock": self._unblock, "reset": self._reset}
        return await handlers[command.command](user, actor)

    async def _show(self, user: str, _actor: str) -> dict[str, Any]:
        policy = self.target.policy
        view = policy.inspect(user, now=trio.current_time(), wall_now=self.wall_clock())
        journal = await trio.to_thread.run_sync(
            lambda: read_journal(self.target.journal.path, user=user)
        )
        return adminproto.ok(
            user=user,
            blocked=view.block is not None,
            block=None
            if view.block is None
            else block_fields(view.block, policy.config.verdict.value),
            exempt=view.exempt,
            mode=policy.config.mode.value,
            windows=[
                {
                    "limit": str(window.rate),
                    "counted": window.counted,
                    "tokens_left": round(window.tokens_left, 3),
                    "clears_at": None
                    if window.clears_at is None
                    else format_time(window.clears_at + 0.999),
                }
                for window in view.windows
            ],
            recent_failures=[
                {
                    "rcpt": sample.rcpt,
                    "ip": None if sample.ip is None else str(sample.ip),
                    "at": format_time(sample.at),
                }
                for sample in view.samples
            ],
            history=journal.entries,
            journal={
                "truncated_line": journal.truncated_line,
                "damaged_lines": list(journal.damaged_lines),
            },
        )

    async def _block(self, user: str, reason: str, actor: str) -> dict[str, Any]:
        policy = self.target.policy
        block, new = policy.block(user, reason, by=actor, wall_now=self.wall_clock())
        fields = block_fields(block, policy.config.verdict.value)
        if not new:
            return adminproto.ok(user=user, changed=False, block=fields)
        try:
            await self.target.persister.wait_durable(policy.generation)
        except StoreError as exc:
            self.errors += 1
            log.error("block_not_persisted", error=str(exc))
            return adminproto.error(f"{user} is blocked in memory but not on disk: {exc}")
        self.admin_blocks += 1
        log.warning("user_blocked", user=user, reason=reason, by=actor, since=fields["since"])
        self.target.notices.submit(
            Notice.admin_block(
                block, verdict=policy.config.verdict, samples=policy.failure_samples(user)[::-1]
            )
        )
        await self._journal("block", user, actor, reason)
        return adminproto.ok(user=user, changed=True, block=fields)

    async def _unblock(self, user: str, actor: str) -> dict[str, Any]:
        policy = self.target.policy
        block = policy.unblock(user)
        if block is None:
            return adminproto.error(f"{user} is not blocked")
        try:
            await self.target.persister.wait_durable(policy.generation)
        except StoreError as exc:
            self.errors += 1
            log.error("block_not_persisted", error=str(exc))
            return adminproto.error(f"{user} is unblocked in memory but not on disk: {exc}")
        self.unblocks += 1
        self.target.events["unblocks"] = self.target.events.get("unblocks", 0) + 1
        log.warning("user_unblocked", user=user, by=actor)
        self.target.notices.submit(Notice.unblock(user, when=self.wall_clock(), by=actor))
        await self._journal("unblock", user, actor, None)
        return adminproto.ok(user=user, unblocked=block_fields(block, policy.config.verdict.value))

    async def _reset(self, user: str, actor: str) -> dict[str, Any]:
        policy = self.target.policy
        if not policy.reset(user):
            if user in policy.blocks:
                return adminproto.error(f"{user} is blocked and has no counters; use unblock")
            return adminproto.error(f"{user} has no counters to forget")
        log.info("user_reset", user=user, by=actor)
        await self._journal("reset", user, actor, None)
        return adminproto.ok(user=user, reset=True)

    async def _reload(self, actor: str) -> dict[str, Any]:
        result = self.target.reload()  # logs reloaded / reload_failed itself
        if not result.ok:
            return adminproto.error(
                "configuration not reloaded, the running one stays:\n" + "\n".join(result.problems)
            )
        await self._journal("reload", None, actor, None)
        return adminproto.ok(
            config=result.source,
            needs_restart=list(result.needs_restart),
            carried_users=result.carried_users,
        )

    async def _journal(self, event: str, user: str | None, actor: str, reason: str | None) -> None:
        entry: dict[str, Any] = {"at": format_time(self.wall_clock()), "event": event}
        if user is not None:
            entry["user"] = user
        entry["actor"] = actor
        if reason is not None:
            entry["reason"] = reason
        try:
            await trio.to_thread.run_sync(lambda: self.target.journal.append(entry, durable=True))
        except StoreError as exc:
            self.errors += 1
            log.error("journal_write_failed", error=str(exc))

    def _stats(self) -> Mapping[str, Any]:
        target = self.target
        server = target.server.statistics()
        policy = target.policy.statistics()
        queries: dict[str, dict[str, int]] = {}
        for (verb, verdict), count in sorted(server.queries.items()):
            queries.setdefault(verb, {})[verdict] = count
        now = self.wall_clock()
        return {
            "version": __version__,
            "started_at": format_time(target.started_at),
            "uptime_seconds": max(0, int(now - target.started_at)),
            "mode": target.policy.config.mode.value,
            "queries": queries,
            "queries_total": sum(server.queries.values()),
            "blocks": {"auto": self.auto_blocks, "admin": self.admin_blocks},
            "unblocks": self.unblocks,
            "tracked_users": policy.tracked_users,
            "blocked_users": policy.blocked_users,
            "would_block_users": policy.would_block_users,
            "open_connections": server.open_connections,
            "errors": {
                "protocol": server.protocol_errors,
                "internal": server.internal_errors,
                "busy": server.busy,
                "store": server.store_failures,
                "admin": self.errors,
            },
            "latency_ms": percentiles(target.server.latency.bounds, target.server.latency.counts),
        }


async def _drain(stream: trio.SocketStream) -> None:
    """After a refusal, read and drop what the client sends (briefly), then let it go.

    Closing with unread input resets the connection, and the client could lose the refusal it
    has not read yet; half-closing and draining lets it read the reason.
    """
    await stream.send_eof()
    budget = adminproto.MAX_REQUEST
    with trio.move_on_after(DRAIN_TIMEOUT):
        while budget > 0 and (chunk := await stream.receive_some(65536)):
            budget -= len(chunk)


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next request line from *stream* (None at EOF), bounded by the protocol's size cap."""
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if len(buffer) >= adminproto.MAX_REQUEST:
            line = bytes(buffer)
            buffer.clear()
            return line  # parse_command turns an over-long line into a clear error
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buffer.strip():
                line = bytes(buffer)
                buffer.clear()
                return line
            return None
        buffer += chunk
