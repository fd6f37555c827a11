"""Peak failures per user and window: the most failures within any span of the window's length.

A sliding window per user and period holds the times of the failures counted in the last
*period* seconds; its peak is the largest count it ever held. As in the policy, a failed
recipient repeated within the window counts once there (Exim's callout cache makes repeats
free for a spammer). Memory follows the window, not the log: a window keeps the times within
its period, and the recipients it remembers for de-duplication are pruned to those within it
once they outnumber twice the times (plus a floor, so that pruning stays rare).

Every failure of a spam wave passes through :meth:`UserPeaks.add_run`, so it is written for
speed: one object per user, its windows in a list, a user's failures taken a run at a time (as
the engine hands them to the policies), no per-failure allocation but the deque slot.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence

from spamguardd.core.policy import Failure
from spamguardd.core.protocol import Verify

#: Recipients a window remembers beyond twice its times before it prunes those out of window.
PRUNE_FLOOR = 32


class Window:
    """One user's counted failures within the last *period* seconds."""

    __slots__ = ("last", "peak", "period", "times")

    def __init__(self, period: int) -> None:
        self.period = period
        #: Times of the failures counted within the period, oldest first.
        self.times: collections.deque[float] = collections.deque()
        #: Recipient -> when it was last counted here (for de-duplication).
        self.last: dict[str, float] = {}
        #: The most failures the window ever held.
        self.peak = 0


class UserPeaks(Mapping[int, int]):
    """One user's windows, one per period; as a mapping, period -> peak."""

    __slots__ = ("windows",)

    def __init__(self, periods: Sequence[int]) -> None:
        #: In the order of *periods* (ascending, as the report lists them).
        self.windows = [Window(period) for period in periods]

    def add(self, rcpt: str, at: float) -> None:
        """Count a failure of *rcpt* at *at* in every window where it is not a repeat."""
        self.add_run(((rcpt, Verify.FAIL, None, at, at),))

    def add_run(self, failures: Sequence[Failure]) -> None:
        """Count *failures* (in time order) as :meth:`add` counts each: window by window, each
        window's state in local variables for the whole run."""
        for window in self.windows:
            last = window.last
            get = last.get
            times = window.times
            append = times.append
            popleft = times.popleft
            period = window.period
            peak = window.peak
            for failure in failures:
                rcpt = failure[0]
                at = failure[3]
                previous = get(rcpt)
                if previous is not None and at - previous < period:
                    continue  # a repeat within the window: the policy does not count it either
                last[rcpt] = at
                append(at)
                edge = at - period
                while times[0] <= edge:  # stops at the latest time, which is later than edge
                    popleft()
                count = len(times)
                if count > peak:  # noqa: PLR1730 - a comparison, not a call, per failure
                    peak = count
                if len(last) > 2 * count + PRUNE_FLOOR:
                    last = window.last = {r: t for r, t in last.items() if at - t < period}
                    get = last.get
            window.peak = peak

    def longest(self) -> Window:
        """The window with the longest period."""
        return max(self.windows, key=lambda window: window.period)

    def __getitem__(self, period: int) -> int:
        for window in self.windows:
            if window.period == period:
                return window.peak
        raise KeyError(period)

    def __iter__(self) -> Iterator[int]:
        return (window.period for window in self.windows)

    def __len__(self) -> int:
        return len(self.windows)
