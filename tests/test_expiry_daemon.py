"""The daemon lifts blocks on time (MockClock), at start for what expired while it was down,
and saves the history escalation counts."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
import trio
import trio.lowlevel
import trio.testing

from spamguardd.core.config import AdminConfig, Config, ServerConfig, StateConfig
from spamguardd.core.policy import Block
from spamguardd.core.timestamps import format_time, parse_time
from spamguardd.daemon.app import Daemon
from spamguardd.state.blockfile import BlockStore
from spamguardd.state.repeats import RepeatStore
from tests.helpers import T0, readsocket
from tests.test_admin_server import admin as admin_request

T = TypeVar("T")


async def admin(path: Path, **request: Any) -> dict[str, Any]:
    """One admin request, the clock held still meanwhile."""
    return await steady(functools.partial(admin_request, path, **request))


HOUR = 3600.0
DAY = 86400.0


def make_config(sock_dir: Path, expire: str | list[str] = ["1d", "5d"]) -> Config:  # noqa: B006
    policy = Config.from_dict(
        {"limits": {"failed_recipients": "3/1d"}, "block": {"expire": expire}}, source="t"
    ).policy
    return Config(
        policy=policy,
        server=ServerConfig(query_socket=sock_dir / "q.sock"),
        state=StateConfig(dir=sock_dir / "state"),
        admin=AdminConfig(socket=sock_dir / "a.sock"),
    )


def wall() -> float:
    return T0 + trio.current_time()


async def spray(sock_dir: Path, user: str = "auth:m") -> bytes:
    """Three failed recipients (the limit); the last answer."""
    answer = b""
    for i in range(3):
        request = f"rcpt user={user} rcpt=r{i}-{trio.current_time()}@x verify=fail\n"
        answer = await steady(functools.partial(readsocket, sock_dir / "q.sock", request.encode()))
    return answer


async def steady(call: Callable[[], Awaitable[T]]) -> T:
    """*call()*, without letting the mock clock jump while it waits for the daemon's file
    writes (a thread leaves every task blocked, and autojump would move the clock on)."""
    result: list[T] = []

    async def run() -> None:
        result.append(await call())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        while not result:
            await trio.lowlevel.checkpoint()
    return result[0]


async def settled(daemon: Daemon) -> None:
    """Wait, without letting the mock clock jump, until the daemon's writes are done: a file
    written in a thread leaves every task blocked, and autojump would move the clock on."""
    while not (
        daemon.expiry.settled
        and daemon.effects.persister.durable_generation == daemon.policy.generation
    ):
        await trio.lowlevel.checkpoint()


def journal(sock_dir: Path) -> list[dict[str, object]]:
    path = sock_dir / "state" / "journal"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(name="daemon")
async def _daemon(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> AsyncIterator[Daemon]:
    daemon = Daemon(make_config(sock_dir), wall_clock=wall)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    yield daemon
    daemon.stop()


async def test_block_lifts_on_time_and_the_next_is_longer(
    daemon: Daemon, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Blocked, answered freeze; after 1d lifted through the effects path (block file, journal,
    log, count); blocked again in the span: 5d, 2nd block."""
    with structlog.testing.capture_logs() as logs:
        assert (await spray(sock_dir)).startswith(b"freeze")
        await settled(daemon)
        store = BlockStore(sock_dir / "state")
        [block] = store.load()
        # (autojump moves the clock on while the block file is written in a thread)
        blocked_at = block.blocked_at
        assert wall() - blocked_at < HOUR
        assert (block.expires_at, block.nth) == (blocked_at + DAY, 1)
        await trio.sleep(blocked_at + DAY - wall() - 2)
        assert (await readsocket(sock_dir / "q.sock", b"check user=auth:m\n")).startswith(b"freeze")
        await trio.sleep(3)
        assert (await readsocket(sock_dir / "q.sock", b"check user=auth:m\n")).startswith(b"accept")
        await settled(daemon)
        await daemon.journal.wait_written()
    assert store.load() == []
    lift = [entry for entry in journal(sock_dir) if entry["event"] == "unblock"]
    assert lift == [
        {
            "at": format_time(blocked_at + DAY),
            "event": "unblock",
            "user": "auth:m",
            "actor": "expiry",
        }
    ]
    assert {
        "event": "user_unblocked",
        "user": "auth:m",
        "by": "expiry",
        "log_level": "warning",
    } in [
        {k: v for k, v in entry.items() if k in {"event", "user", "by", "log_level"}}
        for entry in logs
    ]
    assert daemon.effects.statistics().unblocks == 1
    assert daemon.expiry.lifted == 1
    # the history is on disk, and the next block is the 2nd: 5 days
    assert dict(RepeatStore(sock_dir / "state").load().entries) == {"auth:m": (blocked_at,)}
    assert (await spray(sock_dir)).startswith(b"freeze")
    await settled(daemon)
    [block] = store.load()
    again = block.blocked_at
    assert (block.expires_at, block.nth) == (again + 5 * DAY, 2)
    shown = await admin(sock_dir / "a.sock", command="show", user="auth:m")
    assert shown["block"]["until"] == format_time(again + 5 * DAY)
    assert (shown["block"]["nth"], shown["block"]["repeat_within"]) == (2, "30 days")
    assert shown["repeats"] == {"blocks": 2, "within": "30 days", "next_lasts": "5d"}


