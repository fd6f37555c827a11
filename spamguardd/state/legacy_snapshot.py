"""The version 1 counter snapshot (``STATE_DIR/buckets``, JSON lines), read once on upgrade.

Releases before the incremental snapshot wrote every counted user as one JSON object a line::

    {"user": "auth:a@example.com", "limits": ["10/1h"], "state": [1795824000.0, 7.0, ...]}

``state`` is the portable form of :mod:`spamguardd.core.buckets` with wall-clock times and
``null`` for "never". A relay that upgrades must not forgive its counters, so the daemon reads
this file at its first start, writes everything to the new snapshot, then removes it. Any bytes
are read without an exception: a bad line (not JSON, nested too deeply, a key or state that does
not fit) is a :class:`~spamguardd.state.snapshot_format.Problem` naming ``FILE:LINE``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Final

from spamguardd.core import buckets
from spamguardd.core.protocol import MAX_USER_SIZE
from spamguardd.core.rate import Rate
from spamguardd.state.snapshot_format import Kind, Problem, Record

FILENAME: Final = "buckets"
HEADER: Final = b"# spamguardd bucket snapshot v1"


def decode(data: bytes, *, source: str, shift: float, latest: float) -> Iterator[Record | Problem]:
    """The users of a v1 snapshot, and a problem per bad line. Never raises."""
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip() or line.startswith(b"#"):
            continue
        try:
            yield _decode_line(line, shift=shift, latest=latest)
        except (ValueError, TypeError, KeyError, RecursionError, OverflowError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            yield Problem(f"{source}:{number}: {reason}")


def _decode_line(line: bytes, *, shift: float, latest: float) -> Record:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise TypeError("expected a JSON object")
    user = record["user"]
    if not isinstance(user, str) or not user or "\x00" in user:
        raise ValueError("user: expected a non-empty string without NUL")
    if len(user) > MAX_USER_SIZE:
        raise ValueError(f"user: longer than {MAX_USER_SIZE} characters")
    limits = record["limits"]
    values = record["state"]
    if not isinstance(limits, list) or not limits or not isinstance(values, list):
        raise ValueError("limits and state: expected non-empty arrays")
    rates = tuple(Rate.parse(text) for text in limits if isinstance(text, str))
    if len(rates) != len(limits):
        raise ValueError("limits: expected strings such as 10/1h")
    numbers = []
    for value in values:
        if value is None:
            numbers.append(-math.inf)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers.append(float(value))
        else:
            raise ValueError(f"state: {value!r} is not a number")
    state = buckets.import_state(
        numbers, rates, buckets.recent_limit(rates), shift=shift, latest=latest
    )
    return Record(Kind.STATE, user, rates, state)
