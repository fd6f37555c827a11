"""Rates written the way Exim admins write them: ``100/1h``, ``300 / 1d``, ``20/1h30m``.

Exim's ``ratelimit`` condition spells a limit ``m / p`` with ``p`` an Exim time (spec, "Rate
limiting incoming connections"; times: ``readconf_readtime``, whole ``w``/``d``/``h``/``m``/``s``
units, optionally combined, or a bare number of seconds). We accept the same spelling so a limit
can move between an ACL and our configuration unchanged.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

_UNIT_SECONDS: Final = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
#: The longest time accepted anywhere (a window, an expiry, a timeout): 100 years of 365 days.
#: Beyond it lie times no clock, file or log can write (the year 9999), not useful settings.
MAX_DURATION: Final = 100 * 365 * 86400
_TIME: Final = re.compile(r"(?:\d+[wdhms])+|\d+")
_PART: Final = re.compile(r"(\d+)([wdhms])")
_RATE: Final = re.compile(r"\s*(\d+)\s*/\s*(\S+)\s*")


def parse_duration(text: str) -> int:
    """Parse an Exim time such as ``1h``, ``1h30m``, ``2d`` or ``90`` (seconds) into seconds.

    Raises:
        ValueError: *text* is not an Exim time, is zero, or is longer than
            :data:`MAX_DURATION`.
    """
    text = text.strip()
    if not _TIME.fullmatch(text):
        raise ValueError(f"expected an Exim time such as 1h, 30m, 1d or 1h30m (got {text!r})")
    seconds = (
        int(text)
        if text.isdigit()
        else sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))
    )
    if seconds <= 0:
        raise ValueError(f"a time must be longer than zero (got {text!r})")
    if seconds > MAX_DURATION:
        raise ValueError(f"a time must be at most 100 years, 36500d (got {text!r})")
    return seconds


def format_duration(seconds: float) -> str:
    """Render whole seconds the way Exim writes them (``3600`` -> ``1h``, ``5400`` -> ``1h30m``)."""
    remaining = int(seconds)
    if remaining <= 0:
        return "0s"
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


@attrs.frozen
class Rate:
    """At most ``count`` events per ``period`` seconds: a token bucket's capacity and refill."""

    count: int = attrs.field(validator=attrs.validators.gt(0))
    period: int = attrs.field(validator=attrs.validators.gt(0))

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``N/TIME`` (for example ``100/1h``).

        Raises:
            ValueError: the text is not ``N/TIME`` with a whole N > 0 and an Exim time > 0.
        """
        match = _RATE.fullmatch(text)
        if match is None:
            raise ValueError(f"expected a rate such as 100/1h (got {text!r})")
        count = int(match.group(1))
        if count <= 0:
            raise ValueError(f"the count of a rate must be > 0 (got {text!r})")
        return cls(count=count, period=parse_duration(match.group(2)))

    @property
    def per_second(self) -> float:
        """Refill speed: tokens per second."""
        return self.count / self.period

    def __str__(self) -> str:
        return f"{self.count}/{format_duration(self.period)}"
