"""A real redis-server (Debian's) for fleet mode's tests, on a private Unix socket.

Nothing is saved to disk and no TCP port is opened; the tests kill, restart, pause and resume it
to see what the daemons do when their shared store fails. redis-server missing is a failure,
never a skip: ``make test`` installs it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest


def redis_binary() -> str:
    """The redis-server binary, or a test failure saying how to get it."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if found is None:
        pytest.fail("redis-server is not installed: `make test` installs Debian's redis-server")
    return found


@attrs.define
class RedisLab:
    """One redis-server in *root*, listening on ``root/redis.sock`` only."""

    root: Path
    binary: str
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None

    @property
    def socket(self) -> Path:
        """The server's Unix socket."""
        return self.root / "redis.sock"

    @property
    def url(self) -> str:
        """``cluster.url`` for this server."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start the server (empty: nothing is kept across a restart) and wait until it answers."""
        argv = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
            "--logfile",
            str(self.root / "redis.log"),
        ]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start; see {self.root / 'redis.log'}")
            time.sleep(0.02)

    def answers(self) -> bool:
        """Whether the server answers on its socket (a PING, password or not)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            try:
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False

    def kill(self) -> None:
        """SIGKILL: the store vanishes with everything it held."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def pause(self) -> None:
        """SIGSTOP: the store accepts connections and never answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_redis(root: Path, *, password: str | None = None) -> Iterator[RedisLab]:
    """A started :class:`RedisLab` in *root*, killed on the way out."""
    lab = RedisLab(root, redis_binary(), password=password)
    lab.start()
    try:
        yield lab
    finally:
        if lab.process is not None:
            lab.resume()
        lab.kill()
