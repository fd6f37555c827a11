"""Listening sockets: adopted from systemd, or bound here without a moment of absence.

A refused connect poisons the Exim process that saw it (a stale-descriptor bug in Exim's Unix
socket readsocket, docs/exim-facts.md §1.4), so a socket path must never be missing while a
daemon is meant to be there: systemd's socket units hold the socket across restarts, and a
socket bound here replaces a stale one by rename, never by unlink-then-bind.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path


def adopt_or_bind(  # noqa: PLR0913 - which socket, where, and its three properties
    inherited: MutableMapping[str, socket.socket],
    name: str,
    path: Path,
    *,
    mode: int,
    group: str | None,
    backlog: int,
) -> socket.socket:
    """The socket systemd passed in as *name* (taken out of *inherited*), else one bound at *path*.

    Raises:
        OSError: the path cannot be bound (see :func:`bind_unix_listener`).
        LookupError: the group does not exist.
    """
    sock = inherited.pop(name, None)
    if sock is not None:
        return sock
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return bind_unix_listener(path, mode=mode, group=group, backlog=backlog)
    except OSError as exc:
        # "[Errno 13] Permission denied" alone names nothing (a relative path resolved under
        # / when started by hand): say which socket, where, and what was being done
        raise OSError(
            exc.errno, f"cannot create the {name} socket {path.absolute()}: {exc.strerror or exc}"
        ) from exc


def bind_unix_listener(path: Path, *, mode: int, group: str | None, backlog: int) -> socket.socket:
    """Create a listening Unix socket at *path* with the given permissions.

    The socket is bound under a temporary name, given its mode and group, put into listening
    state and only then renamed onto *path*, so no client ever sees it half set up and there is
    no moment without a socket at *path* when one was there before. An existing *path* is replaced
    only if it is a socket nobody listens on. (All of this is local and instant: it runs at
    start-up, before or outside the event loop.)

    Raises:
        OSError: the path is something else, another process listens on it, or binding failed.
        LookupError: the group does not exist.
    """
    _check_replaceable(path)
    gid = None if group is None else _group_id(group)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    _unlink_if_present(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fsencode(tmp))
        tmp.chmod(mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(backlog)
        tmp.replace(path)
    except BaseException:
        sock.close()
        _unlink_if_present(tmp)
        raise
    return sock


def socket_file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the socket file at *path* (None if there is none)."""
    try:
        found = path.lstat()
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISSOCK(found.st_mode) else None


def remove_socket_file(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove the socket file this daemon bound at *path*, when it stops serving.

    A file left behind would refuse Exim's connects, and after a refused connect to a Unix
    socket Exim 4.96 closes a stale descriptor (docs/exim.md); with the file gone, the shipped
    ACL does not ask and uses the block file. Only the very file bound here is removed (same
    device and inode): a successor's socket renamed into place is left alone.
    """
    if identity is not None and socket_file_identity(path) == identity:
        _unlink_if_present(path)


def bind_inet_listener(host: str, port: int, *, backlog: int) -> socket.socket:
    """Create a listening TCP socket on *host*:*port* (a loopback address, checked by config).

    Exim's readsocket to an ``inet:`` spec resets its descriptor after a failed connect, so
    this listener is immune to the stale-descriptor bug of Unix-socket readsocket
    (docs/exim-facts.md §1.4).

    Raises:
        OSError: the address cannot be bound (in use, not local, ...).
    """
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_if_present(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"socket group {group!r} does not exist") from None


def _check_replaceable(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(
            errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsencode(path))
        except OSError:
            return  # nothing listens: a stale socket from an earlier run, safe to replace
    raise FileExistsError(errno.EADDRINUSE, f"another process is listening on {path}")
