"""The admin socket in-process: durability before the answer, time under MockClock, access."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from spamguardd.core.config import AdminConfig, Config, PolicyConfig, ServerConfig, StateConfig
from spamguardd.core.policy import Block
from spamguardd.core.rate import Rate
from spamguardd.core.timestamps import format_time
from spamguardd.daemon.admin_server import MAX_ADMIN_CONNECTIONS, is_allowed
from spamguardd.daemon.app import Daemon
from tests.helpers import T0, readsocket


def make_config(sock_dir: Path) -> Config:
    return Config(
        policy=PolicyConfig(failed_recipients=(Rate(5, 3600),)),
        server=ServerConfig(query_socket=sock_dir / "q.sock"),
        state=StateConfig(dir=sock_dir / "state"),
        admin=AdminConfig(socket=sock_dir / "a.sock"),
    )


async def admin(path: Path, **request: Any) -> dict[str, Any]:
    """One admin request over a trio socket (so MockClock never waits on a thread)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(json.dumps(request).encode() + b"\n")
        sock.shutdown(trio.socket.SHUT_WR)
        data = b""
        while chunk := await sock.recv(65536):
            data += chunk
    reply: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
    return reply


async def run_daemon(nursery: trio.Nursery, daemon: Daemon) -> Daemon:
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    return daemon


@pytest.fixture(name="daemon")
async def _daemon(nursery: trio.Nursery, sock_dir: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(make_config(sock_dir), wall_clock=lambda: T0 + trio.current_time())
    yield await run_daemon(nursery, daemon)
    daemon.stop()


async def test_clears_at_follows_the_clock(
    daemon: Daemon, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """show's tokens and "clears at" come from the daemon's clock, not from the wall."""
    for i in range(3):
        await readsocket(sock_dir / "q.sock", f"rcpt user=auth:m rcpt=r{i} verify=fail\n".encode())
    await trio.sleep(720)
    shown = await admin(sock_dir / "a.sock", command="show", user="auth:m")
    (window,) = shown["windows"]
    assert (window["counted"], window["tokens_left"]) == (3, 3.0)
    assert window["clears_at"] == format_time(T0 + 720 + 1440)
    # (show reads the journal in a thread, during which autojump may move the clock on)
    stats = await admin(sock_dir / "a.sock", command="stats")
    assert stats["uptime_seconds"] == int(T0 + trio.current_time() - daemon.started_at)
    assert stats["uptime_seconds"] >= 720


async def test_admin_block_is_on_disk_before_the_answer(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    """No answer to block (or unblock) while the block file is still on its way to disk."""
    daemon = Daemon(make_config(sock_dir))
    gate = threading.Event()
    apply = daemon.store.apply

    def slow_apply(changes: Iterable[tuple[str, Block | None]]) -> None:
        gate.wait(10)
        apply(changes)

    daemon.store.apply = slow_apply  # type: ignore[method-assign]
    await run_daemon(nursery, daemon)
    answers: list[dict[str, Any]] = []

    async def block() -> None:
        answers.append(await admin(sock_dir / "a.sock", command="block", user="auth:b"))

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(block)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []
            assert not daemon.store.path.exists()
            gate.set()
    assert answers[0]["ok"]
    assert [b.user for b in daemon.store.load()] == ["auth:b"]
    daemon.stop()


async def test_bad_requests_and_several_per_connection(daemon: Daemon, sock_dir: Path) -> None:
    """Each request line gets its answer in order; a bad one does not end the conversation."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock, trio.fail_after(10):
        await sock.connect(str(sock_dir / "a.sock"))
        await sock.send(b'not json\n{"command": "list"}\n{"command": "block"}\n')
        sock.shutdown(trio.socket.SHUT_WR)
        data = b""
        while chunk := await sock.recv(65536):
            data += chunk
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["ok"] for r in replies] == [False, True, False]
    assert replies[0]["error"].startswith("request is not a JSON object")
    assert replies[2]["error"] == "block needs a user key"


async def test_connections_past_the_bound_are_turned_away_and_the_rest_served(
    daemon: Daemon, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A script that opens admin connections in a loop cannot take the daemon's descriptors:
    past the bound each gets one error line; an admin gets in again once one has closed, and
    queries are answered throughout."""
    idle = []
    try:
        for _ in range(MAX_ADMIN_CONNECTIONS):
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            idle.append(sock)
            await sock.connect(str(sock_dir / "a.sock"))
        await trio.sleep(1)  # every one accepted, none past its read timeout
        turned_away = await admin(sock_dir / "a.sock", command="stats")
        assert turned_away["ok"] is False
        assert "64 admin connections are open already" in turned_away["error"]
        assert await readsocket(sock_dir / "q.sock", b"rcpt user=auth:q rcpt=r verify=ok\n") == (
            b"accept\n"
        )
        idle.pop().close()
        await trio.sleep(1)
        stats = await admin(sock_dir / "a.sock", command="stats")
        assert stats["ok"] is True
        assert stats["errors"]["admin"] == 1
    finally:
        for sock in idle:
            sock.close()


class TestIsAllowed:
    @pytest.mark.parametrize(
        ("config", "allowed"),
        [
            (AdminConfig(), False),
            (AdminConfig(allowed_users=("nobody",)), True),
            (AdminConfig(allowed_users=(65534,)), True),
            (AdminConfig(allowed_users=("root",)), False),
            (AdminConfig(allowed_groups=("nogroup",)), True),
            (AdminConfig(allowed_groups=(65534,)), True),
            (AdminConfig(allowed_groups=("root", "no-such-group")), False),
        ],
    )
    def test_nobody(self, config: AdminConfig, allowed: bool) -> None:
        """By name or number, as a user or through a group; unknown names allow nobody."""
        assert is_allowed(config, 65534, 65534) is allowed

    def test_root_always(self) -> None:
        """Root needs no listing."""
        assert is_allowed(AdminConfig(), 0, 0)
