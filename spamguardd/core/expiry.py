"""Blocks that expire, and longer ones for repeat offenders. Pure: times are passed in.

``[block] expire`` is a list of steps (``["24h", "7d", "forever"]``): the first automatic block
of a user within ``repeat_within`` lasts the first step, the second the second, and so on; past
the last step the last one applies again. ``forever`` (the default, a single step) is a block
that only an admin lifts.

Two structures serve the daemon:

- :class:`RepeatHistory`, each user's automatic blocks within ``repeat_within`` (wall-clock
  times), which the escalation counts. It survives unblocks and restarts (the daemon saves it),
  is forgotten by an admin's ``reset``, and is bounded: times older than ``repeat_within`` are
  dropped, and at most :data:`MAX_KEPT` are kept per user.
- :class:`ExpirySchedule`, a heap of ``(expires_at, user)``: the next lift is its top, a block
  costs O(log n) to file and to lift, and nothing walks the block list.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from spamguardd.core.rate import format_duration, parse_duration

#: The spelling of a step that never ends.
FOREVER: Final = "forever"
#: Default ``block.repeat_within``: 30 days.
DEFAULT_REPEAT_WITHIN: Final = 30 * 86400.0
#: Automatic block times kept per user: enough to tell "5th block in 30 days" apart from the
#: last step, and a bound on the history of one user whatever it does.
MAX_KEPT: Final = 32

#: One step: seconds, or None for a block that does not expire.
Step = float | None


def parse_steps(value: Any) -> tuple[Step, ...]:
    """``block.expire``: one duration or ``forever``, or a non-empty array of them.

    Raises:
        TypeError, ValueError: the message says what is wrong (an array item's is prefixed
            with ``[INDEX]: ``, which the configuration reader glues to the key).
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise TypeError(
            f'expected a time such as "24h", "forever", or an array of them (got {value!r:.40})'
        )
    if not items:
        raise ValueError('expected at least one step (use "forever" for blocks that never expire)')
    steps: list[Step] = []
    for index, item in enumerate(items):
        where = f"[{index}]: " if isinstance(value, list) else ""
        if not isinstance(item, str):
            raise TypeError(f'{where}expected a time such as "24h" or "forever" (got {item!r:.40})')
        text = item.strip()
        if steps and steps[-1] is None:
            raise ValueError(f'{where}no step can follow "forever" (got {text!r})')
        if text == FOREVER:
            steps.append(None)
            continue
        try:
            seconds = float(parse_duration(text))
        except ValueError as exc:
            raise ValueError(f'{where}{exc}, or "forever"') from None
        previous = steps[-1] if steps else None
        if previous is not None and seconds < previous:
            raise ValueError(
                f"{where}a step must not be shorter than the one before "
                f"(got {text} after {format_duration(previous)})"
            )
        steps.append(seconds)
    return tuple(steps)


def format_steps(steps: Sequence[Step]) -> str:
    """Steps as the configuration spells them: ``24h, 7d, forever``."""
    return ", ".join(FOREVER if step is None else format_duration(step) for step in steps)


def format_span(seconds: float) -> str:
    """A span for people: ``30 days``, ``1 day``, ``12 hours``, else an Exim time."""
    whole = int(seconds)
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if whole >= size and whole % size == 0:
            count = whole // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return format_duration(whole)


def expires(steps: Sequence[Step]) -> bool:
    """Whether any automatic block can expire under *steps*."""
    return any(step is not None for step in steps)


def step_for(steps: Sequence[Step], nth: int) -> Step:
    """The length of the *nth* (1-based) automatic block within the span; the last step
    applies again past the end."""
    return steps[min(max(nth, 1), len(steps)) - 1]


def expiry_for(steps: Sequence[Step], nth: int, blocked_at: float) -> float | None:
    """When the *nth* automatic block made at *blocked_at* lifts itself; None: never."""
    step = step_for(steps, nth)
    return None if step is None else blocked_at + step


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``22nd``."""
    if 10 <= number % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


class RepeatHistory:
    """Each user's automatic blocks within the span, oldest first. See the module docstring."""

    def __init__(self, entries: Iterable[tuple[str, Sequence[float]]] = ()) -> None:
        self._times: dict[str, list[float]] = {}
        for user, times in entries:
            kept = sorted(times)[-MAX_KEPT:]
            if kept:
                self._times[user] = kept
        #: Grows on every change, so the daemon saves only when something changed.
        self.version = 0

    def __len__(self) -> int:
        return len(self._times)

    def count(self, user: str, *, now: float, within: float) -> int:
        """Automatic blocks of *user* in the *within* seconds up to *now*."""
        times = self._times.get(user, ())
        return sum(1 for at in times if now - at < within)

    def record(self, user: str, at: float, *, within: float) -> int:
        """File an automatic block of *user* at *at*; return which one it is in the span
        (1 for the first)."""
        times = [t for t in self._times.get(user, ()) if at - t < within]
        times.append(at)
        self._times[user] = times[-MAX_KEPT:]
        self.version += 1
        return len(times)

    def forget(self, user: str) -> bool:
        """Forget *user*'s history (an admin's ``reset``); whether there was any."""
        if self._times.pop(user, None) is None:
            return False
        self.version += 1
        return True

    def recent(self, *, now: float, within: float) -> dict[str, tuple[float, ...]]:
        """A copy of the history without the times out of the span, to be saved."""
        out = {}
        for user, times in self._times.items():
            kept = tuple(t for t in times if now - t < within)
            if kept:
                out[user] = kept
        return out

    def items(self) -> Iterator[tuple[str, tuple[float, ...]]]:
        """Every user's times, as held (for tests and inspection)."""
        for user, times in self._times.items():
            yield user, tuple(times)


class ExpirySchedule:
    """Blocks that expire, by expiry time: a heap with lazy deletion.

    A lifted or replaced block stays in the heap until it comes up or the heap is rebuilt; the
    caller checks each due entry against its block list (:meth:`take_due` takes a *current*
    mapping). The heap is rebuilt from the live entries when it holds more than twice as many as
    are live, so its size stays in proportion to the blocks that expire.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, user: str, expires_at: float) -> None:
        """File *user*'s block to lift at *expires_at*."""
        heapq.heappush(self._heap, (expires_at, user))

    def next_at(self) -> float | None:
        """The earliest filed expiry (maybe of a block lifted since); None when none."""
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float, expiry_of: Callable[[str], float | None]) -> list[str]:
        """The users whose block is due at *now*; *expiry_of* gives a user's current expiry.

        Entries whose block was lifted or changed since they were filed are dropped.
        """
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, user = heapq.heappop(heap)
            if expiry_of(user) == at and user not in due:
                due.append(user)
        return due

    def compact(self, expiry_of: Callable[[str], float | None], live: int) -> None:
        """Drop the entries of lifted or changed blocks once the heap holds more than twice
        *live* (an upper bound of the blocks that expire) plus a margin: amortised O(1) a block.
        """
        if len(self._heap) > 2 * live + 64:
            self._heap = [(at, user) for at, user in self._heap if expiry_of(user) == at]
            heapq.heapify(self._heap)
