"""Rates in Exim's spelling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.rate import Rate, format_duration, parse_duration


class TestRate:
    @pytest.mark.parametrize(
        ("text", "count", "period"),
        [
            ("100/1h", 100, 3600),
            (" 300 / 1d ", 300, 86400),
            ("20/1h30m", 20, 5400),
            ("5/90", 5, 90),
            ("1/1w", 1, 604800),
        ],
    )
    def test_parse(self, text: str, count: int, period: int) -> None:
        """Limits are written as an Exim admin writes ratelimit rates."""
        assert Rate.parse(text) == Rate(count=count, period=period)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("100", "expected a rate such as 100/1h"),
            ("0/1h", "count of a rate must be > 0"),
            ("1/0s", "longer than zero"),
            ("1/1.5h", "expected an Exim time"),
            ("1/500ms", "expected an Exim time"),
            ("-1/1h", "expected a rate"),
        ],
    )
    def test_invalid(self, text: str, message: str) -> None:
        """A bad rate is refused with the text that was given."""
        with pytest.raises(ValueError, match=message):
            Rate.parse(text)

    @given(st.integers(1, 10**6), st.integers(1, 10**8))
    def test_str_round_trip(self, count: int, period: int) -> None:
        """A rate prints in a form that parses back to itself."""
        rate = Rate(count=count, period=period)
        assert Rate.parse(str(rate)) == rate


def test_format_duration() -> None:
    """Durations print as Exim writes them."""
    assert [format_duration(s) for s in (3600, 5400, 86400, 59, 0)] == [
        "1h",
        "1h30m",
        "1d",
        "59s",
        "0s",
    ]


def test_parse_duration_plain_seconds() -> None:
    """A bare number is seconds, as in Exim."""
    assert parse_duration("90") == 90
