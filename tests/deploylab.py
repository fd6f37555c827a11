"""A throwaway Debian with a real systemd as PID 1, to install the package the way an admin does.

The machine's own root file system is the lower layer of an overlay; everything the lab writes
goes to an upper directory under ``/tmp`` and is thrown away. systemd runs as PID 1 of new PID,
mount and network namespaces (``unshare``), chrooted into the overlay, with its own ``/proc``,
the host's ``/sys`` and ``/dev`` bound in, and a private tmpfs on ``/run`` and ``/tmp``: at boot
systemd cleans ``/tmp`` and takes over ``/run``, which on the real root would wipe the host's
files. The network namespace has only its own loopback, so the lab's Exim on port 25 and its fake
MX cannot collide with anything on the host. Commands run inside with ``nsenter``; the lab's
files are reached from outside through ``/proc/PID/root``. ``systemctl poweroff`` ends it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

#: Units of the host image the lab does not need and that may hold up or slow the boot.
MASKED: Final = (
    "postgresql.service",
    "postgresql@.service",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
    "systemd-logind.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "fstrim.timer",
    "logrotate.timer",
    "dpkg-db-backup.timer",
    "remote-fs.target",
    "cron.service",
)

_BOOT: Final = """\
set -e
mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {root}
mount -t proc proc {root}/proc
mount --rbind /sys {root}/sys
mount --rbind /dev {root}/dev
mount -t tmpfs -o mode=0755 tmpfs {root}/run
mount -t tmpfs -o mode=1777 tmpfs {root}/tmp
ip link set lo up
exec chroot {root} /lib/systemd/systemd --system --log-target=kmsg
"""


class LabError(AssertionError):
    """A lab command failed; the message holds what it printed."""


class SystemdLab:
    """One booted throwaway root. Use :func:`booted_lab`."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sglab-", dir="/tmp"))
        self.upper = self.dir / "upper"
        self.work = self.dir / "work"
        self.root = self.dir / "root"
        for path in (self.upper, self.work, self.root):
            path.mkdir()
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.log = self.dir / "boot.log"

    # -- lifetime ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Mask what the lab does not need, in the upper layer, before the boot."""
        system = self.upper / "etc" / "systemd" / "system"
        system.mkdir(parents=True)
        for unit in MASKED:
            (system / unit).symlink_to("/dev/null")
        (system / "default.target").symlink_to("/lib/systemd/system/multi-user.target")
        # a machine id of its own, so journald and systemd do not share the host's
        (self.upper / "etc" / "machine-id").write_text("")

    def boot(self, timeout: float = 120.0) -> None:
        """Boot systemd and wait until it has finished starting up."""
        self.prepare()
        script = _BOOT.format(upper=self.upper, work=self.work, root=self.root)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "unshare",
                    "--fork",
                    "--pid",
                    "--mount",
                    "--net",
                    "--uts",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self._systemd_pid(timeout)
        deadline = time.monotonic() + timeout
        while True:
            state = self.run(
                ["systemctl", "is-system-running"], check=False, timeout=timeout
            ).stdout.strip()
            if state in {"running", "degraded"}:
                return
            if time.monotonic() > deadline:
                failed = self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout
                raise LabError(f"systemd did not finish booting ({state}):\n{failed}")
            time.sleep(0.2)

    def _systemd_pid(self, timeout: float) -> int:
        """The host pid of the lab's PID 1 (the child of unshare that became systemd)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabError(f"the lab did not boot:\n{self.log.read_text(errors='replace')}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
            time.sleep(0.05)
        raise LabError("systemd did not start in the lab")

    def poweroff(self, timeout: float = 60.0) -> None:
        """``systemctl poweroff`` and wait for the namespace to end; then remove the lab."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(LabError, subprocess.TimeoutExpired):
                self.run(["systemctl", "poweroff"], check=False, timeout=30)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- inside ------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,  # noqa: A002 - subprocess's own name
        check: bool = True,
        timeout: float = 120.0,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside the lab (its namespaces and root), as root or *user*."""
        command = list(argv)
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command]
        result = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.pid),
                "-m",
                "-p",
                "-n",
                "-u",
                "-r",
                "-w",
                "env",
                "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8",
                *command,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the lab (the lab's own commands, never user data)."""
        return self.run(["sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """A path of the lab's file system, as seen from the host."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def journal(self, unit: str, lines: int = 80) -> str:
        """The last lines of *unit*'s journal, for failure messages."""
        return self.run(
            ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"],
            check=False,
        ).stdout


@contextlib.contextmanager
def booted_lab() -> Iterator[SystemdLab]:
    """A booted :class:`SystemdLab` that is always powered off and removed."""
    if os.geteuid() != 0:
        raise LabError("the systemd lab needs root (namespaces, mounts, chroot)")
    lab = SystemdLab()
    try:
        lab.boot()
        yield lab
    finally:
        lab.poweroff()
