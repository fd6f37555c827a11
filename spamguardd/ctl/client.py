"""The blocking admin client: one command to the daemon's admin socket, one typed reply back.

It drives the same sans-I/O :class:`~spamguardd.core.adminproto.AdminConnection` as the daemon's
trio server, over a plain blocking socket with a timeout: ``spamguardctl`` has one question to
ask and nothing else to do meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Final

from spamguardd.core.adminproto import (
    CLOSED,
    NEED_DATA,
    AdminConnection,
    AdminReplyError,
    Command,
    Reply,
    Role,
)

DEFAULT_TIMEOUT: Final = 30.0


class UnreachableError(Exception):
    """The daemon did not answer; the message names the socket and why."""


class NotPermittedError(Exception):
    """The admin socket's permissions keep this user out; the message says who may use it."""


def request(path: Path, command: Command, *, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send *command* to the admin socket at *path* and return the daemon's reply.

    Raises:
        UnreachableError: no daemon listens there, it did not answer in time, or not in the
            admin protocol.
    """
    connection = AdminConnection(Role.CLIENT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except PermissionError:
            raise NotPermittedError(
                f"uid {os.getuid()} may not use the spamguardd admin socket {path}: run as root, "
                "or as a member of the group admin.socket_group names (docs/admin.md)"
            ) from None
        except OSError as exc:
            raise UnreachableError(
                f"cannot reach spamguardd at {path}: {exc.strerror or exc}"
            ) from None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # a refusal may come before the request is read: the reply still says why
                sock.sendall(connection.send(command))
                sock.shutdown(socket.SHUT_WR)
            while (event := connection.next_event()) is NEED_DATA:
                connection.receive_data(sock.recv(65536))
        except TimeoutError:
            raise UnreachableError(
                f"spamguardd at {path} did not answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise UnreachableError(
                f"lost the connection to spamguardd at {path}: {exc.strerror or exc}"
            ) from None
        except AdminReplyError as exc:
            raise UnreachableError(f"{path} did not answer in the admin protocol: {exc}") from None
    if event is CLOSED:
        raise UnreachableError(f"spamguardd at {path} closed the connection without an answer")
    assert not isinstance(event, Command)  # noqa: S101 - the client's connection reads replies
    return event
