"""The journal: an append-only history of blocks, unblocks, resets and reloads, as JSON lines.

``<state dir>/journal`` answers "what happened to this user, when, and who did it" for
``spamguardctl show``. One object per line::

    {"actor":"auto","at":"2026-11-28T01:02:03Z","event":"block","reason":"...","user":"auth:m"}

The block file stays the authority on who is blocked; the journal is history. A crash in the
middle of a write leaves a truncated last line: the reader skips it and reports it, and the next
append starts on a fresh line, so one torn write never damages the entries after it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from spamguardd.core.errors import StoreError
from spamguardd.core.policy import Blocked, Effect, Reset, Unblocked, Warned, WouldBlock
from spamguardd.core.timestamps import format_time

FILENAME: Final = "journal"


@attrs.frozen
class JournalContents:
    """What :func:`read_journal` found."""

    entries: list[dict[str, Any]]
    #: Line number of a truncated last line (a write cut short), if any.
    truncated_line: int | None = None
    #: Line numbers of complete lines that are not JSON objects (skipped).
    damaged_lines: tuple[int, ...] = ()


def entry_for(effect: Effect) -> dict[str, Any] | None:
    """The journal entry for a policy effect; None for one the journal does not keep."""
    if isinstance(effect, Blocked):
        block = effect.block
        entry: dict[str, Any] = {
            "at": format_time(block.blocked_at),
            "event": "block",
            "user": block.user,
            "actor": block.by,
            "reason": block.reason,
        }
        if effect.rate is not None:
            entry["limit"] = str(effect.rate)
        if block.expires_at is not None:
            entry["until"] = format_time(block.expires_at)
        if block.nth:
            entry["nth"] = block.nth
        return entry
    if isinstance(effect, Unblocked):
        return {
            "at": format_time(effect.at),
            "event": "unblock",
            "user": effect.block.user,
            "actor": effect.by,
        }
    if isinstance(effect, Reset):
        return {
            "at": format_time(effect.at),
            "event": "reset",
            "user": effect.user,
            "actor": effect.by,
        }
    if isinstance(effect, WouldBlock | Warned):
        return None  # logged and mailed; the history is of what was done
    raise TypeError(f"not an effect: {effect!r}")  # pragma: no cover - exhaustive above


def encode_entry(entry: Mapping[str, Any]) -> bytes:
    """One journal line: compact, sorted, ASCII-only JSON (non-UTF-8 keys survive as escapes)."""
    text = json.dumps(entry, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"


class Journal:
    """Appends entries to one journal file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked_tail = False

    def append(self, entry: Mapping[str, Any], *, durable: bool = False) -> None:
        """Append *entry* as one line; with *durable*, fsync before returning.

        Raises:
            StoreError: the file cannot be opened or written.
        """
        self.append_many([entry], durable=durable)

    def append_many(self, entries: Sequence[Mapping[str, Any]], *, durable: bool = False) -> None:
        """Append *entries*, one line each, in one write; with *durable*, fsync after it.

        Raises:
            StoreError: the file cannot be opened or written.
        """
        data = b"".join(map(encode_entry, entries))
        try:
            fd = os.open(
                self.path,
                os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
            )
            try:
                prefix = b"" if self._checked_tail else _separator_after_torn_tail(fd)
                os.write(fd, prefix + data)
                self._checked_tail = True
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{self.path}: cannot append: is a symbolic link") from exc
            raise StoreError(f"{self.path}: cannot append: {exc.strerror or exc}") from exc


def _separator_after_torn_tail(fd: int) -> bytes:
    """A newline when the file ends in a torn line (so the next entry starts a line of its own)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    return b"" if os.pread(fd, 1, size - 1) == b"\n" else b"\n"


def read_journal(path: Path, *, user: str | None = None) -> JournalContents:
    """Read the journal (only *user*'s entries, when given); a missing file is empty.

    Raises:
        StoreError: the file exists but cannot be read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JournalContents([])
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror}") from exc
    entries: list[dict[str, Any]] = []
    damaged: list[int] = []
    truncated: int | None = None
    for number, line, complete in _lines(data):
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            entry = None
        if not isinstance(entry, dict):
            if complete:
                damaged.append(number)
            else:
                truncated = number
            continue
        if user is None or entry.get("user") == user:
            entries.append(entry)
    return JournalContents(entries, truncated, tuple(damaged))


def _lines(data: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """Non-blank lines with their numbers, and whether each ended in a newline."""
    pieces = data.split(b"\n")
    last = len(pieces) - 1
    for index, piece in enumerate(pieces):
        if piece.strip():
            yield index + 1, piece, index < last
