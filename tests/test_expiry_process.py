"""End to end against a real ``python -m spamguardd`` process: a short expiry lifts a block."""

from __future__ import annotations

import grp
import json
import time
from collections.abc import Callable
from pathlib import Path

from spamguardd.core.policy import Block
from spamguardd.core.timestamps import parse_time
from spamguardd.state.blockfile import BlockStore
from tests.eximlab import EXIM_USER, EximLab
from tests.test_cli import Daemon, ask

CONFIG = """
[limits]
failed_recipients = "3/1h"
[block]
expire = ["2s", "1h"]
repeat_within = "1d"
"""


def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll *condition* until it holds, up to the deadline (a condition on another process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def spray(socket: Path, round_: int) -> bytes:
    replies = [
        ask(socket, f"rcpt user=auth:m rcpt=r{round_}-{i}@x verify=fail".encode()) for i in range(3)
    ]
    return replies[-1]


def test_short_expiry_lifts_and_the_next_block_is_longer(sock_dir: Path) -> None:
    """Blocked and frozen; the block lifts after 2 s (block file, journal and log show it); the
    next block within the span takes the next step, 1 h."""
    config = sock_dir / "spamguardd.toml"
    config.write_text(CONFIG)
    store = BlockStore(sock_dir / "var")
    daemon = Daemon(sock_dir, "--config", str(config))
    try:
        assert spray(daemon.socket, 1).startswith(b"freeze ")
        [first] = store.load()
        assert (first.expires_at, first.nth) == (first.blocked_at + 2, 1)
        assert b" until=" in store.path.read_bytes()
        eventually(lambda: ask(daemon.socket, b"check user=auth:m") == b"accept\n")
        eventually(lambda: store.load() == [])
        journal = sock_dir / "var" / "journal"
        eventually(lambda: '"actor":"expiry"' in journal.read_text())
        assert spray(daemon.socket, 2).startswith(b"freeze ")
        [second] = store.load()
        assert (second.expires_at, second.nth) == (second.blocked_at + 3600, 2)
    finally:
        code, out = daemon.stop()
    assert code == 0
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    lifts = [e for e in events if e.get("event") == "user_unblocked"]
    assert [(e["user"], e["by"]) for e in lifts] == [("auth:m", "expiry")]
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["event"], e["actor"], e.get("nth")) for e in entries] == [
        ("block", "auto", 1),
        ("unblock", "expiry", None),
        ("block", "auto", 2),
    ]
    assert parse_time(entries[2]["until"]) - parse_time(entries[2]["at"]) == 3600
    assert json.loads((sock_dir / "var" / "repeats").read_text())["user"] == "auth:m"


def test_exim_fallback_reads_a_block_file_with_expiry(exim_lab: EximLab) -> None:
    """With the daemon down, the shipped ACL's lsearch finds a user whose line carries until=
    and nth= (even an until that has passed: only the daemon lifts), and freezes its mail."""
    lab = exim_lab
    lab.spamguard.stop()
    store = BlockStore(lab.spamguard.state, group=grp.getgrnam(EXIM_USER).gr_gid)
    now = float(int(time.time()))
    store.save([Block("auth:mallory", now - 7200, "3 failed", "auto", now - 3600, 2)])
    assert b" until=" in store.path.read_bytes()
    frozen = lab.send(["ok@remote.test"], user="mallory")
    assert frozen.message_id is not None
    lab.wait_queue_settled(frozen.message_id)
    assert frozen.message_id in lab.frozen_ids()
    assert not lab.paniclog.exists()
