"""The package, installed with apt under a real systemd, used as docs/install.md says.

One story, in order, in a throwaway root (``tests/deploylab.py``): install the .deb that
``make deb`` built, follow docs/install.md word for word (Debian's Exim configured with
``update-exim4.conf``, split configuration, AUTH on loopback, a fake remote MX as smarthost),
then a compromised account sprays harvested addresses and everything an admin would check is
checked: the block, the frozen queue, the refused recipients, the abuse notice delivered under
the hardened unit, ``spamguardctl`` without flags, postmaster still reachable, local
submissions keyed by Unix user, the fallback with the daemon stopped (and with a block file
Exim cannot read), reload, restart, a package upgrade, remove and purge.

A failure says which step failed and shows the daemon's journal and Exim's logs.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploylab import LabError, SystemdLab, booted_lab

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist"
LAB_FILES = Path(__file__).resolve().parent / "lab"
MX_PORT = 2525
#: The lab's Exim, configured the Debian way: split files, a smarthost (the fake MX on
#: 127.0.0.2: an address Exim does not take for itself), listening on 127.0.0.1.
EXIM_SETTINGS = f"""\
dc_eximconfig_configtype='smarthost'
dc_other_hostnames='lab.test'
dc_local_interfaces='127.0.0.1'
dc_readhost=''
dc_relay_domains=''
dc_minimaldns='false'
dc_relay_nets=''
dc_smarthost='127.0.0.2::{MX_PORT}'
CFILEMODE='644'
dc_use_split_config='true'
dc_hide_mailname=''
dc_mailname_in_oh='true'
dc_localdelivery='mail_spool'
"""
#: AUTH PLAIN on loopback without TLS: the lab's users all have the password "secret".
LAB_AUTH = """\
lab_plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if eq{$auth3}{secret}}
  server_set_id = $auth2
"""


#: Commands the docs give an admin for every day, run as written on the installed system.
EVERYDAY = (
    "spamguardctl list",
    "spamguardctl --json list",
    "spamguardctl stats",
    "spamguardctl metrics",
    "spamguardctl reload",
    "spamguardctl block auth:dave@lab.test --reason phished",
    "spamguardctl unblock auth:dave@lab.test",
    "spamguardctl reset auth:alice",
    "spamguardctl --help",
    "spamguardctl replay --help",
    "spamguardd --config /etc/spamguardd/spamguardd.toml --check-config",
    "systemctl reload spamguardd",
    "systemctl status spamguardd",
    "exiqgrep -z -i",
    "exim -bp",
    "man -w spamguardd spamguardctl",
)


def shell_blocks(page: Path) -> list[str]:
    """The ```sh blocks of a documentation page, in order: the commands an admin copies."""
    return re.findall(r"^```sh\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


INSTALL = shell_blocks(REPO / "docs" / "install.md")
#: docs/fleet.md: the store on the relay's own host, over Debian's redis Unix socket.
(FLEET_UNIX,) = [
    block for block in shell_blocks(REPO / "docs" / "fleet.md") if "unixsocketperm" in block
]
#: docs/fleet.md: the relay's password file, checked as the daemon's user, and the restart.
(FLEET_PASSWORD,) = [
    block for block in shell_blocks(REPO / "docs" / "fleet.md") if "store-password" in block
]
#: docs/operations.md: starting everything again after an exit 78.
(RECOVER,) = [
    block for block in shell_blocks(REPO / "docs" / "operations.md") if "reset-failed" in block
]


