"""The effects executor: every block, unblock and reset, automatic or an admin's, takes one path.

Rules for these tests: the daemon runs in-process on real sockets in a short directory
(``sock_dir``), every wait is bounded by ``trio.fail_after``, and a slow disk is played by a
gate that a worker thread waits on, never by a sleep.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from spamguardd.core.config import AdminConfig, Config, PolicyConfig, ServerConfig, StateConfig
from spamguardd.core.rate import Rate
from spamguardd.daemon.app import Daemon
from tests.helpers import T0, readsocket
from tests.test_admin_server import admin


def make_daemon(sock_dir: Path) -> Daemon:
    config = Config(
        policy=PolicyConfig(failed_recipients=(Rate(5, 3600),)),
        server=ServerConfig(query_socket=sock_dir / "q.sock"),
        state=StateConfig(dir=sock_dir / "state"),
        admin=AdminConfig(socket=sock_dir / "a.sock"),
    )
    return Daemon(config, wall_clock=lambda: T0 + trio.current_time())


async def spray(sock_dir: Path, user: str, count: int = 5) -> bytes:
    """*count* failed recipients of *user*; the last answer."""
    reply = b""
    for i in range(count):
        request = f"rcpt user={user} rcpt=r{i}@x.test verify=fail\n".encode()
        reply = await readsocket(sock_dir / "q.sock", request)
    return reply


def journal(sock_dir: Path) -> list[dict[str, Any]]:
    path = sock_dir / "state" / "journal"
    return [json.loads(line) for line in path.read_text().splitlines()]


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


async def test_automatic_and_admin_changes_take_one_path(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    """Auto and admin blocks, an unblock and a reset: same log line, journal entry, counts."""
    daemon = make_daemon(sock_dir)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    a = sock_dir / "a.sock"
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        assert (
            await spray(sock_dir, "auth:auto") == b'freeze reason="5 failed recipients within 1h"\n'
        )
        await spray(sock_dir, "auth:counted", 2)
        assert (await admin(a, command="block", user="auth:admin", reason="phished"))["ok"]
        assert (await admin(a, command="unblock", user="auth:auto"))["ok"]
        assert (await admin(a, command="reset", user="auth:counted"))["ok"]
        stats = await admin(a, command="stats")
        metrics = (await admin(a, command="metrics"))["text"]
    daemon.stop()
    blocked = [e for e in logs if e["event"] == "user_blocked"]
    assert [(e["user"], e["by"], e.get("limit")) for e in blocked] == [
        ("auth:auto", "auto", "5/1h"),
        ("auth:admin", "admin:0", None),
    ]
    assert {key for key in blocked[0] if key != "limit"} == set(blocked[1])
    assert [
        (e["event"], e["user"]) for e in logs if e["event"] in {"user_unblocked", "user_reset"}
    ] == [
        ("user_unblocked", "auth:auto"),
        ("user_reset", "auth:counted"),
    ]
    assert [(e["event"], e["user"], e["actor"]) for e in journal(sock_dir)] == [
        ("block", "auth:auto", "auto"),
        ("block", "auth:admin", "admin:0"),
        ("unblock", "auth:auto", "admin:0"),
        ("reset", "auth:counted", "admin:0"),
    ]
    assert (stats["blocks"], stats["unblocks"]) == ({"admin": 1, "auto": 1}, 1)
    assert metric(metrics, "spamguardd_blocks_total") == stats["blocks"]["auto"]
    assert metric(metrics, "spamguardd_admin_blocks_total") == stats["blocks"]["admin"]
    assert metric(metrics, "spamguardd_unblocks_total") == stats["unblocks"]
    assert metric(metrics, "spamguardd_blocked_users") == stats["blocked_users"] == 1


async def test_a_slow_journal_never_delays_a_verdict(nursery: trio.Nursery, sock_dir: Path) -> None:
    """While the journal's disk hangs, the block verdict still goes out (once the block file is
    written); the entry follows when the disk comes back."""
    daemon = make_daemon(sock_dir)
    gate = threading.Event()
    append_many = daemon.journal.journal.append_many

    def slow(entries: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
        gate.wait(10)
        append_many(entries, durable=durable)

    daemon.journal.journal.append_many = slow  # type: ignore[method-assign]
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    with trio.fail_after(10):
        assert (await spray(sock_dir, "auth:m")).startswith(b"freeze")
        assert not (sock_dir / "state" / "journal").exists()
        gate.set()
        await daemon.journal.wait_written()
    assert [e["user"] for e in journal(sock_dir)] == ["auth:m"]
    daemon.stop()


async def test_an_unwritable_journal_is_counted_and_the_change_stands(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    """A journal the daemon cannot append to: the block holds, the failure is logged and counted."""
    daemon = make_daemon(sock_dir)
    (sock_dir / "state" / "journal").mkdir()  # a directory where the file should be
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    with trio.fail_after(10), structlog.testing.capture_logs() as logs:
        reply = await admin(sock_dir / "a.sock", command="block", user="auth:b")
        stats = await admin(sock_dir / "a.sock", command="stats")
    daemon.stop()
    assert reply["ok"]
    assert [b.user for b in daemon.store.load()] == ["auth:b"]
    assert [e["entries"] for e in logs if e["event"] == "journal_write_failed"] == [1]
    assert stats["errors"]["admin"] == 1
