"""SMTP over a Unix socket: how notices reach the local MTA from inside the hardened unit.

The shipped ``spamguardd.service`` cannot run sendmail (a read-only file system and no new
privileges defeat Exim's setuid spool write), so the package's ``spamguardd-submit.socket``
starts the MTA's ``sendmail -bs`` outside the sandbox for each connection, and the daemon speaks
SMTP to it over this socket. Exim sees a local SMTP submission by the daemon's Unix user.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path


class UnixSocketSMTP(smtplib.SMTP):
    """:class:`smtplib.SMTP` connected to a Unix socket instead of a TCP port.

    ``smtplib.LMTP`` does the same for LMTP; ``sendmail -bs`` speaks SMTP, so this class keeps
    SMTP's EHLO and only replaces how the connection is opened.
    """

    def __init__(self, path: Path, *, local_hostname: str, timeout: float) -> None:
        self._path = path
        super().__init__(local_hostname=local_hostname, timeout=timeout)
        self.connect(str(path))

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:  # noqa: ARG002 - smtplib's signature
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        return sock
