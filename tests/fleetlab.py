"""A fleet on one machine: several real spamguardd processes sharing one real redis-server.

Each relay is ``python -m spamguardd`` in a directory of its own (its sockets, its state, its
log file), with a ``[cluster]`` section naming the lab's store and a hook that appends one line
per notice to ``notices`` (so a test counts the notices the whole fleet sent).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from tests.helpers import ask_blocking

PYTHON = sys.executable
SPAMGUARDCTL = str(Path(sys.executable).with_name("spamguardctl"))


def wait_until(condition: Callable[[], bool], *, timeout: float = 20.0, what: str = "") -> float:
    """Poll *condition* until it holds; the seconds it took. Fails the test after *timeout*."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        time.sleep(0.01)
    return time.monotonic() - started


def relay_config(name: str, store_url: str, notices: Path, *, limits: str, extra: str = "") -> str:
    """A relay's configuration: the lab's store, a notice hook, and *extra* TOML."""
    # one line per notice: relay, event, user (the path has no blank or quote: made by mkdtemp)
    hook = ["/bin/sh", "-c", f'printf "%s %s %s\\n" "$0" "$1" "$2" >> {notices}', name]
    return (
        f'mode = "enforce"\n'
        f"[limits]\nfailed_recipients = {limits}\n"
        f'[cluster]\nurl = "{store_url}"\nname = "{name}"\n{extra}'
        f"[notify]\nhook = {json.dumps(hook)}\nqueue_size = 100000\n"
        f'[log]\nformat = "json"\n'
    )


@attrs.define
class Relay:
    """One spamguardd process of the fleet."""

    workdir: Path
    name: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "spamguardd.sock"

    @property
    def log_file(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def block_file(self) -> Path:
        return self.workdir / "var" / "blocked"

    def start(self) -> None:
        """Start the daemon and wait for its ``started`` line."""
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "spamguardd", "--config", "spamguardd.toml"],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: b'"event": "started"' in self.log_file.read_bytes()[offset:],
            what=f"{self.name} started",
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon; its exit status."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code

    def ask(self, request: str) -> str:
        """One query, as Exim's readsocket asks it."""
        return ask_blocking(self.socket, f"{request}\n".encode()).decode()

    def fail(self, user: str, rcpt: str) -> str:
        """A recipient of *user* that failed verification."""
        return self.ask(f"rcpt user={user} rcpt={rcpt} verify=fail ip=192.0.2.7")

    def check(self, user: str) -> str:
        return self.ask(f"check user={user}")

    def blocked_in_file(self, user: str) -> bool:
        return self.block_file.exists() and f'"{user}":' in self.block_file.read_text()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of *event*."""
        marker = f'"event": "{event}"'
        return [
            json.loads(line) for line in self.log_file.read_text().splitlines() if marker in line
        ]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SPAMGUARDCTL, "--socket", str(self.workdir / "run" / "admin.sock"), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ctl_json(self, *args: str) -> dict[str, Any]:
        result = self.ctl("--json", *args)
        assert result.returncode == 0, result.stderr
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def cluster_up(self) -> bool:
        stats = self.ctl_json("stats")
        return bool(stats["cluster"]["up"])


@attrs.define
class Fleet:
    """Relays sharing one store; ``notices`` collects every relay's notices."""

    root: Path
    relays: list[Relay]

    @property
    def notices(self) -> Path:
        return self.root / "notices"

    def notice_lines(self) -> list[str]:
        return self.notices.read_text().splitlines() if self.notices.exists() else []

    def stop(self) -> None:
        for relay in self.relays:
            if relay.process is not None:
                relay.stop()


def make_fleet(
    root: Path, store_url: str, names: list[str], *, limits: str, extra: str = ""
) -> Fleet:
    """Configure (not start) relays *names* under *root*."""
    relays = []
    for name in names:
        workdir = root / name
        workdir.mkdir()
        config = relay_config(name, store_url, root / "notices", limits=limits, extra=extra)
        (workdir / "spamguardd.toml").write_text(config)
        relays.append(Relay(workdir, name))
    return Fleet(root, relays)


class SlowProxy:
    """A Unix-socket proxy in front of the store that holds every answer for ``delay``
    seconds: a store that answers, but slowly (a saturated server, a congested link)."""

    def __init__(self, listen: Path, target: Path, delay: float) -> None:
        self.listen = listen
        self.target = target
        self.delay = delay
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(listen))
        self._server.listen()
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.listen}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.target))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(65536):
                if slow and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
