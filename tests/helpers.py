"""Helpers for tests that talk to a daemon the way Exim does."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import attrs
import trio

from spamguardd.core.config import NotifyConfig, ServerConfig
from spamguardd.core.policy import Policy
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.daemon.journal_writer import JournalWriter
from spamguardd.daemon.notices import NoticeQueue
from spamguardd.daemon.persist import BlockPersister
from spamguardd.daemon.query_server import QueryServer
from spamguardd.daemon.transports import Transport
from spamguardd.state.blockfile import BlockStore
from spamguardd.state.journal import Journal

#: A fixed wall-clock origin for tests: 2026-11-28T00:00:00Z.
T0 = 1795824000.0


async def readsocket(path: Path, request: bytes, *, shutdown: bool = True) -> bytes:
    """Ask like Exim's ``${readsocket}``: connect, one write, half-close, read until EOF.

    With ``shutdown=False`` it behaves like readsocket's ``shutdown=no`` option: no half-close,
    so only the request's own newline can tell the daemon that the request is complete.
    """
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(request)
        if shutdown:
            sock.shutdown(trio.socket.SHUT_WR)
        chunks = []
        while chunk := await sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def ask_blocking(path: Path, request: bytes, *, timeout: float = 10.0) -> bytes:
    """One readsocket-style exchange from a plain blocking socket, for a daemon in a process."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


@attrs.define
class Wired:
    """A query server with its effects executor, notice queue and journal, as the daemon wires
    them (without the daemon's sockets, signals and housekeeping)."""

    server: QueryServer
    effects: EffectExecutor
    notices: NoticeQueue
    journal: JournalWriter

    async def serve(
        self,
        listeners: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve *listeners* with the workers running, until the server is stopped; then let the
        notices finish (their grace period) and the journal catch up, as the daemon does."""
        async with trio.open_nursery() as workers:
            await workers.start(self.notices.run)
            await workers.start(self.journal.run)
            await workers.start(self.effects.persister.run)
            async with trio.open_nursery() as serving:
                await serving.start(self.server.serve, listeners)
                task_status.started()
            await self.notices.aclose()
            await self.journal.flush()
            await self.effects.persister.close()
            workers.cancel_scope.cancel()


def wire(  # noqa: PLR0913 - one keyword per part a test may want to change
    config: ServerConfig,
    policy: Policy,
    store: BlockStore,
    *,
    notify: NotifyConfig | None = None,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] | None = None,
    fd_budget: int | None = None,
) -> Wired:
    """The query path of a daemon around *policy*, its journal beside the block file."""
    wall = wall_clock or (lambda: T0 + trio.current_time())
    journal = JournalWriter(Journal(store.path.with_name("journal")))
    notices = NoticeQueue(
        notify or NotifyConfig(), record=journal.record, transport=transport, wall_clock=wall
    )
    effects = EffectExecutor(
        policy, BlockPersister(policy, store), journal, notices, wall_clock=wall
    )
    server = QueryServer(config, policy, effects, wall_clock=wall, fd_budget=fd_budget)
    return Wired(server, effects, notices, journal)


def daemon_process(config: Path, *, cwd: Path) -> subprocess.Popen[str]:
    """``python -m spamguardd --config CONFIG`` in *cwd*, its JSON log on a pipe (read it with
    :func:`wait_started`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "spamguardd", "--config", str(config)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_started(stdout: IO[str], *, loaded: bool = False) -> list[str]:
    """Read a daemon's JSON log lines up to its ``started`` line, which comes once the sockets
    accept (after any line the start logs first), and with *loaded* on to ``snapshot_loaded``
    (the counters load while the daemon serves); returns the lines before ``started``.

    Raises:
        AssertionError: the output ended (the daemon exited) before that.
    """
    before: list[str] = []
    for line in stdout:
        if '"event": "started"' in line:
            break
        before.append(line)
    else:
        raise AssertionError(f"the daemon exited before it started: {before}")
    while loaded and '"event": "snapshot_loaded"' not in stdout.readline():
        pass
    return before
