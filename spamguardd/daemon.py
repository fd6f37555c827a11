"""Wiring of one running daemon: state, policy, sockets, signals, housekeeping."""

from __future__ import annotations

import grp
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio
import trio.lowlevel

from spamguardd import __version__
from spamguardd.admin import AdminServer
from spamguardd.config import Config, load_config
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


class Daemon:
    """One spamguardd: owns the policy, the query server and their lifetime."""

    def __init__(
        self,
        config: Config,
        *,
        wall_clock: Callable[[], float] = time.time,
        load: Callable[[], Config] | None = None,
    ) -> None:
        """Set up a daemon; *load* re-reads the configuration for :meth:`reload`.

        The default *load* reads ``config.source`` again (or takes the embedded defaults);
        the command line passes one that re-applies its flags.
        """
        self.config = config
        self.started_at = wall_clock()
        self._load = load or _loader_for(config)
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

    def reload(self) -> list[str]:
        """Re-read the configuration and apply what can change while running.

        The policy (limits, verdict, mode, overrides, exemptions) and who may use the admin
        socket change at once. Sockets, the state directory and logging keep their running
        values until the next start; the returned notes say which of those changed. When the
        limits change, counters are forgotten, because they were counted against the old ones.

        Raises:
            ConfigError: the file is unreadable or invalid; the running configuration stays.
        """
        new = self._load()
        old = self.config
        notes = [
            f"{name} changed; takes effect at the next start"
            for name, before, after in (
                ("server", old.server, new.server),
                ("state", old.state, new.state),
                ("log", old.log, new.log),
                (
                    "admin.socket",
                    (old.admin.socket, old.admin.socket_mode, old.admin.socket_group),
                    (new.admin.socket, new.admin.socket_mode, new.admin.socket_group),
                ),
            )
            if before != after
        ]
        if (old.policy.failed_recipients, old.policy.overrides) != (
            new.policy.failed_recipients,
            new.policy.overrides,
        ):
            tracked = self.policy.tracked_users()
            for user in tracked:
                self.policy.reset(user)
            notes.append(f"limits changed; counters of {len(tracked)} users forgotten")
        self.config = attrs.evolve(
            new,
            server=old.server,
            state=old.state,
            log=old.log,
            admin=attrs.evolve(
                new.admin,
                socket=old.admin.socket,
                socket_mode=old.admin.socket_mode,
                socket_group=old.admin.socket_group,
            ),
        )
        self.policy.config = new.policy
        return notes

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


def _loader_for(config: Config) -> Callable[[], Config]:
    """Re-read the file *config* came from, or take the embedded defaults again."""
    if config.source == Config().source:
        return Config
    path = Path(config.source)
    return lambda: load_config(path)
