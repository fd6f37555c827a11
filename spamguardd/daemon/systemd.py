"""systemd integration without libsystemd: inherited sockets and sd_notify.

Socket activation is how spamguardd is meant to run: systemd owns the query socket, so it
exists before the daemon starts and survives its restarts, and Exim's connect() never fails
(a failed connect poisons the Exim process, docs/exim-facts.md §1.4). Both protocols are tiny
and stable (``sd_listen_fds(3)``, ``sd_notify(3)``), so they are implemented here rather than
pulling in a C binding.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

import structlog

log = structlog.get_logger("spamguardd.daemon.systemd")

#: The first inherited descriptor (sd_listen_fds(3): SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3
_LISTEN_VARS: Final = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def listen_fds(
    environ: MutableMapping[str, str], *, pid: int | None = None, start: int = LISTEN_FDS_START
) -> dict[str, socket.socket]:
    """The sockets systemd passed to this process, by ``FileDescriptorName=``.

    The variables are removed from *environ* (as ``sd_listen_fds(1)`` does), so a child process
    never mistakes them for its own. Descriptors meant for another process (``LISTEN_PID``
    differs) are ignored. *start* is the first descriptor (only tests change it). An unnamed
    descriptor is called ``unknown``, as systemd does; with two of the same name, the later one
    gets a ``:N`` suffix so none is lost silently.
    """
    values = {name: environ.pop(name, None) for name in _LISTEN_VARS}
    count_text, pid_text, names_text = (
        values["LISTEN_FDS"],
        values["LISTEN_PID"],
        values["LISTEN_FDNAMES"],
    )
    if count_text is None:
        return {}
    own_pid = os.getpid() if pid is None else pid
    if pid_text is not None and pid_text.isdigit() and int(pid_text) != own_pid:
        return {}
    try:
        count = int(count_text)
    except ValueError:
        log.warning("listen_fds_ignored", listen_fds=count_text)
        return {}
    names = names_text.split(":") if names_text else []
    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = start + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            os.set_inheritable(fd, False)  # sd_listen_fds() sets FD_CLOEXEC too
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            # not open, or not a socket: a broken environment, not a reason to die; the socket
            # it should have been is bound from the configuration instead
            log.warning("listen_fd_ignored", fd=fd, name=name, error=os.strerror(exc.errno or 0))
            continue
        key = name if name not in sockets else f"{name}:{index}"
        sockets[key] = sock
    return sockets


class SdNotify:
    """Sends sd_notify state changes to systemd over the ``NOTIFY_SOCKET`` datagram socket.

    Failures are logged and otherwise ignored: a missed notification must never stop the daemon
    from answering Exim.
    """

    def __init__(self, address: str) -> None:
        # "@name" is a socket in the abstract namespace (a leading NUL byte on the wire)
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> SdNotify | None:
        """A notifier when systemd asked for one, else None; removes ``NOTIFY_SOCKET``."""
        address = environ.pop("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")):
            return None
        return cls(address)

    def send(self, *fields: str) -> bool:
        """Send one notification made of ``KEY=VALUE`` *fields*; True when it went out."""
        message = "\n".join(fields).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror or str(exc), message=fields[0])
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up or reload is complete; systemd starts units ordered after this one."""
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        """A reload begins; systemd 253+ needs ``MONOTONIC_USEC`` to match it with READY=1."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def status(self, status: str) -> bool:
        """A free-form line shown by ``systemctl status``."""
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        """The daemon is shutting down."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self, status: str | None = None) -> bool:
        """The event loop is alive (``WatchdogSec=``); *status* refreshes the status line."""
        if status is None:
            return self.send("WATCHDOG=1")
        return self.send("WATCHDOG=1", f"STATUS={status}")

    def close(self) -> None:
        """Release the socket."""
        with contextlib.suppress(OSError):
            self._sock.close()


def watchdog_interval(environ: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled
    advises, or None when systemd watches no process or another one (``WATCHDOG_PID``).
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    own_pid = os.getpid() if pid is None else pid
    if pid_text.isdigit() and int(pid_text) != own_pid:
        return None
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    return int(usec_text) / 2 / 1_000_000
