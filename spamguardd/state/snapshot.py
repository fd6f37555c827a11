"""The bucket snapshot: counters that survive a restart or a crash.

``STATE_DIR/buckets`` holds one JSON object per line for every user still being counted::

    {"user": "auth:a@example.com", "limits": ["10/1h"], "state": [1795824000.0, 7.0, ...]}

``state`` is the user's flat bucket state (:mod:`spamguardd.core.buckets`) with its times on the
wall clock (``null`` for "never"), because the monotonic clock starts again at boot. On load the
times go back to the monotonic clock, so the time the daemon was down is credited as refill,
and a user saved under other limits is carried over to the current ones as a reload would.

The file is replaced atomically (:func:`spamguardd.state.blockfile.write_atomic`). A damaged line is
never silently dropped: loading keeps every good line, reports each bad one as ``FILE:LINE``,
and keeps the damaged file aside as ``buckets.damaged`` for a person to look at.
"""

from __future__ import annotations

import array
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import attrs
import structlog

from spamguardd.core import buckets
from spamguardd.core.buckets import UserState
from spamguardd.core.rate import Rate
from spamguardd.state.blockfile import write_atomic

log = structlog.get_logger("spamguardd.state.snapshot")

HEADER: Final = b"# spamguardd bucket snapshot v1: one counted user per line, JSON; times are UTC\n"

Entry = tuple[str, Sequence[Rate], UserState]


@attrs.frozen
class LoadedSnapshot:
    """What a snapshot held: the good entries, and one ``FILE:LINE: problem`` per bad line."""

    entries: list[Entry]
    problems: list[str]


def encode(entries: Iterable[Entry], *, offset: float) -> bytes:
    """The snapshot file for *entries*, times moved by *offset* (wall minus monotonic)."""
    lines = [HEADER]
    for user, rates, state in entries:
        wall = array.array("d", state)
        buckets.shift_times(wall, rates, offset)
        record = {
            "user": user,
            "limits": [str(rate) for rate in rates],
            "state": [value if math.isfinite(value) else None for value in wall],
        }
        lines.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return b"".join(lines)


def decode(data: bytes, *, source: str, offset: float) -> LoadedSnapshot:
    """Parse a snapshot, moving its times back by *offset* (wall minus monotonic)."""
    entries: list[Entry] = []
    problems: list[str] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip() or line.startswith(b"#"):
            continue
        try:
            entries.append(_decode_line(line, offset))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{source}:{number}: {exc}")
    return LoadedSnapshot(entries, problems)


def _decode_line(line: bytes, offset: float) -> Entry:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise TypeError("expected a JSON object")
    user = record["user"]
    if not isinstance(user, str) or not user:
        raise ValueError("user: expected a non-empty string")
    rates = tuple(Rate.parse(str(text)) for text in record["limits"])
    values = record["state"]
    if not rates or not isinstance(values, list):
        raise ValueError("limits and state: expected non-empty arrays")
    state = array.array("d", [-math.inf if value is None else float(value) for value in values])
    if not buckets.is_valid(state, rates):
        raise ValueError("state: does not fit its limits")
    buckets.shift_times(state, rates, -offset)
    return user, rates, state


class SnapshotStore:
    """The bucket snapshot file of one state directory."""

    FILENAME: Final = "buckets"
    DAMAGED_SUFFIX: Final = ".damaged"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.FILENAME

    def save(self, entries: Iterable[Entry], *, offset: float) -> None:
        """Replace the snapshot with *entries*.

        Raises:
            StoreError: it could not be written; the previous snapshot is intact.
        """
        write_atomic(self.path, encode(entries, offset=offset), mode=0o600)

    def load(self, *, offset: float) -> list[Entry]:
        """The entries of the snapshot; none when there is none or it cannot be read.

        A damaged snapshot does not stop the start (counters are a convenience; the block list
        is what must be right), but it is never dropped silently: every bad line is logged
        (``snapshot_damaged``), the good ones are used, and the file is kept aside as
        ``buckets.damaged`` before the next snapshot replaces it.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error(
                "snapshot_unreadable",
                file=str(self.path),
                error=exc.strerror,
                action="starting without saved counters",
            )
            return []
        loaded = decode(data, source=str(self.path), offset=offset)
        if loaded.problems:
            damaged = self.path.with_name(self.path.name + self.DAMAGED_SUFFIX)
            try:
                self.path.replace(damaged)
                kept = str(damaged)
            except OSError as exc:
                kept = f"not kept: {exc.strerror}"
            for problem in loaded.problems:
                log.error(
                    "snapshot_damaged",
                    problem=problem,
                    action="line skipped; the other lines are loaded",
                    kept_as=kept,
                )
        return loaded.entries
