"""Wiring of one running daemon: state, policy, sockets, signals, housekeeping."""

from __future__ import annotations

import grp
import signal
import time
from collections.abc import Callable
from typing import Final

import structlog
import trio
import trio.lowlevel

from spamguardd import __version__
from spamguardd.config import Config
from spamguardd.errors import ConfigError
from spamguardd.persist import BlockPersister
from spamguardd.policy import Policy
from spamguardd.server import QueryServer, bind_inet_listener, bind_unix_listener
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


def _inet_spec(address: tuple[str, int] | None) -> str | None:
    """(host, port) as Exim's readsocket spells it, for the log."""
    if address is None:
        return None
    host, port = address
    return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"


class Daemon:
    """One spamguardd: owns the policy, the query server and their lifetime."""

    def __init__(self, config: Config, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.policy, self.store = load_policy(config)
        self.persister = BlockPersister(self.policy, self.store)
        self.server = QueryServer(
            config.server,
            self.policy,
            self.persister,
            wall_clock=wall_clock,
            log_decisions=config.log.level == "debug",
        )

    def stop(self) -> None:
        """Stop accepting and exit once in-flight answers are sent."""
        self.server.stop()

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
        listeners = [sock]
        if server_config.query_listen is not None:
            try:
                host, port = server_config.query_listen
                listeners.append(bind_inet_listener(host, port, backlog=server_config.backlog))
            except BaseException:
                sock.close()
                raise
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(self._stop_on_signal)
            nursery.start_soon(self._housekeeping)
            async with trio.open_nursery() as serving:
                await serving.start(self.server.serve, listeners)
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
            query_listen=_inet_spec(self.config.server.query_listen),
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
