"""The spamguardd command: options, exit codes, and the real daemon process end to end."""

from __future__ import annotations

import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from spamguardd.cli import EX_CONFIG, main
from tests.helpers import ask_blocking

PYTHON = sys.executable


def ask(path: Path, request: bytes) -> bytes:
    """One readsocket-style exchange (the daemon is another process)."""
    return ask_blocking(path, request)


def run_to_exit(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start ``python -m spamguardd`` in *workdir* for a start that is expected to fail."""
    return subprocess.run(
        [PYTHON, "-m", "spamguardd", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Daemon:
    """A real ``python -m spamguardd`` process in a scratch directory."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.socket = workdir / "run" / "spamguardd.sock"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "spamguardd", *args],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        # the daemon prints its "started" line once the socket accepts (after any line the
        # start logs first); a daemon that exits instead ends the output
        assert self.process.stdout is not None
        seen = []
        for line in self.process.stdout:
            if '"event": "started"' in line:
                return
            seen.append(line)
        raise AssertionError(seen, self.process.stderr.read() if self.process.stderr else "")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(sig)
        out, _ = self.process.communicate(timeout=20)
        return self.process.returncode, out


@pytest.fixture(name="workdir")
def _workdir(sock_dir: Path) -> Path:
    return sock_dir


class TestProcess:
    def test_embedded_defaults_block_survives_restart(self, workdir: Path) -> None:
        """No config file: the 100th failure freezes; after SIGTERM and restart it still does."""
        daemon = Daemon(workdir)
        try:
            replies = [
                ask(daemon.socket, f"rcpt user=auth:m rcpt=r{i}@x verify=fail".encode())
                for i in range(100)
            ]
        finally:
            code, out = daemon.stop()
        assert replies[:99] == [b"accept\n"] * 99
        assert replies[99] == b'freeze reason="100 failed recipients within 1h"\n'
        assert code == 0
        assert '"event": "user_blocked"' in out
        assert '"event": "stopped"' in out
        assert (workdir / "var" / "blocked").read_text().count('"auth:m"') == 1

        again = Daemon(workdir)
        try:
            assert ask(again.socket, b"check user=auth:m").startswith(b"freeze ")
            assert ask(again.socket, b"check user=auth:n") == b"accept\n"
        finally:
            assert again.stop(signal.SIGINT)[0] == 0

    def test_query_listen_serves_tcp_too(self, workdir: Path) -> None:
        """--query-listen adds a loopback TCP listener served like the Unix socket."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        daemon = Daemon(workdir, "--query-listen", f"inet:127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"report user=auth:t rcpt=x@y event=msg:fail:delivery\n")
                assert sock.makefile("rb").read() == b"accept\n"
            assert ask(daemon.socket, b"ping\n") == b"pong\n"
        finally:
            assert daemon.stop()[0] == 0

    def test_damaged_block_file_stops_the_start(self, workdir: Path) -> None:
        """A damaged block file is not overwritten: exit 78 naming file and line."""
        state = workdir / "var"
        state.mkdir()
        damaged = b'"auth:a": blocked_at=2026-11-28T00:00:00Z\nauth:b garbage\n'
        (state / "blocked").write_bytes(damaged)
        result = run_to_exit(workdir)
        assert result.returncode == EX_CONFIG
        assert "var/blocked:2: the user key must be in double quotes" in result.stderr
        assert (state / "blocked").read_bytes() == damaged

    @pytest.mark.parametrize("name", ["journal", "counters", "repeats"])
    def test_a_symbolic_link_in_the_state_directory_stops_the_start(
        self, workdir: Path, name: str
    ) -> None:
        """A link where the daemon appends or renames would make it write wherever the link
        points: exit 78 naming it, and the file it points to untouched."""
        state = workdir / "var"
        state.mkdir()
        elsewhere = workdir / "elsewhere"
        elsewhere.write_bytes(b"someone else's file\n")
        (state / name).symlink_to(elsewhere)
        result = run_to_exit(workdir)
        assert result.returncode == EX_CONFIG
        assert f"var/{name}: is a symbolic link (to {elsewhere})" in result.stderr
        assert elsewhere.read_bytes() == b"someone else's file\n"
        assert (state / name).is_symlink()

    def test_help_runs(self) -> None:
        """python -m spamguardd --help works from a clean process."""
        result = subprocess.run(
            [PYTHON, "-m", "spamguardd", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "--check-config" in result.stdout


class TestCheckConfig:
    def test_valid(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--check-config on a good file says so and exits 0."""
        path = tmp_path / "c.toml"
        path.write_text('[limits]\nfailed_recipients = "5/1h"\n')
        assert (
            main(["--config", str(path), "--state-dir", str(tmp_path / "s"), "--check-config"]) == 0
        )
        assert capsys.readouterr().out == (
            f"{path}: configuration is valid; {tmp_path}/s/blocked: 0 blocked users\n"
        )

    def test_changes_nothing(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--check-config creates no state directory and repairs no permission: it reports."""
        group = grp.getgrgid(os.getgid()).gr_name
        # under /tmp itself: pytest's own directories are 0700, which would be reported too
        scratch = Path(tempfile.mkdtemp(prefix="check-", dir="/tmp"))
        try:
            scratch.chmod(0o755)
            path = scratch / "c.toml"
            path.write_text(f'[state]\ngroup = "{group}"\n')
            new = scratch / "new"
            assert main(["--config", str(path), "--state-dir", str(new), "--check-config"]) == 0
            assert not new.exists()
            state = scratch / "s"
            state.mkdir()
            state.chmod(0o700)
            (state / "blocked").write_text("")
            (state / "blocked").chmod(0o600)
            assert main(["--config", str(path), "--state-dir", str(state), "--check-config"]) == 78
            err = capsys.readouterr().err
            assert f"{state}/blocked: Exim's group {group} cannot read this file" in err
            assert f"{state}: Exim's group {group} cannot search this directory" in err
            assert stat.S_IMODE((state / "blocked").stat().st_mode) == 0o600
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
        finally:
            shutil.rmtree(scratch)

    @pytest.mark.skipif(os.geteuid() != 0, reason="what root sees that the daemon would not")
    def test_a_password_file_only_root_can_read_is_pointed_out(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Run as root, the check reads any file; it says when the daemon's user could not."""
        secret = tmp_path / "store-password"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        path = tmp_path / "c.toml"
        path.write_text(
            f'[cluster]\nurl = "redis://127.0.0.1:6379/0"\npassword_file = "{secret}"\n'
        )
        argv = ["--config", str(path), "--state-dir", str(tmp_path / "s"), "--check-config"]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"cluster.password_file: {secret}: only root can read it (mode 0600)" in err
        assert f"chgrp spamguardd {secret}; chmod 0640 {secret}" in err
        secret.chmod(0o640)
        assert main(argv) == 0
        assert "only root" not in capsys.readouterr().err

    def test_a_symbolic_link_in_the_state_directory_is_reported(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--check-config names a link the start would refuse."""
        state = tmp_path / "s"
        state.mkdir()
        (state / "journal").symlink_to("/etc/passwd")
        path = tmp_path / "c.toml"
        path.write_text("")
        assert main(["--config", str(path), "--state-dir", str(state), "--check-config"]) == 78
        assert f"{state}/journal: is a symbolic link (to /etc/passwd)" in capsys.readouterr().err

    def test_fleet_password_file_is_read(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Fleet mode: a password file the daemon could not read fails the check, not the start."""
        secret = tmp_path / "store-password"
        path = tmp_path / "c.toml"
        path.write_text(
            f'[cluster]\nurl = "redis://127.0.0.1:6379/0"\npassword_file = "{secret}"\n'
        )
        argv = ["--config", str(path), "--state-dir", str(tmp_path / "s"), "--check-config"]
        assert main(argv) == EX_CONFIG
        assert f"cluster.password_file: {secret}: cannot read" in capsys.readouterr().err
        secret.write_text("\n")
        assert main(argv) == EX_CONFIG
        assert f"cluster.password_file: {secret}: empty" in capsys.readouterr().err
        secret.write_text("s3cret\n")
        assert main(argv) == 0

    def test_every_problem_and_78(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--check-config on a bad file lists every problem, one per line, and exits 78."""
        path = tmp_path / "c.toml"
        path.write_text('mode = "x"\n[limits]\nfailed_recipients = "5"\n')
        assert main(["--config", str(path), "--check-config"]) == EX_CONFIG
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"spamguardd: {path}: mode: expected enforce | monitor (got 'x')",
            (
                f"spamguardd: {path}: limits.failed_recipients: "
                "expected a rate such as 100/1h (got '5')"
            ),
        ]

    def test_flags_override_the_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--state-dir wins over state.dir: a damaged file there is what gets reported."""
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "blocked").write_text("junk\n")
        path = tmp_path / "c.toml"
        path.write_text(f'[state]\ndir = "{tmp_path / "elsewhere"}"\n')
        assert (
            main(["--config", str(path), "--state-dir", str(tmp_path / "s"), "--check-config"])
            == 78
        )
        assert f"{tmp_path}/s/blocked:1:" in capsys.readouterr().err

    def test_missing_config_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A missing --config file is a configuration error with the path."""
        assert main(["--config", str(tmp_path / "nope.toml")]) == EX_CONFIG
        assert "nope.toml: cannot read" in capsys.readouterr().err

    def test_bad_usage_exits_2(self) -> None:
        """An unknown option is a usage error (argparse's exit 2)."""
        with pytest.raises(SystemExit) as info:
            main(["--frobnicate"])
        assert info.value.code == 2


def test_socket_in_use_exits_1(workdir: Path) -> None:
    """A second daemon on the same socket refuses to start instead of stealing it."""
    first = Daemon(workdir)
    try:
        # a state directory of its own: the shared one would stop it first (exit 75)
        result = run_to_exit(workdir, "--state-dir", "other-state")
        assert result.returncode == 1
        assert "another process is listening" in result.stdout
        assert ask(first.socket, b"ping") == b"pong\n"
    finally:
        first.stop()


def test_second_daemon_on_the_state_directory_exits_75(workdir: Path) -> None:
    """Two daemons on one state directory would lose each other's blocks: the second stops,
    naming the pid of the first, with exit 75, before it touches anything."""
    first = Daemon(workdir)
    try:
        result = run_to_exit(
            workdir, "--query-socket", "other.sock", "--admin-socket", "other-admin.sock"
        )
        assert result.returncode == 75
        assert f"in use by another spamguardd (pid {first.process.pid} holds" in result.stderr
        assert "Traceback" not in result.stderr
        assert ask(first.socket, b"ping") == b"pong\n"
    finally:
        first.stop()


def test_metrics_port_in_use_is_a_clear_error(workdir: Path) -> None:
    """A metrics address someone else listens on: one line naming it, exit 1, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        (workdir / "m.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = run_to_exit(workdir, "--config", "m.toml")
    assert result.returncode == 1
    assert f"metrics.listen 127.0.0.1:{port}: cannot listen: Address already in use" in (
        result.stdout
    )
    assert "Traceback" not in result.stdout + result.stderr


class TestCheckConfigState:
    def test_missing_socket_group_is_reported(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A socket group that does not exist would stop the start: the check says so."""
        path = tmp_path / "c.toml"
        path.write_text('[server]\nsocket_group = "no-such-group-here"\n')
        args = ["--config", str(path), "--state-dir", str(tmp_path / "s"), "--check-config"]
        assert main(args) == EX_CONFIG
        assert f"{path}: server.socket_group: no such group 'no-such-group-here'" in (
            capsys.readouterr().err
        )

    @pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
    def test_read_only_state_directory(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The check reports it (and writes nothing); the daemon refuses to start on it."""
        state = tmp_path / "ro"
        state.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)]
        subprocess.run(mount, check=True)
        try:
            args = ["--state-dir", str(state)]
            assert main([*args, "--check-config"]) == EX_CONFIG
            assert f"{state}: the state directory cannot be written (read-only file system)" in (
                capsys.readouterr().err
            )
            result = run_to_exit(tmp_path, *args)  # a process: main() would set up logging here
            assert result.returncode == EX_CONFIG
            assert f"{state}: the state directory cannot be written (creating lock: " in (
                result.stderr
            )
            assert "Read-only file system" in result.stderr
        finally:
            subprocess.run(["umount", str(state)], check=True)
