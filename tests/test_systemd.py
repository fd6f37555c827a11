"""The daemon as systemd runs it, as real processes: units, socket activation, signals, crashes.

Sockets live in a short directory under /tmp. Readiness is the daemon's own ``started`` line or
an answered query; conditions on a subprocess are polled with a deadline, never slept on.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spamguardd.core import buckets
from spamguardd.state import snapshot_format
from spamguardd.state.snapshot import SnapshotStore
from tests.helpers import ask_blocking

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"
PYTHON = sys.executable
DEADLINE = 20.0


def ask(path: Path, request: bytes) -> bytes:
    """One readsocket-style exchange (the daemon is another process)."""
    return ask_blocking(path, request, timeout=DEADLINE)


def fail(n: int) -> bytes:
    return f"rcpt user=auth:a rcpt=r{n}@x verify=fail".encode()


def poll(condition: Any, what: str) -> None:
    """Wait for *condition()* to hold, up to the deadline (for conditions on a subprocess)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class Process:
    """A daemon process whose JSON log lines can be awaited one event at a time."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert self.process.stdout is not None
        self._stdout = self.process.stdout
        os.set_blocking(self._stdout.fileno(), False)
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def _read_lines(self, timeout: float) -> bool:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return False
        chunk = self._stdout.read()
        if not chunk:
            return False
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"{"):
                self.events.append(json.loads(line))
        return True

    def wait_event(self, name: str, start: int = 0) -> dict[str, Any]:
        """The first log event called *name* from index *start* on; waits for it."""
        deadline = time.monotonic() + DEADLINE
        while True:
            for event in self.events[start:]:
                if event["event"] == name:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (
                not self._read_lines(remaining) and self.process.poll() is not None
            ):
                pytest.fail(f"no {name!r} event; got {[e['event'] for e in self.events]}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=DEADLINE)
        self._stdout.close()
        return code


@pytest.fixture(name="workdir")
def _workdir(sock_dir: Path) -> Path:
    return sock_dir


def write_config(workdir: Path, limits: str) -> Path:
    path = workdir / "spamguardd.toml"
    path.write_text(
        f'[limits]\nfailed_recipients = "{limits}"\n'
        f'[server]\nquery_socket = "{workdir / "own.sock"}"\n'
        f'[state]\ndir = "{workdir / "state"}"\nsnapshot_interval = 0.2\n'
        '[log]\nformat = "json"\n'
    )
    return path


@pytest.fixture(name="daemon")
def _daemon(workdir: Path) -> Iterator[Process]:
    config = write_config(workdir, "10/1h")
    process = Process([PYTHON, "-m", "spamguardd", "--config", str(config)], workdir)
    process.wait_event("started")
    yield process
    process.close()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped units are valid: no error and no warning from systemd-analyze verify."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is required (Debian package systemd)"
    for unit in UNITS.glob("*.s*"):
        text = unit.read_text()
        # the path of an installed daemon does not exist here: point ExecStart at this venv's
        text = text.replace(
            "/opt/venvs/spamguardd/bin/spamguardd", str(Path(PYTHON).parent / "spamguardd")
        )
        (tmp_path / unit.name).write_text(text)
    units = sorted(
        str(path) for path in tmp_path.iterdir() if path.suffix in {".service", ".socket"}
    )
    assert len(units) == 5
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def _collect(notify: socket.socket, messages: list[str]) -> None:
    """Read sd_notify messages (first lines) into *messages* until STOPPING=1 or a timeout."""
    while "STOPPING=1" not in messages:
        try:
            messages.append(notify.recv(4096).decode().split("\n")[0])
        except OSError:
            return


def test_socket_activation_both_sockets_and_sd_notify(workdir: Path) -> None:
    """Started by systemd-socket-activate: sockets adopted by name, sd_notify in order, pings."""
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate is required (Debian package systemd)"
    query, admin = workdir / "query.sock", workdir / "admin.sock"
    config = write_config(workdir, "10/1h")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(workdir / "notify"))
        notify.settimeout(DEADLINE)
        # read as they come: at a ping every 50 ms, a slow run would fill the socket's buffer and
        # the daemon's later messages (STOPPING=1) would be dropped, as systemd never lets happen
        messages: list[str] = []
        reader = threading.Thread(target=_collect, args=(notify, messages), daemon=True)
        reader.start()
        process = Process(
            [
                activate,
                f"--listen={query}",
                f"--listen={admin}",
                "--fdname=query:admin",
                f"--setenv=NOTIFY_SOCKET={workdir / 'notify'}",
                "--setenv=WATCHDOG_USEC=100000",
                PYTHON,
                "-m",
                "spamguardd",
                "--config",
                str(config),
            ],
            workdir,
        )
        try:
            poll(query.exists, "the activated query socket")
            assert ask(query, b"ping") == b"pong\n"  # the first connection starts the daemon
            started = process.wait_event("started")
            assert started["query_socket"] == "inherited:query"
            assert started["inherited"] == ["admin", "query"]
            assert not (workdir / "own.sock").exists()
            ctl = Path(PYTHON).parent / "spamguardctl"
            stats = subprocess.run(
                [ctl, "--socket", str(admin), "--json", "stats"],
                capture_output=True,
                text=True,
                timeout=DEADLINE,
                check=False,
            )
            assert stats.returncode == 0, stats.stderr  # the admin server took its socket
            assert not (workdir / "run" / "admin.sock").exists()
            assert ask(query, fail(0)) == b"accept\n"
            process.signal(signal.SIGHUP)
            process.wait_event("reloaded")
            process.signal(signal.SIGTERM)
            # wait, never signal again: a second SIGTERM after the daemon closed its signal
            # receiver (on the way out) meets the default action and kills it (-15)
            assert process.process.wait(timeout=DEADLINE) == 0
            reader.join(timeout=DEADLINE)
            assert "STOPPING=1" in messages
        finally:
            process.close()
    assert "WATCHDOG=1" in messages  # pinged every 50 ms with WatchdogSec=100ms
    states = [message for message in messages if message != "WATCHDOG=1"]
    assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_sighup_changes_limits_and_keeps_counters(workdir: Path, daemon: Process) -> None:
    """3 failures under 10/1h, SIGHUP to 4/1h: the 4th blocks; a broken file keeps serving."""
    query = workdir / "own.sock"
    assert [ask(query, fail(i)) for i in range(3)] == [b"accept\n"] * 3
    write_config(workdir, "4/1h")
    seen = len(daemon.events)
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_event("reloaded", seen)["limits"] == ["4/1h"]
    (workdir / "spamguardd.toml").write_text('[limits]\nfailed_recipients = "4"\nbogus = 1\n')
    seen = len(daemon.events)
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_event("reload_failed", seen)
    assert len(failed["problems"]) == 2
    assert ask(query, b"ping") == b"pong\n"
    assert ask(query, fail(3)).startswith(b"freeze ")


def test_sigkill_does_not_forgive_a_user_half_way(workdir: Path, daemon: Process) -> None:
    """Killed with SIGKILL and restarted, a user half way to the limit is still counted."""
    query = workdir / "own.sock"
    assert [ask(query, fail(i)) for i in range(5)] == [b"accept\n"] * 5
    store = SnapshotStore(workdir / "state")

    def saved_after_five() -> bool:
        # a snapshot taken after all five failures: 5 of 10 tokens left (give or take refill)
        records = [
            record
            for path in store.files_to_load()
            for record in snapshot_format.decode(
                path.read_bytes(), source=str(path), shift=0.0, latest=math.inf
            )
            if isinstance(record, snapshot_format.Record) and record.state is not None
        ]
        last = records[-1] if records else None
        return (
            last is not None
            and last.state is not None
            and (buckets.tokens_left(last.state, last.rates)[0] < 5.5)
        )

    poll(saved_after_five, "a snapshot after the fifth failure")
    daemon.signal(signal.SIGKILL)
    daemon.close()
    again = Process(
        [PYTHON, "-m", "spamguardd", "--config", str(workdir / "spamguardd.toml")], workdir
    )
    try:
        assert again.wait_event("snapshot_loaded")["users"] == 1
        again.wait_event("started")
        replies = [ask(query, fail(i)) for i in range(5, 10)]
        assert replies[:4] == [b"accept\n"] * 4
        assert replies[4].startswith(b"freeze ")
    finally:
        assert again.close() == 0


def test_an_8bit_login_survives_snapshots_and_a_restart(workdir: Path, daemon: Process) -> None:
    """A key that is not UTF-8 is snapshotted byte for byte; SIGTERM exits 0 and keeps it.

    It used to kill the daemon at the next snapshot (and SIGTERM then exited 1 and lost the
    final snapshot): the shipped ACL sends ``auth:${lc:$authenticated_id}``, so any 8-bit
    login does it.
    """
    query = workdir / "own.sock"
    key = b"auth:m\xfcller@example.com"
    store = SnapshotStore(workdir / "state")

    def request(n: int) -> bytes:
        return b"rcpt user=" + key + b" rcpt=r%d@example.org verify=fail\n" % n

    assert [ask(query, request(i)) for i in range(5)] == [b"accept\n"] * 5

    def saved() -> bool:
        users = {
            record.user.encode("utf-8", "surrogateescape")
            for path in store.files_to_load()
            for record in snapshot_format.decode(
                path.read_bytes(), source=str(path), shift=0.0, latest=math.inf
            )
            if isinstance(record, snapshot_format.Record)
        }
        return key in users

    poll(saved, "a snapshot with the 8-bit key")  # snapshots every 0.2 s, and it still serves
    assert ask(query, b"ping") == b"pong\n"
    assert daemon.close() == 0
    again = Process(
        [PYTHON, "-m", "spamguardd", "--config", str(workdir / "spamguardd.toml")], workdir
    )
    try:
        again.wait_event("snapshot_loaded")
        replies = [ask(query, request(i)) for i in range(5, 10)]
        assert replies[:4] == [b"accept\n"] * 4
        assert replies[4].startswith(b"freeze ")
    finally:
        assert again.close() == 0
