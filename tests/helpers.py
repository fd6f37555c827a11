"""Helpers for tests that talk to a daemon the way Exim does."""

from __future__ import annotations

import socket
from pathlib import Path

import trio

#: A fixed wall-clock origin for tests: 2026-11-28T00:00:00Z.
T0 = 1795824000.0


async def readsocket(path: Path, request: bytes, *, shutdown: bool = True) -> bytes:
    """Ask like Exim's ``${readsocket}``: connect, one write, half-close, read until EOF.

    With ``shutdown=False`` it behaves like readsocket's ``shutdown=no`` option: no half-close,
    so only the request's own newline can tell the daemon that the request is complete.
    """
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(request)
        if shutdown:
            sock.shutdown(trio.socket.SHUT_WR)
        chunks = []
        while chunk := await sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def ask_blocking(path: Path, request: bytes, *, timeout: float = 10.0) -> bytes:
    """One readsocket-style exchange from a plain blocking socket, for a daemon in a process."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)
