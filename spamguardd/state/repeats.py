"""The history of automatic blocks that escalation counts: ``<state dir>/repeats``.

One JSON object per line, a user and the wall-clock times of its automatic blocks within
``block.repeat_within``::

    {"at":["2026-11-28T01:02:03Z","2026-12-01T09:00:00Z"],"user":"auth:mallory@example.com"}

It is not the authority on anything (the block file is): a damaged line is reported as
``FILE:LINE: what is wrong`` and skipped, and the rest is loaded. The file is replaced whole
and atomically, like the block file, with only the times still in the span, so it stays as
small as the number of users blocked automatically within it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs

from spamguardd.core.errors import StoreError
from spamguardd.core.timestamps import format_time, parse_time
from spamguardd.state.blockfile import write_atomic

FILENAME: Final = "repeats"


@attrs.frozen
class History:
    """What :meth:`RepeatStore.load` found."""

    entries: list[tuple[str, tuple[float, ...]]]
    #: ``FILE:LINE: what is wrong`` for each line skipped.
    problems: tuple[str, ...] = ()


def encode(history: Mapping[str, Sequence[float]]) -> bytes:
    """The file's bytes: a line per user, sorted by user for stable diffs."""
    lines = []
    for user in sorted(history):
        record = {"user": user, "at": [format_time(at) for at in sorted(history[user])]}
        text = json.dumps(record, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
        lines.append(text.encode("ascii") + b"\n")
    return b"".join(lines)


def decode(data: bytes, *, source: str) -> History:
    """Parse the file's bytes; damaged lines are skipped and named in ``problems``."""
    entries: list[tuple[str, tuple[float, ...]]] = []
    problems: list[str] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entries.append(_decode_line(line))
        except ValueError as exc:
            problems.append(f"{source}:{number}: {exc}")
    return History(entries, tuple(problems))


def _decode_line(line: bytes) -> tuple[str, tuple[float, ...]]:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not a JSON object: {exc}") from None
    user = record.get("user") if isinstance(record, dict) else None
    times = record.get("at") if isinstance(record, dict) else None
    if not isinstance(user, str) or not user:
        raise ValueError('"user" must be a non-empty string')
    if not isinstance(times, list) or not all(isinstance(at, str) for at in times):
        raise ValueError('"at" must be an array of UTC times')
    return user, tuple(parse_time(at) for at in times)


class RepeatStore:
    """The history file of one state directory."""

    def __init__(self, state_dir: Path, *, group: int | None = None) -> None:
        self.path = state_dir / FILENAME
        self.group = group

    def load(self) -> History:
        """Read the history; a missing file is an empty one.

        Raises:
            StoreError: the file exists but cannot be read.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return History([])
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        return decode(data, source=str(self.path))

    def save(self, history: Mapping[str, Sequence[float]]) -> None:
        """Replace the file with *history*.

        Raises:
            StoreError: it could not be written; the old file is intact.
        """
        write_atomic(self.path, encode(history), mode=0o600)
