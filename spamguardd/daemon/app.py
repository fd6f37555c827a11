"""Wiring of one running daemon: state, policy, sockets, signals, housekeeping."""

from __future__ import annotations

import functools
import grp
import os
import platform
import signal
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import structlog
import trio

from spamguardd import __version__
from spamguardd.core.config import Config
from spamguardd.core.errors import ConfigError, StoreError
from spamguardd.core.policy import Policy
from spamguardd.core.statistics import Statistics
from spamguardd.daemon.admin_server import AdminServer
from spamguardd.daemon.counters import CounterKeeper
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.daemon.expiry import ExpiryKeeper
from spamguardd.daemon.fdlimit import FdLimits
from spamguardd.daemon.journal_writer import JournalWriter
from spamguardd.daemon.listeners import (
    adopt_or_bind,
    bind_inet_listener,
    remove_socket_file,
    socket_file_identity,
)
from spamguardd.daemon.metrics import render_metrics
from spamguardd.daemon.metrics_http import bind_metrics, serve_metrics
from spamguardd.daemon.notices import NoticeQueue
from spamguardd.daemon.persist import BlockPersister
from spamguardd.daemon.query_server import QueryServer
from spamguardd.daemon.systemd import SdNotify
from spamguardd.state import eximaccess, legacy_snapshot, repeats, snapshot
from spamguardd.state.blockfile import BlockStore
from spamguardd.state.journal import FILENAME as JOURNAL_FILENAME
from spamguardd.state.journal import Journal
from spamguardd.state.repeats import RepeatStore
from spamguardd.state.snapshot import SnapshotStore
from spamguardd.state.statelock import StateLock, symbolic_links

if TYPE_CHECKING:
    from spamguardd.daemon.cluster import Cluster

log = structlog.get_logger("spamguardd")


#: What the daemon writes in the state directory besides the block file (which checks itself,
#: where it is opened) and the lock (opened without following a link).
WRITTEN_ENTRIES: Final = (
    JOURNAL_FILENAME,
    snapshot.DIRNAME,
    legacy_snapshot.FILENAME,
    repeats.FILENAME,
)


def load_policy(config: Config, lock: StateLock | None = None) -> tuple[Policy, BlockStore]:
    """Take the state directory (its *lock*), read the block list, build the policy from it.

    Raises:
        ConfigError: the state group does not exist.
        StateLockedError: another daemon holds the state directory.
        StoreError: the state directory cannot be created or written, the block file is
            damaged or not a regular file, or one of :data:`WRITTEN_ENTRIES` is a symbolic link.
    """
    gid = None
    if config.state.group is not None:
        try:
            gid = grp.getgrnam(config.state.group).gr_gid
        except KeyError:
            raise ConfigError(
                [f"{config.source}: state.group: no such group {config.state.group!r}"]
            ) from None
    store = BlockStore(config.state.dir, group=gid)
    store.prepare()
    if lock is not None:
        lock.acquire()  # before anything is read, removed or written
    try:
        _refuse_links(config.state.dir)
        for path in store.remove_stale_temporaries():
            log.warning("stale_temporary_removed", path=str(path))
        policy = Policy(config.policy, store.open(), load_repeats(RepeatStore(config.state.dir)))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if gid is not None:
        ensure_exim_access(store.path, gid, group=str(config.state.group))
    return policy, store


def _refuse_links(state_dir: Path) -> None:
    if links := symbolic_links(state_dir, WRITTEN_ENTRIES):
        raise StoreError("; ".join(links))


def load_repeats(store: RepeatStore) -> list[tuple[str, tuple[float, ...]]]:
    """The history escalation counts; damaged lines and an unreadable file are logged, not
    fatal (the block file, not this, says who is blocked)."""
    try:
        history = store.load()
    except StoreError as exc:
        log.error("repeat_history_unreadable", error=str(exc), action="starting without it")
        return []
    for problem in history.problems:
        log.warning("repeat_history_damaged", problem=problem, action="line skipped")
    return history.entries


def ensure_exim_access(block_file: Path, gid: int, *, group: str) -> None:
    """Make sure Exim's group can read the block file: repair what we own, log the rest."""
    problems = eximaccess.check(block_file, gid, uid=os.geteuid())
    try:
        for change in eximaccess.repair(problems, gid):
            log.warning("state_access_repaired", change=change)
    except OSError as exc:
        log.error("state_access_repair_failed", error=str(exc))
    for problem in eximaccess.check(block_file, gid, uid=os.geteuid()):
        log.error(
            "exim_cannot_read_block_file", path=str(problem.path), problem=problem.describe(group)
        )


