"""The state directory's lock: one daemon per state directory, for the life of the process.

Two daemons writing one block file would each keep their own view of it and lose each other's
blocks, so a daemon takes an exclusive ``flock`` on ``STATE_DIR/lock`` before it reads anything
and holds it until it exits (the kernel releases it however the process ends, even on SIGKILL,
so a stale lock file never stops a start). The holder's pid is written into the file, so that
the one refused can say who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from spamguardd.core.errors import StateLockedError, StoreError

FILENAME: Final = "lock"


class StateLock:
    """An exclusive lock on one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting and write our pid into the file.

        Raises:
            StateLockedError: another process holds it (the message names its pid).
            StoreError: the lock file cannot be created or written (read-only file system,
                permissions, a symbolic link in its place): the state directory is unusable.
        """
        if self._fd is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(
                    f"{self.path}: is a symbolic link; the lock file must be a regular file"
                ) from exc
            raise StoreError(
                f"{self.path.parent}: the state directory cannot be written "
                f"(creating {self.path.name}: {exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            raise StateLockedError(
                f"{self.path.parent}: in use by another spamguardd ({who} holds {self.path}); "
                "two daemons on one state directory would lose each other's blocks"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{self.path}: cannot lock: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"{self.path.parent}: the state directory cannot be written "
                f"(writing {self.path.name}: {exc.strerror})"
            ) from exc
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race with the next holder)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def symbolic_links(state_dir: Path, names: Iterable[str]) -> list[str]:
    """A problem for each of *names* in *state_dir* that is a symbolic link (dangling or not).

    The daemon appends to its files and replaces them by rename; through a link it would write
    wherever the link points, with its own rights. A state directory holds no links of its own
    making, so one is refused at the start rather than followed.
    """
    return [
        f"{state_dir / name}: is a symbolic link (to {(state_dir / name).readlink()}); it must "
        "be a regular file or directory of the state directory"
        for name in names
        if (state_dir / name).is_symlink()
    ]


def holder(state_dir: Path) -> int | None:
    """The pid of the process that holds *state_dir*'s lock, or None when nobody does.

    Reads only, for ``--check-config``: a free lock is tested with a shared lock that is
    dropped at once.
    """
    try:
        fd = os.open(state_dir / FILENAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