async def test_expired_while_down_is_lifted_before_serving(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A block whose time passed while the daemon was down is lifted at start, and the history
    saved by the previous run makes the next block the 2nd."""
    state = sock_dir / "state"
    state.mkdir()
    now = wall()
    BlockStore(state).save(
        [
            Block("auth:m", now - 2 * HOUR, "x", "auto", expires_at=now - HOUR, nth=1),
            Block("auth:k", now - 2 * HOUR, "y", "admin:0"),
        ]
    )
    RepeatStore(state).save({"auth:m": (now - 2 * HOUR,)})
    daemon = Daemon(make_config(sock_dir), wall_clock=wall)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    try:
        assert [b.user for b in BlockStore(state).load()] == ["auth:k"]
        assert (await readsocket(sock_dir / "q.sock", b"check user=auth:m\n")).startswith(b"accept")
        assert (await spray(sock_dir)).startswith(b"freeze")
        await settled(daemon)
        [block] = [b for b in BlockStore(state).load() if b.user == "auth:m"]
        assert block.nth == 2
    finally:
        daemon.stop()


async def test_admin_block_for_a_while(
    daemon: Daemon, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An admin's block lasts for good, or for what the admin said; it never counts as a repeat."""
    reply = await admin(sock_dir / "a.sock", command="block", user="auth:a", duration="2h")
    since = reply["block"]["since"]
    assert reply["block"]["until"] == format_time(parse_time(since) + 2 * HOUR)
    assert "nth" not in reply["block"]
    await admin(sock_dir / "a.sock", command="block", user="auth:b")
    await settled(daemon)
    then = format_time(wall() - 5)
    past = await admin(sock_dir / "a.sock", command="block", user="auth:c", until=then)
    assert past == {"ok": False, "error": f"until {then} is not in the future"}
    await trio.sleep(parse_time(reply["block"]["until"]) - wall() + 1)
    await settled(daemon)
    assert [b.user for b in BlockStore(sock_dir / "state").load()] == ["auth:b"]
    assert RepeatStore(sock_dir / "state").load().entries == []


async def test_history_survives_a_restart_and_reset_forgets_it(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    first = Daemon(make_config(sock_dir), wall_clock=wall)
    async with trio.open_nursery() as running:  # left once the first has stopped: its lock too
        await running.start(functools.partial(first.run, handle_signals=False))
        await spray(sock_dir)
        await admin(sock_dir / "a.sock", command="unblock", user="auth:m")
        await settled(first)
        first.stop()
    await trio.sleep(10)
    second = Daemon(make_config(sock_dir), wall_clock=wall)
    await nursery.start(functools.partial(second.run, handle_signals=False))
    try:
        assert len(second.policy.repeats) == 1
        reset = await admin(sock_dir / "a.sock", command="reset", user="auth:m")
        assert reset["ok"]
        await spray(sock_dir)
        await settled(second)
        [block] = BlockStore(sock_dir / "state").load()
        assert block.nth == 1
    finally:
        second.stop()


async def test_stats_and_reload(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """stats shows the steps and the lifts; a reload's new steps apply to the blocks made after
    it, and a block in force keeps its expiry."""
    configs = [make_config(sock_dir, ["1d", "5d"]), make_config(sock_dir, "2h")]
    daemon = Daemon(configs[0], wall_clock=wall, load_config=lambda: configs[-1])
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    try:
        await spray(sock_dir, "auth:old")
        [old] = BlockStore(sock_dir / "state").load()
        reloaded = await admin(sock_dir / "a.sock", command="reload")
        assert reloaded["ok"]
        await spray(sock_dir, "auth:new")
        await settled(daemon)
        blocks = {b.user: b for b in BlockStore(sock_dir / "state").load()}
        assert blocks["auth:old"].expires_at == old.blocked_at + DAY
        assert blocks["auth:new"].expires_at == blocks["auth:new"].blocked_at + 2 * HOUR
        await trio.sleep(blocks["auth:new"].blocked_at + 2 * HOUR - wall() + 1)
        await settled(daemon)
        stats = await admin(sock_dir / "a.sock", command="stats")
        assert stats["expiry"] == {
            "steps": "2h",
            "repeat_within": "30 days",
            "lifted": 1,
            "repeat_users": 2,
            "next_at": format_time(old.blocked_at + DAY),
        }
        assert stats["unblocks"] == 1
    finally:
        daemon.stop()
