"""spamguardctl end to end: the real client against a real daemon process on real sockets.

Each test starts ``python -m spamguardd`` in a scratch directory (see ``tests/test_cli.py``) and
runs the installed ``spamguardctl`` script as a separate process, as an admin would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from spamguardd.core import adminproto
from spamguardd.ctl.main import EX_FAILED, EX_OK, EX_UNAVAILABLE, EX_USAGE
from tests.exim_queue_fixture import make_exim_queue
from tests.test_cli import Daemon, ask

SPAMGUARDCTL = str(Path(sys.executable).with_name("spamguardctl"))
CONFIG = '[limits]\nfailed_recipients = ["5/1h", "20/1d"]\n'


def ctl(
    workdir: Path, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run spamguardctl against the daemon in *workdir*, optionally under *prefix* (setpriv)."""
    return subprocess.run(
        [*prefix, SPAMGUARDCTL, "--socket", str(workdir / "run" / "admin.sock"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ctl_json(workdir: Path, *args: str) -> dict[str, Any]:
    result = ctl(workdir, "--json", *args)
    assert result.returncode == EX_OK, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def start(workdir: Path, config: str = CONFIG) -> Daemon:
    (workdir / "spamguardd.toml").write_text(config)
    return Daemon(workdir, "--config", "spamguardd.toml")


def fail(user: str, rcpt: str) -> bytes:
    return f"rcpt user={user} rcpt={rcpt} verify=fail ip=192.0.2.7\n".encode()


class TestCommands:
    def test_block_show_list_unblock_reset(self, sock_dir: Path) -> None:
        """Every user command, in human and JSON form, with its exit status."""
        daemon = start(sock_dir)
        try:
            for i in range(3):
                assert ask(daemon.socket, fail("auth:m", f"r{i}@x")) == b"accept\n"

            shown = ctl_json(sock_dir, "show", "auth:m")
            assert (shown["blocked"], shown["block"]) == (False, None)
            assert [(w["limit"], w["counted"]) for w in shown["windows"]] == [
                ("5/1h", 3),
                ("20/1d", 3),
            ]
            assert shown["windows"][0]["clears_at"].endswith("Z")
            assert [(f["rcpt"], f["ip"]) for f in shown["recent_failures"]] == [
                ("r2@x", "192.0.2.7"),
                ("r1@x", "192.0.2.7"),
                ("r0@x", "192.0.2.7"),
            ]

            blocked = ctl(sock_dir, "block", "auth:m", "--reason", "phished account")
            assert (blocked.returncode, blocked.stdout) == (
                EX_OK,
                "blocked auth:m (verdict freeze): phished account\n",
            )
            # durable before the answer: the block file already holds it
            assert '"auth:m": ' in (sock_dir / "var" / "blocked").read_text()
            assert "by=admin:0" in (sock_dir / "var" / "blocked").read_text()
            assert ask(daemon.socket, b"check user=auth:m\n") == (
                b'freeze reason="phished account"\n'
            )
            again = ctl(sock_dir, "block", "auth:m")
            assert again.returncode == EX_OK
            assert "already blocked" in again.stdout

            listing = ctl(sock_dir, "list")
            assert listing.returncode == EX_OK
            header, row = listing.stdout.splitlines()
            assert header.split() == ["USER", "SINCE", "BY", "VERDICT", "REASON"]
            assert row.split()[0] == "auth:m"
            assert row.split()[2:] == ["admin:0", "freeze", "phished", "account"]

            human = ctl(sock_dir, "show", "auth:m").stdout
            assert "status:   blocked since" in human
            assert "by admin:0 (verdict freeze): phished account" in human

            assert ctl(sock_dir, "unblock", "auth:m").stdout == "unblocked auth:m\n"
            not_blocked = ctl(sock_dir, "unblock", "auth:m")
            assert not_blocked.returncode == EX_FAILED
            assert not_blocked.stderr == "spamguardctl: auth:m is not blocked\n"
            assert ask(daemon.socket, b"check user=auth:m\n") == b"accept\n"

            assert ctl(sock_dir, "reset", "auth:nobody").returncode == EX_FAILED
            ask(daemon.socket, fail("auth:n", "x@y"))
            reset = ctl(sock_dir, "reset", "auth:n")
            assert (reset.returncode, reset.stdout) == (EX_OK, "forgot the counters of auth:n\n")
            assert ctl_json(sock_dir, "show", "auth:n")["windows"][0]["counted"] == 0

            history = ctl_json(sock_dir, "show", "auth:m")["history"]
            assert [(e["event"], e["actor"]) for e in history] == [
                ("block", "admin:0"),
                ("unblock", "admin:0"),
            ]
            assert history[0]["reason"] == "phished account"
        finally:
            code, out = daemon.stop()
        assert code == 0
        assert '"event": "user_unblocked"' in out

    def test_auto_block_is_journaled_and_shown(self, sock_dir: Path) -> None:
        """An automatic block shows in list, in show's history with its limit, and in stats."""
        daemon = start(sock_dir)
        try:
            replies = [ask(daemon.socket, fail("auth:s", f"r{i}@x")) for i in range(5)]
            assert replies[-1] == b'freeze reason="5 failed recipients within 1h"\n'
            (entry,) = ctl_json(sock_dir, "list")["blocked"]
            assert entry["by"] == "auto"
            assert entry["verdict"] == "freeze"
            shown = ctl_json(sock_dir, "show", "auth:s")
            assert [(e["event"], e["actor"], e["limit"]) for e in shown["history"]] == [
                ("block", "auto", "5/1h")
            ]
            assert len(shown["recent_failures"]) == 5
            stats = ctl_json(sock_dir, "stats")
            assert stats["queries"]["rcpt"] == {"accept": 4, "freeze": 1}
            assert stats["blocks"] == {"auto": 1, "admin": 0}
            assert (stats["blocked_users"], stats["tracked_users"]) == (1, 0)
            assert set(stats["latency_ms"]) == {"p50", "p90", "p99", "p99_9"}
            assert ctl(sock_dir, "stats").stdout.startswith("version:")
        finally:
            daemon.stop()

    def test_reload_keeps_the_running_config_on_errors(self, sock_dir: Path) -> None:
        """A bad file is refused with its problems; a good one takes effect at once."""
        daemon = start(sock_dir)
        try:
            (sock_dir / "spamguardd.toml").write_text('[limits]\nfailed_recipients = "5"\n')
            bad = ctl(sock_dir, "reload")
            assert bad.returncode == EX_FAILED
            assert "the running one stays" in bad.stderr
            assert "limits.failed_recipients: expected a rate" in bad.stderr
            assert ctl_json(sock_dir, "show", "auth:x")["windows"][0]["limit"] == "5/1h"

            (sock_dir / "spamguardd.toml").write_text('[limits]\nfailed_recipients = "2/1h"\n')
            good = ctl_json(sock_dir, "reload")
            assert (good["config"], good["needs_restart"]) == ("spamguardd.toml", [])
            assert ask(daemon.socket, fail("auth:r", "a@x")) == b"accept\n"
            assert ask(daemon.socket, fail("auth:r", "b@x")).startswith(b"freeze ")

            (sock_dir / "spamguardd.toml").write_text('[admin]\nsocket = "elsewhere.sock"\n')
            moved = ctl(sock_dir, "reload")
            assert moved.stdout.endswith(
                "note: admin.socket changed; takes effect at the next start\n"
            )
        finally:
            _, out = daemon.stop()
        assert '"event": "reload_failed"' in out
        assert '"event": "reloaded"' in out

    def test_admin_block_survives_restart(self, sock_dir: Path) -> None:
        """A block made through the admin socket is in force after a restart, with its reason."""
        daemon = start(sock_dir)
        try:
            assert ctl(sock_dir, "block", "auth:r", "--reason", "held").returncode == EX_OK
        finally:
            daemon.stop()
        again = Daemon(sock_dir, "--config", "spamguardd.toml")
        try:
            assert ask(again.socket, b"check user=auth:r\n") == b"freeze reason=held\n"
            (entry,) = ctl_json(sock_dir, "list")["blocked"]
            assert (entry["user"], entry["by"], entry["reason"]) == ("auth:r", "admin:0", "held")
        finally:
            again.stop()

    def test_torn_journal_line_is_reported_not_fatal(self, sock_dir: Path) -> None:
        """A journal cut short mid-line (a crash) still serves show, which says so."""
        (sock_dir / "var").mkdir()
        (sock_dir / "var" / "journal").write_text(
            '{"actor":"auto","at":"2026-11-28T00:00:00Z","event":"block","user":"auth:t"}\n'
            '{"actor":"admin:0","at":"2026-11-28T00:0'
        )
        daemon = start(sock_dir)
        try:
            shown = ctl(sock_dir, "show", "auth:t")
            assert shown.returncode == EX_OK, shown.stderr
            assert "2026-11-28T00:00:00Z  block  auto" in shown.stdout
            assert "note: the journal's last line (2) is truncated" in shown.stdout
            assert ctl(sock_dir, "block", "auth:t").returncode == EX_OK
            history = ctl_json(sock_dir, "show", "auth:t")
            assert [e["event"] for e in history["history"]] == ["block", "block"]
            assert history["journal"] == {"truncated_line": None, "damaged_lines": [2]}
        finally:
            daemon.stop()

    def test_an_unreadable_journal_still_shows_the_rest(self, sock_dir: Path) -> None:
        """A journal that cannot be read (here a directory) leaves show its counters and says
        why there is no history, instead of an internal error."""
        (sock_dir / "var" / "journal").mkdir(parents=True)
        daemon = start(sock_dir)
        try:
            shown = ctl(sock_dir, "show", "auth:j")
            assert shown.returncode == EX_OK, shown.stderr
            assert "status:   not blocked" in shown.stdout
            assert "note: no history: " in shown.stdout
            assert "Is a directory" in shown.stdout
            notes = ctl_json(sock_dir, "show", "auth:j")["journal"]
            assert "Is a directory" in notes["unreadable"]
        finally:
            daemon.stop()

    def test_query_socket_refuses_admin_verbs(self, sock_dir: Path) -> None:
        """Admin commands sent to the query socket are answered error and change nothing."""
        daemon = start(sock_dir)
        try:
            assert ask(daemon.socket, b"block user=auth:q\n").startswith(b"error ")
            assert ask(daemon.socket, b'{"command": "block", "user": "auth:q"}\n').startswith(
                b"error "
            )
            assert ask(daemon.socket, b"check user=auth:q\n") == b"accept\n"
            assert ctl_json(sock_dir, "list")["blocked"] == []
        finally:
            daemon.stop()


class TestAccess:
    def test_a_socket_its_mode_keeps_out_is_a_refusal_not_a_dead_daemon(
        self, sock_dir: Path
    ) -> None:
        """The shipped mode (0600, root): another user's connect is denied by the kernel before
        the daemon sees it; that is said as a refusal (exit 1), not as a daemon down (69)."""
        sock_dir.chmod(0o755)
        daemon = start(sock_dir)
        nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        try:
            (sock_dir / "run").chmod(0o755)
            refused = ctl(sock_dir, "list", prefix=nobody)
            assert refused.returncode == EX_FAILED, refused.stderr
            assert "uid 65534 may not use the spamguardd admin socket" in refused.stderr
            assert "run as root" in refused.stderr
        finally:
            daemon.stop()

    def test_other_uid_is_refused_and_logged(self, sock_dir: Path) -> None:
        """A uid not allowed gets a refusal (exit 1) and the daemon logs its uid; once allowed,
        the same user gets in."""
        sock_dir.chmod(0o755)  # so the other user can reach the socket: the check must refuse
        daemon = start(sock_dir, CONFIG + '[admin]\nsocket_mode = "0666"\n')
        nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        try:
            (sock_dir / "run").chmod(0o755)
            runs = subprocess.run(
                [*nobody, SPAMGUARDCTL, "--version"], capture_output=True, text=True, check=False
            )
            assert runs.returncode == EX_OK, (
                "user nobody cannot run spamguardctl from this checkout (it and .venv must be "
                f"readable by others): {runs.stderr}"
            )
            refused = ctl(sock_dir, "list", prefix=nobody)
            assert refused.returncode == EX_FAILED, refused.stderr
            assert "uid 65534 may not use the spamguardd admin socket" in refused.stderr
            assert ctl(sock_dir, "block", "auth:x", prefix=nobody).returncode == EX_FAILED
            assert ctl_json(sock_dir, "list")["blocked"] == []

            (sock_dir / "spamguardd.toml").write_text(
                CONFIG + '[admin]\nsocket_mode = "0666"\nallowed_users = ["nobody"]\n'
            )
            assert ctl(sock_dir, "reload").returncode == EX_OK
            allowed = ctl(sock_dir, "block", "auth:x", prefix=nobody)
            assert allowed.returncode == EX_OK, allowed.stderr
            assert ctl_json(sock_dir, "list")["blocked"][0]["by"] == "admin:65534"
        finally:
            _, out = daemon.stop()
        refusals = [
            json.loads(line) for line in out.splitlines() if '"event": "admin_refused"' in line
        ]
        assert [entry["uid"] for entry in refusals] == [65534, 65534]

    def test_socket_is_0600_by_default(self, sock_dir: Path) -> None:
        """Without configuration only the daemon's user (and root) can even connect."""
        daemon = start(sock_dir)
        try:
            assert (sock_dir / "run" / "admin.sock").stat().st_mode & 0o777 == 0o600
        finally:
            daemon.stop()


class TestExitStatus:
    def test_unreachable_names_the_socket(self, sock_dir: Path) -> None:
        """No daemon: exit 69 and a message naming the socket."""
        result = ctl(sock_dir, "list")
        assert result.returncode == EX_UNAVAILABLE
        assert result.stderr == (
            f"spamguardctl: cannot reach spamguardd at {sock_dir}/run/admin.sock: "
            "No such file or directory\n"
        )

    @pytest.mark.parametrize(
        "args",
        [(), ("show",), ("frobnicate",), ("unblock", "u", "--release", "--remove")],
    )
    def test_usage_errors_exit_2(self, sock_dir: Path, args: tuple[str, ...]) -> None:
        """Bad usage is exit 2, before any daemon is asked."""
        assert ctl(sock_dir, *args).returncode == EX_USAGE

    def test_unbalanced_exim_command_is_usage(self, sock_dir: Path) -> None:
        """An --exim-command that cannot be split is a usage error, not a shell's problem."""
        result = ctl(sock_dir, "unblock", "u", "--release", "--exim-command", "exim -C 'x")
        assert result.returncode == EX_USAGE
        assert "--exim-command" in result.stderr


class TestRelease:
    def test_release_and_remove_through_a_real_exim_queue(self, sock_dir: Path) -> None:
        """--release thaws exactly the messages the ACL froze for the user, whatever headers
        their writers put in; --remove deletes them."""
        sock_dir.chmod(0o755)
        queue = make_exim_queue(sock_dir / "exim")
        mallory_1 = queue.submit("m@example.com", "auth:mallory@example.com")
        mallory_2 = queue.submit("m@example.com", "auth:mallory@example.com")
        alice = queue.submit("a@example.com", "auth:alice@example.com")
        lookalike = queue.submit("x@example.com", "auth:mallory@example.com.evil")
        unfrozen = queue.submit("m@example.com", "auth:mallory@example.com", frozen=False)
        # a blocked user's message whose writer forged the header that names another user
        forged = queue.submit(
            "w@example.com",
            "uid:www-data",
            headers="X-Spamguard-User: auth:mallory@example.com\n",
        )
        by_hand = queue.submit("m@example.com", None)
        daemon = start(sock_dir)
        try:
            for user in ("auth:mallory@example.com", "auth:alice@example.com"):
                assert ctl(sock_dir, "block", user).returncode == EX_OK
            result = ctl(
                sock_dir,
                "--json",
                "unblock",
                "auth:mallory@example.com",
                "--release",
                "--exim-command",
                queue.command,
            )
            assert result.returncode == EX_OK, result.stderr
            reply = json.loads(result.stdout)
            assert reply["exim"]["action"] == "release"
            assert sorted(m["id"] for m in reply["exim"]["messages"]) == sorted(
                [mallory_1, mallory_2]
            )
            assert all(m["ok"] for m in reply["exim"]["messages"])
            assert queue.queue() == {
                mallory_1: False,
                mallory_2: False,
                alice: True,
                lookalike: True,
                unfrozen: False,
                forged: True,
                by_hand: True,
            }

            removed = ctl(
                sock_dir,
                "unblock",
                "auth:alice@example.com",
                "--remove",
                "--exim-command",
                queue.command,
            )
            assert removed.returncode == EX_OK, removed.stderr
            assert removed.stdout.startswith("unblocked auth:alice@example.com\nremoved " + alice)
            assert alice not in queue.queue()
            assert lookalike in queue.queue()
        finally:
            daemon.stop()

    def test_exim_failure_is_exit_1_after_the_unblock(self, sock_dir: Path) -> None:
        """An Exim that cannot run: the unblock stands, the failure is reported, exit 1."""
        daemon = start(sock_dir)
        try:
            ctl(sock_dir, "block", "auth:m")
            missing = str(sock_dir / "no-such-exim")
            result = ctl(sock_dir, "unblock", "auth:m", "--release", "--exim-command", missing)
            assert result.returncode == EX_FAILED
            assert f"cannot run {missing} -bp" in result.stderr
            assert ctl_json(sock_dir, "list")["blocked"] == []
        finally:
            daemon.stop()


def test_ctl_runs_as_a_module() -> None:
    """python -m spamguardd.ctl is the same client (for hosts without the script on PATH)."""
    result = subprocess.run(
        [sys.executable, "-m", "spamguardd.ctl", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ},
    )
    assert "unblock" in result.stdout


DOCS = Path(__file__).parent.parent / "docs" / "admin.md"


def documented_replies() -> dict[str, Any]:
    """The JSON example of every command in docs/admin.md's "JSON output" section."""
    section = DOCS.read_text().split("## JSON output", 1)[1]
    found = re.findall(
        r"^### (\w+)\n\n```json\n(.*?)\n```", section, flags=re.MULTILINE | re.DOTALL
    )
    return {name: json.loads(text) for name, text in found}


def shape(value: Any) -> Any:
    """The keys of *value*, recursively (lists by their first element), without the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def same_shape(documented: Any, real: Any, where: str = "") -> None:
    if isinstance(documented, dict):
        assert isinstance(real, dict), where
        assert set(documented) == set(real), (where, sorted(documented), sorted(real))
        for key in documented:
            same_shape(documented[key], real[key], f"{where}.{key}")
    elif isinstance(documented, list) and documented and real:
        same_shape(documented[0], real[0], f"{where}[0]")


def test_json_output_is_as_documented(sock_dir: Path) -> None:
    """Every command's --json reply has exactly the fields docs/admin.md shows for it."""
    documented = documented_replies()
    assert sorted(documented) == sorted(verb.value for verb in adminproto.Verb)
    sock_dir.chmod(0o755)
    queue = make_exim_queue(sock_dir / "exim")
    queue.submit("b@example.com", "auth:b")
    daemon = start(sock_dir, '[limits]\nfailed_recipients = "5/1h"\n')
    try:
        for i in range(5):
            ask(daemon.socket, fail("auth:m", f"r{i}@example.org"))
        ask(daemon.socket, fail("auth:r", "x@example.org"))
        real = {
            "list": ctl_json(sock_dir, "list"),
            "show": ctl_json(sock_dir, "show", "auth:m"),
            "block": ctl_json(sock_dir, "block", "auth:b", "--reason", "phished"),
            "unblock": ctl_json(
                sock_dir, "unblock", "auth:b", "--release", "--exim-command", queue.command
            ),
            "reset": ctl_json(sock_dir, "reset", "auth:r"),
            "stats": ctl_json(sock_dir, "stats"),
            "metrics": ctl_json(sock_dir, "metrics"),
        }
        (sock_dir / "spamguardd.toml").write_text('[limits]\nfailed_recipients = "5/1h"\n')
        real["reload"] = ctl_json(sock_dir, "reload")
    finally:
        daemon.stop()
    for name, reply in real.items():
        same_shape(documented[name], reply, name)
    assert shape(real["show"]["windows"]) == shape(documented["show"]["windows"])
    assert "spamguardd_blocks_total 1.0" in real["metrics"]["text"]
