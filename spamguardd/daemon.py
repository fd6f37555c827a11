"""Wiring of one running daemon: state, policy, sockets, signals, housekeeping."""

from __future__ import annotations

import grp
import signal
import time
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio
import trio.lowlevel

from spamguardd import __version__
from spamguardd.admin import AdminServer
from spamguardd.config import Config
from spamguardd.errors import ConfigError
from spamguardd.journal import FILENAME as JOURNAL_FILENAME
from spamguardd.journal import Journal
from spamguardd.persist import BlockPersister
from spamguardd.policy import Policy
from spamguardd.server import QueryServer, bind_unix_listener
from spamguardd.store import BlockStore

log = structlog.get_logger("spamguardd")

#: How often users whose buckets are full again are forgotten, bounding memory.
HOUSEKEEPING_INTERVAL: Final = 60.0
#: Users looked at between two yields to the query path (about 5 ms of work).
HOUSEKEEPING_BATCH: Final = 5000


def load_policy(config: Config) -> tuple[Policy, BlockStore]:
    """Read the block list and build the policy from it.

    Raises:
        ConfigError: the state group does not exist.
        StoreError: the state directory cannot be created or the block file is damaged.
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
    return Policy(config.policy, store.load()), store


@attrs.frozen
class ReloadResult:
    """What a reload did, for the log and the admin ``reload`` command."""

    #: False when the new file was rejected and the running configuration kept.
    ok: bool
    source: str
    #: Every problem found in the new file (empty when *ok*).
    problems: tuple[str, ...] = ()
    #: Users whose counters were carried over to changed limits (none yet: they are forgotten).
    carried_users: int = 0
    #: Settings that changed in the file but only take effect at the next start.
    needs_restart: tuple[str, ...] = ()


class Daemon:
    """One spamguardd: owns the policy, the query server and their lifetime."""

    def __init__(
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        """Set up a daemon; *load_config* re-reads the configuration for :meth:`reload`.

        The command line passes one that reads the file again and re-applies its flags; the
        default re-applies the configuration given.
        """
        self.config = config
        self.started_at = wall_clock()
        self._load_config = load_config or (lambda: self.config)
        self.journal = Journal(config.state.dir / JOURNAL_FILENAME)
        self.policy, self.store = load_policy(config)
        self.persister = BlockPersister(self.policy, self.store)
        self.server = QueryServer(
            config.server,
            self.policy,
            self.persister,
            wall_clock=wall_clock,
            log_decisions=config.log.level == "debug",
        )
        self.admin = AdminServer(self, wall_clock=wall_clock)
        self.server.block_listeners.append(self.admin.on_block)

    def stop(self) -> None:
        """Stop accepting and exit once in-flight answers are sent."""
        self.server.stop()
        self.admin.stop()

    def reload(self) -> ReloadResult:
        """Re-read the configuration and apply it if it is valid; else keep the running one.

        The policy (limits, verdict, mode, overrides, exemptions) and who may use the admin
        socket change at once. Sockets, the state directory and logging keep their running
        values until the next start (``needs_restart`` names what changed). When the limits
        change, counters are forgotten, because they were counted against the old ones; blocks
        always stay.
        """
        try:
            new = self._load_config()
        except ConfigError as exc:
            log.error(
                "reload_failed", problems=exc.problems, action="keeping the running configuration"
            )
            return ReloadResult(ok=False, source=self.config.source, problems=tuple(exc.problems))
        old = self.config
        needs_restart = tuple(
            name
            for name, before, after in (
                ("server", old.server, new.server),
                ("state.dir", old.state.dir, new.state.dir),
                ("state.group", old.state.group, new.state.group),
                ("log", old.log, new.log),
                ("admin.socket", old.admin.socket, new.admin.socket),
                ("admin.socket_mode", old.admin.socket_mode, new.admin.socket_mode),
                ("admin.socket_group", old.admin.socket_group, new.admin.socket_group),
            )
            if before != after
        )
        if (old.policy.failed_recipients, old.policy.overrides) != (
            new.policy.failed_recipients,
            new.policy.overrides,
        ):
            for user in self.policy.tracked_users():
                self.policy.reset(user)
        self.config = attrs.evolve(
            old,
            source=new.source,
            policy=new.policy,
            admin=attrs.evolve(
                old.admin,
                allowed_users=new.admin.allowed_users,
                allowed_groups=new.admin.allowed_groups,
            ),
        )
        self.policy.config = new.policy
        log.info(
            "reloaded",
            config=new.source,
            mode=str(new.policy.mode),
            limits=[str(rate) for rate in new.policy.failed_recipients],
            needs_restart=list(needs_restart),
        )
        return ReloadResult(ok=True, source=new.source, needs_restart=needs_restart)

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the query socket and serve until stopped (SIGTERM/SIGINT, or :meth:`stop`).

        Raises:
            OSError: the socket cannot be bound (another daemon, a non-socket at the path, ...).
            LookupError: the socket group does not exist.
        """
        server_config = self.config.server
        server_config.query_socket.parent.mkdir(parents=True, exist_ok=True)
        sock = bind_unix_listener(
            server_config.query_socket,
            mode=server_config.socket_mode,
            group=server_config.socket_group,
            backlog=server_config.backlog,
        )
        try:
            admin_config = self.config.admin
            admin_config.socket.parent.mkdir(parents=True, exist_ok=True)
            admin_sock = bind_unix_listener(
                admin_config.socket,
                mode=admin_config.socket_mode,
                group=admin_config.socket_group,
                backlog=64,
            )
        except BaseException:
            sock.close()
            raise
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(self._stop_on_signal)
            nursery.start_soon(self._housekeeping)
            async with trio.open_nursery() as serving:
                await serving.start(self.server.serve, [sock])
                await serving.start(self.admin.serve, admin_sock)
                self._log_started()
                task_status.started()
            # serve() has returned: stop() was called and in-flight answers went out
            nursery.cancel_scope.cancel()
        log.info("stopped")

    def _log_started(self) -> None:
        log.info(
            "started",
            version=__version__,
            config=self.config.source,
            query_socket=str(self.config.server.query_socket),
            admin_socket=str(self.config.admin.socket),
            state_dir=str(self.config.state.dir),
            mode=str(self.config.policy.mode),
            limits=[str(rate) for rate in self.config.policy.failed_recipients],
            blocked_users=self.policy.statistics().blocked_users,
        )

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                self.stop()
                return

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            forgotten = 0
            users = self.policy.tracked_users()
            for start in range(0, len(users), HOUSEKEEPING_BATCH):
                batch = users[start : start + HOUSEKEEPING_BATCH]
                forgotten += self.policy.forget_idle(trio.current_time(), batch)
                await trio.lowlevel.checkpoint()  # let queries through between batches
            if forgotten:
                log.debug("users_forgotten", count=forgotten, tracked=len(users) - forgotten)
