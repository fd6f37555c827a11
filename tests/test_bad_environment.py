"""The start in a bad environment: what the daemon says and its exit status, as a process.

Rows of the "Bad input" table in docs/reliability.md that no other test shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from spamguardd.cli import EX_CONFIG
from tests.helpers import ask_blocking


def _config(workdir: Path, *, server: str = "", state: str = "") -> Path:
    path = workdir / "c.toml"
    path.write_text(
        f'[server]\nquery_socket = "{workdir / "q.sock"}"\n{server}'
        f'[state]\ndir = "{workdir / "state"}"\n{state}'
        f'[admin]\nsocket = "{workdir / "a.sock"}"\n'
        '[log]\nformat = "json"\n'
    )
    return path


def _run_to_exit(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spamguardd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def _serves_despite(config: Path, env: dict[str, str], *, fd3: Path | None = None) -> str:
    """Start with *env* (and *fd3* open as descriptor 3), check a query is answered, stop; the
    log."""
    argv = [sys.executable, "-m", "spamguardd", "--config", str(config)]
    if fd3 is not None:
        argv = ["bash", "-c", 'exec 3<"$0"; exec "$@"', str(fd3), *argv]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env}
    )
    try:
        socket_path = config.parent / "q.sock"
        for _ in range(400):
            with contextlib.suppress(OSError):
                if ask_blocking(socket_path, b"ping") == b"pong\n":
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("no answer")
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    return out


def test_missing_socket_group_exits_78_naming_it(sock_dir: Path) -> None:
    result = _run_to_exit(_config(sock_dir, server='socket_group = "no-such-group"\n'))
    assert result.returncode == EX_CONFIG
    assert "socket group 'no-such-group' does not exist" in result.stdout


def test_missing_state_group_exits_78_naming_it(sock_dir: Path) -> None:
    result = _run_to_exit(_config(sock_dir, state='group = "no-such-group"\n'))
    assert result.returncode == EX_CONFIG
    assert "state.group: no such group 'no-such-group'" in result.stderr


def test_state_dir_that_is_a_file_exits_78_naming_it(sock_dir: Path) -> None:
    (sock_dir / "state").write_text("not a directory\n")
    result = _run_to_exit(_config(sock_dir))
    assert result.returncode == EX_CONFIG
    assert f"{sock_dir / 'state'}: cannot create" in result.stderr


def test_garbage_listen_fds_is_ignored_and_the_socket_bound(sock_dir: Path) -> None:
    out = _serves_despite(_config(sock_dir), {"LISTEN_FDS": "many", "LISTEN_FDNAMES": "query"})
    assert '"event": "listen_fds_ignored"' in out
    # and the start says which descriptor limit it found and which it serves under
    started = next(json.loads(line) for line in out.splitlines() if '"started"' in line)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert started["fd_limit"]["soft"] == started["fd_limit"]["hard"] == hard


def test_listen_fds_naming_a_file_is_skipped_and_the_socket_bound(sock_dir: Path) -> None:
    (sock_dir / "plain").write_text("not a socket\n")
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "query:admin"}
    out = _serves_despite(_config(sock_dir), env, fd3=sock_dir / "plain")
    assert '"event": "listen_fd_ignored"' in out
    assert "Socket operation on non-socket" in out
    assert "Bad file descriptor" in out  # descriptor 4 was never opened
