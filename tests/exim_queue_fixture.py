"""A real Exim queue in a scratch directory, for tests that release or remove frozen mail.

Debian's ``exim`` with a minimal ``-C`` configuration: its own spool and logs, nothing delivered
(messages are queued with ``-odq`` and the only router drops them), ``deliver_drop_privilege`` so
that a ``-C`` configuration never needs Exim's trusted list. Run as root, which keeps root with
``-C`` (docs/exim-facts.md §7.5). Exim missing is a failure, never a skip: the suite exists to
drive it.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import attrs
import pytest

#: Debian's Exim user, which owns the spool and the logs.
EXIM_USER = "Debian-exim"
_ID = re.compile(r"\s(\w{6}-\w{6,11}-\w{2,4})\s+<")

#: The ACL plays the shipped one's part in what release relies on: for a message with
#: ``X-Test-Key: KEY`` it stores the key in acl_m_sg_user, and with ``X-Test-Freeze`` it
#: freezes the message as the shipped ACL does (acl_m_sg_frozen, the header for people).
CONFIG = """\
primary_hostname = test.example
spool_directory = {root}/spool
log_file_path = {root}/log/%slog
deliver_drop_privilege = true
keep_environment =
acl_not_smtp = acl_spamguardd
begin acl
acl_spamguardd:
  warn  condition  = ${{if def:h_X-Test-Key:}}
        set acl_m_sg_user = $h_X-Test-Key:
  warn  condition  = ${{if def:h_X-Test-Freeze:}}
        set acl_m_sg_frozen = 1
        control    = freeze/no_tell
        add_header = X-Spamguard-User: $acl_m_sg_user
  accept
begin routers
drop:
  driver = redirect
  data = :blackhole:
"""


def exim_binary() -> str:
    """The exim binary, or a test failure saying how to get it."""
    found = shutil.which("exim") or shutil.which("exim", path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail("exim is not installed: `make test` installs exim4-daemon-light")
    return found


@attrs.define
class EximQueue:
    """A scratch Exim instance: its configuration and how to fill and read its queue."""

    root: Path
    config: Path
    exim: str

    @property
    def command(self) -> str:
        """The ``--exim-command`` that addresses this instance."""
        return shlex.join([self.exim, "-C", str(self.config)])

    def _run(self, *args: str, stdin: bytes | None = None) -> str:
        result = subprocess.run(
            [self.exim, "-C", str(self.config), *args],
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout.decode()

    def queue(self) -> dict[str, bool]:
        """Message id -> frozen, for every message in the queue."""
        listing = self._run("-bp")
        return {
            match.group(1): "*** frozen ***" in line
            for line in listing.splitlines()
            if (match := _ID.search(line))
        }

    def submit(
        self, sender: str, user: str | None, *, frozen: bool = True, headers: str = ""
    ) -> str:
        """Queue one message of *user*, frozen as the shipped ACL freezes a blocked user's
        (without a user: frozen by hand, as for any other reason). *headers* are added to the
        message as its writer would (e.g. a forged ``X-Spamguard-User``)."""
        before = set(self.queue())
        key = "" if user is None else f"X-Test-Key: {user}\n"
        freeze = "X-Test-Freeze: 1\n" if frozen and user is not None else ""
        message = f"From: {sender}\nSubject: test\n{key}{freeze}{headers}\nbody\n".encode()
        self._run("-odq", "-f", sender, "victim@example.org", stdin=message)
        (message_id,) = set(self.queue()) - before
        if frozen and user is None:
            self._run("-Mf", message_id)
        return message_id


def make_exim_queue(root: Path) -> EximQueue:
    """Create a scratch Exim instance in *root*, a new directory.

    Exim drops to its own user to write the spool and the logs, so *root* is made 0755 and its
    parent must let that user through.
    """
    exim = exim_binary()
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    uid, gid = pwd.getpwnam(EXIM_USER).pw_uid, grp.getgrnam(EXIM_USER).gr_gid
    for name in ("spool", "log"):
        (root / name).mkdir(parents=True)
        os.chown(root / name, uid, gid)
    config = root / "exim.conf"
    config.write_text(CONFIG.format(root=root))
    return EximQueue(root, config, exim)
