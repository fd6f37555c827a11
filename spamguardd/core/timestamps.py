"""Wall-clock times as people and files see them: ISO 8601, UTC, whole seconds. Pure."""

from __future__ import annotations

import datetime as dt


def format_time(seconds: float) -> str:
    """Wall-clock seconds as an ISO-8601 UTC timestamp with whole seconds."""
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """Inverse of :func:`format_time`.

    Raises:
        ValueError: not an ISO-8601 UTC timestamp.
    """
    if not text.endswith("Z"):
        raise ValueError(f"expected a UTC time such as 2026-11-28T01:02:03Z (got {text!r})")
    return dt.datetime.fromisoformat(text).timestamp()