def _inet_spec(address: tuple[str, int] | None) -> str | None:
    """(host, port) as Exim's readsocket spells it, for the log."""
    if address is None:
        return None
    host, port = address
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


@attrs.frozen
class ReloadResult:
    """What a reload did, for the log, sd_notify and an admin ``reload`` command."""

    #: False when the new file was rejected and the running configuration kept.
    ok: bool
    source: str
    #: Every problem found in the new file (empty when *ok*).
    problems: tuple[str, ...] = ()
    #: Users whose counters were carried over to changed limits.
    carried_users: int = 0
    #: Settings that changed in the file but only take effect at the next start.
    needs_restart: tuple[str, ...] = ()


class Daemon:
    """One spamguardd: owns the policy, the query server and their lifetime.

    Args:
        config: the configuration to start with.
        wall_clock: the wall clock (tests pass a fake one).
        inherited: sockets systemd passed in, by ``FileDescriptorName=``: ``query`` is served
            instead of binding ``server.query_socket``; ``admin`` instead of ``admin.socket``.
        sd_notify: where to report state changes, when systemd asked for them.
        load_config: re-reads the configuration on reload (default: the one given).
        watchdog_interval: seconds between ``WATCHDOG=1`` pings, when systemd watches us.
    """

    #: The descriptor limits as the start found and left them (the entry point raises the soft
    #: one before serving); shown in the ``started`` line.
    fd_limits: FdLimits | None = None

    def __init__(  # noqa: PLR0913 - keyword-only seams, one per collaborator
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        inherited: Mapping[str, socket.socket] | None = None,
        sd_notify: SdNotify | None = None,
        load_config: Callable[[], Config] | None = None,
        watchdog_interval: float | None = None,
    ) -> None:
        self.config = config
        self.wall_clock = wall_clock
        self.started_at = wall_clock()
        self.inherited: dict[str, socket.socket] = dict(inherited or {})
        self._inherited_names = sorted(self.inherited)  # for the log; run() takes them out
        self.sd_notify = sd_notify
        self.watchdog_interval = watchdog_interval
        self._load_config = load_config or (lambda: self.config)
        self.snapshots = SnapshotStore(config.state.dir)
        #: Held from here until run() ends: one daemon per state directory.
        self.lock = StateLock(config.state.dir)
        self.policy, self.store = load_policy(config, self.lock)
        self.counters = CounterKeeper(
            self.policy,
            self.snapshots,
            wall_clock=wall_clock,
            interval=lambda: self.config.state.snapshot_interval,
        )
        self.journal = JournalWriter(Journal(config.state.dir / JOURNAL_FILENAME))
        self.notices = NoticeQueue(config.notify, record=self.journal.record, wall_clock=wall_clock)
        self.persister = BlockPersister(self.policy, self.store, wall_clock=wall_clock)
        self.persister.on_state = self._block_file_state
        self.effects = EffectExecutor(
            self.policy,
            self.persister,
            self.journal,
            self.notices,
            wall_clock=wall_clock,
        )
        self.expiry = ExpiryKeeper(
            self.policy, self.effects, RepeatStore(config.state.dir), wall_clock=wall_clock
        )
        #: Fleet mode's link to the shared store; None for a single host.
        self.cluster = self._make_cluster(config, wall_clock)
        self.server = QueryServer(
            config.server,
            self.policy,
            self.effects,
            wall_clock=wall_clock,
            log_decisions=config.log.level == "debug",
            cluster=self.cluster,
        )
        self.admin = AdminServer(self, wall_clock=wall_clock)

    def _make_cluster(self, config: Config, wall_clock: Callable[[], float]) -> Cluster | None:
        """The fleet link when ``[cluster]`` names a store.

        Raises:
            ConfigError: the password file cannot be read.
        """
        settings = config.cluster
        if not settings.enabled:
            return None
        # imported here: the store's client takes about half a second to import, which a
        # single host (no [cluster]) should not pay at every start
        from spamguardd.daemon.cluster import Cluster, read_password  # noqa: PLC0415

        password = None
        if settings.password_file is not None:
            password, warnings = read_password(settings.password_file, source=config.source)
            for warning in warnings:
                log.warning("password_file_exposed", problem=warning)
        return Cluster(
            settings,
            self.policy,
            self.effects,
            reload=lambda: self.reload().ok,
            password=password,
            relay=settings.name or platform.node() or "localhost",
            wall_clock=wall_clock,
        )

    def stop(self) -> None:
        """Stop accepting and exit once in-flight answers are sent."""
        if self.sd_notify is not None:
            self.sd_notify.stopping()
        self.server.stop()
        self.admin.stop()

    def reload(self) -> ReloadResult:
        """Re-read and validate the configuration; apply it only if it is valid.

        The limits, overrides, exemptions, mode, verdict, the snapshot interval and who may use
        the admin socket change at once, without losing counters or blocks
        (:meth:`Policy.reconfigure`). Sockets, the state directory, metrics, notices and logging
        settings need a restart; a change to them is reported in
        ``needs_restart`` and otherwise ignored. Must be called from within trio.
        """
        if self.sd_notify is not None:
            self.sd_notify.reloading()
        try:
            new = self._load_config()
        except ConfigError as exc:
            result = ReloadResult(ok=False, source=self.config.source, problems=tuple(exc.problems))
            log.error(
                "reload_failed",
                problems=list(result.problems),
                action="keeping the running configuration",
            )
        else:
            old = self.config
            needs_restart = tuple(
                name
                for name, before, after in (
                    ("server", old.server, new.server),
                    ("state.dir", old.state.dir, new.state.dir),
                    ("state.group", old.state.group, new.state.group),
                    ("metrics", old.metrics, new.metrics),
                    ("log", old.log, new.log),
                    ("notify", old.notify, new.notify),
                    ("admin.socket", old.admin.socket, new.admin.socket),
                    ("admin.socket_mode", old.admin.socket_mode, new.admin.socket_mode),
                    ("admin.socket_group", old.admin.socket_group, new.admin.socket_group),
                    ("cluster", old.cluster, new.cluster),
                )
                if before != after
            )
            carried = self.policy.reconfigure(new.policy, trio.current_time())
            if self.store.group is not None:
                ensure_exim_access(self.store.path, self.store.group, group=str(old.state.group))
            self.config = attrs.evolve(
                old,
                source=new.source,
                policy=new.policy,
                state=attrs.evolve(old.state, snapshot_interval=new.state.snapshot_interval),
                admin=attrs.evolve(
                    old.admin,
                    allowed_users=new.admin.allowed_users,
                    allowed_groups=new.admin.allowed_groups,
                ),
            )
            result = ReloadResult(
                ok=True, source=new.source, carried_users=carried, needs_restart=needs_restart
            )
            log.info(
                "reloaded",
                config=new.source,
                mode=str(new.policy.mode),
                limits=[str(rate) for rate in new.policy.failed_recipients],
                carried_users=carried,
                needs_restart=list(needs_restart),
            )
        if self.sd_notify is not None:
            self.sd_notify.ready(self._status())
        return result

    def statistics(self) -> Statistics:
        """Every counter of the daemon, at this moment: what ``stats`` and the metrics show."""
        return Statistics(
            version=__version__,
            started_at=self.started_at,
            now=self.wall_clock(),
            mode=self.policy.config.mode.value,
            policy=self.policy.statistics(),
            server=self.server.statistics(),
            effects=self.effects.statistics(),
            notices=self.notices.statistics(),
            latency=self.server.latency.snapshot(),
            admin_errors=self.admin.errors,
            cluster=None if self.cluster is None else self.cluster.statistics(),
            expiry=self.expiry.statistics(),
        )

    def render_metrics(self) -> str:
        """The current metrics in the Prometheus text format."""
        return render_metrics(self.statistics())

    def _status(self) -> str:
        stats = self.policy.statistics()
        status = f"serving; {stats.tracked_users} users counted, {stats.blocked_users} blocked"
        error = self.persister.last_error
        if error is not None:
            status = (
                f"BLOCK FILE NOT WRITABLE ({error}); block verdicts are defer, "
                f"{self.persister.pending} users unsaved, retrying; {status}"
            )
        return status

    def _block_file_state(self, error: str | None) -> None:
        """The block file began to refuse writes (*error*), or takes them again (None): say so
        in systemd's status line (``systemctl status``), as well as in the log."""
        log.info("status_changed", block_file="ok" if error is None else "failing")
        if self.sd_notify is not None:
            self.sd_notify.status(self._status())

    def close(self) -> None:
        """Let go of the state directory (the block file and the lock); run() does it at exit."""
        self.store.close()
        self.lock.release()

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the query socket and serve until stopped (SIGTERM/SIGINT, or :meth:`stop`);
        then let go of the state directory.

        Raises:
            OSError: a socket cannot be bound (another daemon, a non-socket at the path, the
                metrics address in use, ...).
            LookupError: the socket group does not exist.
        """
        try:
            await self._run(handle_signals=handle_signals, task_status=task_status)
        finally:
            self.close()
        log.info("stopped")

    async def _run(self, *, handle_signals: bool, task_status: trio.TaskStatus[None]) -> None:
        server_config = self.config.server
        sock = adopt_or_bind(
            self.inherited,
            "query",
            server_config.query_socket,
            mode=server_config.socket_mode,
            group=server_config.socket_group,
            backlog=server_config.backlog,
        )
        query_socket = (
            "inherited:query"
            if "query" in self._inherited_names
            else str(server_config.query_socket)
        )
        listeners = [sock]
        try:
            if server_config.query_listen is not None:
                host, port = server_config.query_listen
                listeners.append(bind_inet_listener(host, port, backlog=server_config.backlog))
            admin_config = self.config.admin
            admin_sock = adopt_or_bind(
                self.inherited,
                "admin",
                admin_config.socket,
                mode=admin_config.socket_mode,
                group=admin_config.socket_group,
                backlog=64,
            )
            listeners.append(admin_sock)
            listen = self.config.metrics.listen
            # bound here, not in its task: a port in use is a clear error, not a traceback
            metrics = None if listen is None else await bind_metrics(listen[0], listen[1])
        except BaseException:
            for listener in listeners:
                listener.close()
            raise
        listeners.pop()  # the admin socket is the admin server's
        # the socket files bound here (not systemd's), removed when serving stops
        bound = {"query": server_config.query_socket, "admin": admin_config.socket}
        owned = [
            (path, socket_file_identity(path))
            for name, path in bound.items()
            if name not in self._inherited_names
        ]
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(self._handle_signals)
            # the counters load while the daemon already answers (daemon/counters.py)
            await nursery.start(self.counters.run)
            if self.watchdog_interval is not None:
                nursery.start_soon(self._watchdog, self.watchdog_interval)
            if listen is not None:
                await nursery.start(
                    functools.partial(
                        serve_metrics, listen[0], listen[1], self.render_metrics, listeners=metrics
                    )
                )
            await nursery.start(self.notices.run)
            await nursery.start(self.journal.run)
            await nursery.start(self.persister.run)
            if self.cluster is not None:
                await nursery.start(self.cluster.run)
            # blocks that expired while the daemon was down are lifted before it answers
            await nursery.start(self.expiry.run)
            async with trio.open_nursery() as serving:
                await serving.start(self.server.serve, listeners)
                await serving.start(self.admin.serve, admin_sock)
                self._log_started(query_socket)
                if self.sd_notify is not None:
                    self.sd_notify.ready(self._status())
                task_status.started()
            # serve() has returned: stop() was called and in-flight answers went out
            for path, identity in owned:
                remove_socket_file(path, identity)
            await self.persister.close()  # blocks the disk refused so far: a last attempt
            await self.notices.aclose()  # queued notices get the shutdown grace period
            await self.journal.flush()  # what the notices left, and everything before it
            # the final snapshot, still under the signal handler: a second SIGTERM waits too
            await self.counters.stop()
            await self.counters.save_final()
            await self.expiry.save()
            nursery.cancel_scope.cancel()

    def _log_started(self, query_socket: str) -> None:
        log.info(
            "started",
            version=__version__,
            config=self.config.source,
            query_socket=query_socket,
            inherited=self._inherited_names,
            query_listen=_inet_spec(self.config.server.query_listen),
            admin_socket=str(self.config.admin.socket),
            state_dir=str(self.config.state.dir),
            mode=str(self.config.policy.mode),
            limits=[str(rate) for rate in self.config.policy.failed_recipients],
            blocked_users=self.policy.statistics().blocked_users,
            fd_limit=None if self.fd_limits is None else attrs.asdict(self.fd_limits),
        )

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                log.info("stopping", signal=signal.Signals(signum).name)
                self.stop()  # a repeated signal while stopping changes nothing

    async def _watchdog(self, interval: float) -> None:
        # pinged from the event loop itself: a stuck loop stops the pings and systemd restarts us
        assert self.sd_notify is not None  # noqa: S101 - only started when systemd watches
        while True:
            # the status line's counts are refreshed with each ping, not only on a change of
            # state: `systemctl status` is never more than one interval behind `stats`
            self.sd_notify.watchdog(self._status())
            await trio.sleep(interval)