def package() -> Path:
    """The .deb ``make deb`` wrote; ``make test`` builds it first."""
    debs = sorted(DIST.glob("spamguardd_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise AssertionError("no dist/spamguardd_*.deb: run `make deb` (make test does)")
    return debs[-1]


def upgraded_package(deb: Path, workdir: Path) -> Path:
    """*deb* with a higher version, as the next release would be (same content)."""
    tree = workdir / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.*)$", text, re.MULTILINE)
    assert version is not None
    control.write_text(text.replace(version.group(0), f"Version: {version.group(1)}+lab1"))
    out = workdir / "spamguardd_upgrade.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(tree), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


class Story:
    """The lab and the steps of the admin's story, with diagnostics on failure."""

    def __init__(self, lab: SystemdLab) -> None:
        self.lab = lab
        self.timings: dict[str, float] = {}

    def sh(self, script: str, **kwargs: Any) -> str:
        return self.lab.sh(script, **kwargs).stdout

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``spamguardctl`` exactly as an admin types it: no flags."""
        return self.lab.run(["spamguardctl", *args], check=check)

    def send(self, *recipients: str, user: str | None = None, sender: str = "") -> dict[str, Any]:
        argv = ["python3", "/root/lab/client.py"]
        if user is not None:
            argv += ["--user", user]
        name = user or "relay"
        argv += [sender or (name if "@" in name else f"{name}@lab.test"), *recipients]
        result: dict[str, Any] = json.loads(self.lab.run(argv).stdout)
        return result

    def frozen(self) -> list[str]:
        return self.lab.run(["exiqgrep", "-z", "-i"]).stdout.split()

    def mainlog(self) -> str:
        return self.lab.path("/var/log/exim4/mainlog").read_text(errors="replace")

    def mailbox(self, name: str) -> str:
        path = self.lab.path(f"/var/mail/{name}")
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, what: str, probe: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)

    def diagnostics(self) -> str:
        parts = [
            "--- journalctl -u spamguardd",
            self.lab.journal("spamguardd.service"),
            "--- journalctl -u exim4 -u spamguardd-submit@*",
            self.lab.journal("exim4.service", 20),
            self.lab.run(
                ["journalctl", "-u", "spamguardd-submit@*", "-n", "20", "--no-pager"],
                check=False,
            ).stdout,
        ]
        for log in ("mainlog", "paniclog", "rejectlog"):
            path = self.lab.path(f"/var/log/exim4/{log}")
            if path.exists():
                parts += [f"--- /var/log/exim4/{log} (last 40 lines)"]
                parts += path.read_text(errors="replace").splitlines()[-40:]
        return "\n".join(parts)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step of the story; on failure, say which and show the logs."""
        start = time.monotonic()
        try:
            yield
        except (AssertionError, LabError, subprocess.TimeoutExpired) as exc:
            raise AssertionError(
                f"deployment lab, step {name!r} failed: {exc}\n\n{self.diagnostics()}"
            ) from exc
        self.timings[name] = time.monotonic() - start


@pytest.fixture(name="story", scope="module")
def _story() -> Iterator[Story]:
    with booted_lab() as lab:
        yield Story(lab)


def test_admin_story(story: Story, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: PLR0915 - one story, told in order
    """Install, configure as the docs say, spray, and check everything an admin would."""
    lab = story.lab
    deb = package()

    with story.step("prepare the throwaway root"):
        # this machine image forbids service starts from maintainer scripts (policy-rc.d exits
        # 101, as in container images); a real Debian has no such file
        lab.run(["rm", "-f", "/usr/sbin/policy-rc.d"])
        shutil.copytree(LAB_FILES, lab.path("/root/lab"))
        shutil.copy(deb, lab.path("/root/"))
        lab.path("/etc/mailname").write_text("lab.test\n")
        lab.path("/etc/exim4/update-exim4.conf.conf").write_text(EXIM_SETTINGS)
        lab.path("/etc/exim4/conf.d/auth/05_lab_plain").write_text(LAB_AUTH)
        lab.run(["update-exim4.conf"])
        lab.run(["systemctl", "restart", "exim4"])
        lab.run(
            [
                "systemd-run",
                "--unit=fakemx",
                "python3",
                "/root/lab/fakemx.py",
                str(MX_PORT),
                "/root/fakemx.log",
            ]
        )

    # docs/install.md, word for word: every block is run here except building the package
    # (make test did that on the machine) and the unsplit variant of step 3 (this lab's Exim
    # uses the split configuration; tests/test_exim.py::TestDebian covers the unsplit one)
    build, install, check, unsplit, split, start, probe, notices, enforce, remove = INSTALL
    assert build.startswith("make deb")
    assert "exim4.conf.localmacros" in unsplit
    assert "conf.d/main/000_localmacros" in split

    with story.step("install the package (docs/install.md step 2)"):
        lab.path("/root/dist").mkdir()
        shutil.copy(deb, lab.path("/root/dist/"))
        started = time.monotonic()
        lab.sh(f"cd /root\n{install}", timeout=300)
        story.timings["apt-get install"] = time.monotonic() - started
        assert "spamguardd" in lab.run(["id", "spamguardd"]).stdout
        # fleet mode's client and script are in the package's own environment (docs/fleet.md)
        fleet = "import spamguardd.daemon.cluster as c; print(len(c.SCRIPT) > 0)"
        assert lab.run(["/opt/venvs/spamguardd/bin/python", "-c", fleet]).stdout == "True\n"
        assert "configuration is valid" in story.sh(check)

    with story.step("point Exim at the ACL (docs/install.md step 3, split)"):
        story.sh(split)
        rcpt_acl = lab.run(["exim", "-bP", "acl_smtp_rcpt"]).stdout.strip()
        assert rcpt_acl == "acl_smtp_rcpt = /etc/exim4/acl_spamguardd_rcpt"
        not_smtp_acl = lab.run(["exim", "-bP", "acl_not_smtp"]).stdout.strip()
        assert not_smtp_acl == "acl_not_smtp = /etc/exim4/acl_spamguardd_not_smtp"
        # the split drop-ins put the delivery-time event into Debian's smarthost transport
        event = lab.run(["exim", "-bP", "transport", "remote_smtp_smarthost"]).stdout
        assert "event_action = ${if and{{def:acl_m_sg_out}" in event

    with story.step("start and verify (docs/install.md step 4)"):
        output = story.sh(start)
        assert "mode:           monitor" in output
        assert output.rstrip().endswith("pong")
        assert "550 Unrouteable address" in story.sh(probe)
        show = story.ctl("show", "auth:alice").stdout
        assert re.search(r"^100/1h\s+1\s", show, re.MULTILINE), show

    with story.step("notices and enforce (docs/install.md steps 5 and 6)"):
        # the admin's edits of /etc/spamguardd/spamguardd.toml (a lower limit for the lab)
        lab.sh(
            "sed -i -e 's/^to = \\[\\]/to = [\"abuse@lab.test\"]/' "
            '-e \'s|^failed_recipients = .*|failed_recipients = ["5/1h", "300/1d"]|\' '
            "/etc/spamguardd/spamguardd.toml"
        )
        story.sh(notices)
        lab.sh('sed -i \'s/^mode = "monitor"/mode = "enforce"/\' /etc/spamguardd/spamguardd.toml')
        story.sh(enforce)
        assert "mode:           enforce" in story.ctl("stats").stdout

    with story.step("a compromised account sprays harvested addresses"):
        bad = [f"bad{i}@remote.test" for i in range(1, 7)]
        sent = story.send("friend@remote.test", *bad, user="Mallory@Lab.test")
        refused = {r: code for r, (code, _) in sent["replies"].items() if code >= 500}
        assert sorted(refused) == sorted(bad), sent
        assert all(code == 550 for code in refused.values())
        assert sent["message_id"] in story.wait("the message to be frozen", story.frozen)
        listing = story.ctl("list").stdout
        assert "auth:mallory@lab.test" in listing
        assert "5 failed recipients within 1h" in listing
        assert re.search(r"\*\*\* frozen \*\*\*", lab.run(["exim", "-bp"]).stdout)

    with story.step("the abuse notice reaches the abuse mailbox under the hardened unit"):
        # abuse -> root -> mail (Debian's aliases and its mail4root router)
        notice = story.wait(
            "the abuse notice", lambda: "blocked auth:mallory@lab.test" in story.mailbox("mail")
        )
        assert notice
        mailbox = story.mailbox("mail")
        assert "spamguardctl unblock auth:mallory@lab.test --release" in mailbox
        # handed over by spamguardd-submit@.service: a local SMTP submission of uid spamguardd
        submitted = re.search(
            r"(\S+) <= spamguardd@\S+ U=spamguardd P=local-esmtp", story.mainlog()
        )
        assert submitted
        # delivered by Exim's own child process, which the end of the unit does not cut off:
        # the notice leaves the queue now, not at the next queue run
        story.wait(
            "the notice's delivery to complete",
            lambda: f"{submitted.group(1)} Completed" in story.mainlog(),
        )

    with story.step("show takes the key as typed, folded the ACL's way"):
        shown = story.ctl("show", "auth:MALLORY@lab.TEST")
        assert "status:   blocked since" in shown.stdout
        assert "is written auth:mallory@lab.test by the ACL" in shown.stderr

    with story.step("a blocked user still reaches postmaster"):
        before = story.mailbox("mail").count("\nFrom ")
        sent = story.send("postmaster@lab.test", user="Mallory@Lab.test")
        assert sent["replies"]["postmaster@lab.test"][0] == 250
        story.wait(
            "the message to postmaster", lambda: story.mailbox("mail").count("\nFrom ") > before
        )
        assert sent["message_id"] not in story.frozen()

    with story.step("local submissions are keyed by Unix user"):
        dialogue = "EHLO localhost\r\nMAIL FROM:<www-data@lab.test>\r\n" + "".join(
            f"RCPT TO:<nosuch{i}@lab.test>\r\n" for i in range(5)
        )
        lab.run(["sendmail", "-bs"], input=dialogue + "QUIT\r\n", user="www-data", check=False)
        assert "uid:www-data" in story.ctl("list").stdout
        root = story.ctl("show", "uid:root").stdout
        assert "not blocked" in root

    with story.step("a web script piping harvested addresses to sendmail -t is frozen"):
        lab.run(["useradd", "--system", "--no-create-home", "site1"])
        lab.run(["useradd", "--system", "--no-create-home", "site2"])
        harvested = "".join(f"To: bad{i}@remote.test\n" for i in range(1, 6))
        script = f"Subject: cheap pills\n{harvested}\nbuy now\n"
        lab.run(["sendmail", "-t"], input=script, user="site1")
        story.wait(
            "the refused deliveries to block uid:site1",
            lambda: "uid:site1" in story.ctl("list").stdout,
        )
        lab.run(["sendmail", "-t"], input="To: friend4@remote.test\n\nhello\n", user="site1")

        def frozen_of_site1() -> list[str]:
            return [
                message_id
                for message_id in story.frozen()
                if "X-Spamguard-User: uid:site1" in lab.run(["exim", "-Mvh", message_id]).stdout
            ]

        assert story.wait("site1's next message to be frozen", frozen_of_site1)
        lab.run(["sendmail", "-t"], input="To: friend5@remote.test\n\nhello\n", user="site2")
        delivered = lab.path("/root/fakemx.log")
        story.wait(
            "site2's message to be delivered",
            lambda: delivered.exists() and "friend5@remote.test" in delivered.read_text(),
        )
        assert "uid:site2" not in story.ctl("list").stdout
        # the site's admin deletes the spam that was held back, and lifts the block
        removed = story.ctl("unblock", "uid:site1", "--remove").stdout
        assert "removed" in removed, removed
        assert frozen_of_site1() == []

    with story.step("reload and restart keep blocks and counters"):
        story.send("bad7@remote.test", "bad8@remote.test", user="bob")
        counted = re.compile(r"^5/1h\s+2\s", re.MULTILINE)
        assert counted.search(story.ctl("show", "auth:bob").stdout)
        lab.run(["systemctl", "reload", "spamguardd"])
        assert counted.search(story.ctl("show", "auth:bob").stdout)
        lab.run(["systemctl", "restart", "spamguardd"])
        assert counted.search(story.ctl("show", "auth:bob").stdout)
        assert "auth:mallory@lab.test" in story.ctl("list").stdout

    with story.step("the fallback with the daemon stopped"):
        # the sockets would start it again at the first query: stop completely, as
        # docs/operations.md says, so Exim must do without it
        lab.run(["systemctl", "stop", "spamguardd", "spamguardd.socket", "spamguardd-admin.socket"])
        sent = story.send("friend2@remote.test", user="Mallory@Lab.test")
        assert sent["message_id"] in story.wait("the message to be frozen", story.frozen)
        assert "using the block file for this connection" in story.mainlog()

    with story.step("the fallback with a block file Exim cannot read"):
        lab.run(["chgrp", "root", "/var/lib/spamguardd/blocked"])
        sent = story.send("friend3@remote.test", user="alice")
        assert sent["replies"]["friend3@remote.test"][0] == 250, sent
        assert "Exim cannot read /var/lib/spamguardd/blocked" in story.mainlog()
        lab.run(["systemctl", "start", "spamguardd.socket", "spamguardd-admin.socket"])
        lab.run(["systemctl", "start", "spamguardd"])
        assert "state_access_repaired" in lab.journal("spamguardd.service")
        group = lab.run(["stat", "-c", "%G", "/var/lib/spamguardd/blocked"]).stdout.strip()
        assert group == "Debian-exim"

    with story.step("a configuration error: exit 78, the sockets give up, mail goes on"):
        config = lab.path("/etc/spamguardd/spamguardd.toml")
        good = config.read_text()
        config.write_text(good + "\nthis is not TOML\n")
        lab.run(["systemctl", "restart", "spamguardd"], check=False)
        started = time.monotonic()
        sent = story.send("friend6@remote.test", user="Mallory@Lab.test")
        story.timings["a query to a daemon that exits 78"] = time.monotonic() - started
        assert sent["message_id"] in story.wait("the message to be frozen", story.frozen)
        for unit in ("spamguardd.socket", "spamguardd-admin.socket"):
            state = lab.run(["systemctl", "is-failed", unit], check=False).stdout.strip()
            assert state == "failed", (unit, state)
        assert not lab.path("/run/spamguardd/query.sock").exists()
        # without the daemon and its socket file, Exim does not wait: the block file decides
        started = time.monotonic()
        sent = story.send("friend7@remote.test", user="alice")
        story.timings["a message with the sockets failed"] = time.monotonic() - started
        assert sent["replies"]["friend7@remote.test"][0] == 250, sent
        config.write_text(good)
        story.sh(RECOVER)
        assert "mode:           enforce" in story.ctl("stats").stdout
        assert lab.path("/run/spamguardd/query.sock").exists()

    with story.step("the everyday commands of docs/admin.md, operations.md and exim.md"):
        for command in EVERYDAY:
            story.sh(command)
        headers = story.sh("exim -Mvh $(exiqgrep -z -i | head -1) | grep X-Spamguard-User")
        assert "X-Spamguard-User: auth:mallory@lab.test" in headers
        blocked = story.sh(
            "journalctl -u spamguardd -o cat "
            "| jq -rR 'fromjson? | select(.event == \"user_blocked\") | .user'"
        )
        assert "auth:mallory@lab.test" in blocked.split()

    with story.step("unblock --release thaws the frozen mail"):
        frozen_before = story.frozen()
        released = story.ctl("unblock", "auth:mallory@lab.test", "--release").stdout
        assert "unblocked auth:mallory@lab.test" in released
        assert "released" in released
        story.wait("the queue to thaw", lambda: not set(frozen_before) & set(story.frozen()))

    with story.step("a package upgrade keeps blocks and counters"):
        story.ctl("block", "auth:carol@lab.test", "--reason", "phished")
        workdir = tmp_path_factory.mktemp("upgrade")
        newer = upgraded_package(deb, workdir)
        shutil.copy(newer, lab.path("/root/"))
        lab.run(["apt-get", "install", "-y", f"/root/{newer.name}"], timeout=300)
        version = lab.run(["dpkg-query", "-W", "-f=${Version}", "spamguardd"]).stdout
        assert version.endswith("+lab1")
        listing = story.ctl("list").stdout
        assert "auth:carol@lab.test" in listing
        assert re.search(r"^5/1h\s+2\s", story.ctl("show", "auth:bob").stdout, re.MULTILINE)

    with story.step("fleet mode with the store on this host (docs/fleet.md)"):
        # this lab's systemd runs without user namespaces, which the redis unit's PrivateUsers=
        # needs; a real Debian has them
        dropin = lab.path("/etc/systemd/system/redis-server.service.d/lab.conf")
        dropin.parent.mkdir(parents=True)
        dropin.write_text("[Service]\nPrivateUsers=no\n")
        lab.run(["systemctl", "daemon-reload"])
        # the admin's edits the block's comments ask for
        socket_lines = [line.strip("# ") for line in FLEET_UNIX.splitlines()[1:3]]
        assert socket_lines[0].startswith("unixsocket /run/redis/"), socket_lines
        password = secrets.token_hex(16)
        with lab.path("/etc/redis/redis.conf").open("a") as conf:
            conf.write("\n".join(socket_lines) + f"\nrequirepass {password}\n")
        with lab.path("/etc/spamguardd/spamguardd.toml").open("a") as conf:
            conf.write(
                '\n[cluster]\nurl = "unix:///run/redis/redis-server.sock"\nname = "lab"\n'
                'password_file = "/etc/spamguardd/store-password"\n'
            )
        # the password file as the page makes it; what its editor line asks for is typed in
        (editor,) = [line for line in FLEET_PASSWORD.splitlines() if line.startswith("editor ")]
        typed = f"printf '%s\\n' {password} > /etc/spamguardd/store-password"
        output = story.sh(FLEET_PASSWORD.replace(editor, typed))
        assert "configuration is valid" in output, output
        mode = lab.run(["stat", "-c", "%a %U:%G", "/etc/spamguardd/store-password"]).stdout
        assert mode.strip() == "640 root:spamguardd", mode
        story.sh(FLEET_UNIX)
        fleet = story.wait(
            "the relay to count in the store",
            lambda: "store unix:///run/redis/redis-server.sock: up" in story.ctl("stats").stdout,
        )
        assert fleet
        sent = story.send(*[f"bad-fleet{i}@remote.test" for i in range(6)], user="eve")
        assert sorted(code for code, _ in sent["replies"].values()) == [550] * 6, sent
        assert "counted:  fleet-wide" in story.ctl("show", "auth:eve").stdout
        stored = lab.run(
            [
                "redis-cli",
                "-s",
                "/run/redis/redis-server.sock",
                "--no-auth-warning",
                "-a",
                password,
                "HKEYS",
                "spamguardd:blocks",
            ]
        ).stdout.split()
        assert "auth:eve" in stored, stored

    with story.step("remove keeps the state, purge deletes it, Exim keeps working"):
        assert "apt-get remove spamguardd" in remove
        story.sh(remove.replace("apt-get remove", "apt-get remove -y"), timeout=300)
        assert lab.path("/var/lib/spamguardd/blocked").exists()
        assert not lab.path("/run/spamguardd/query.sock").exists()
        # the drop-ins are kept until a purge, and include what the remove took away
        assert lab.path("/etc/exim4/conf.d/main/00_spamguardd_macros").exists()
        lab.run(["update-exim4.conf"])
        lab.run(["systemctl", "restart", "exim4"])
        assert "Exim version" in lab.run(["exim", "-bV"]).stdout
        lab.run(["apt-get", "purge", "-y", "spamguardd"], timeout=300)
        assert not lab.path("/var/lib/spamguardd").exists()
        assert not lab.path("/etc/spamguardd/spamguardd.toml").exists()
        lab.run(["update-exim4.conf"])
        lab.run(["systemctl", "restart", "exim4"])

    print("deployment lab timings (s):", json.dumps(story.timings, indent=1))  # noqa: T201
