"""Per-user token buckets of failed recipients, with de-duplication of retries. Pure code.

A relay may track a million users, so one user's whole counting state is a flat run of doubles
rather than a tree of Python objects: about a quarter of the memory. At rest it is kept as
``bytes`` (:func:`dump`), which the garbage collector does not track: a full collection over a
million ``array`` objects stalls the process for about 250 ms, over a million ``bytes`` for about
2 ms (docs/performance.md). While it is worked on it is an ``array('d')`` (:func:`load`). The
functions below are the only code that knows the layout.

With ``w`` windows (the user's rates, in order) the layout is::

    [0]             updated: the time the levels below were brought forward to
    [1 .. w]        tokens left in window 1 .. w
    [w+1 ...]       recent failures, oldest first, (1 + w) doubles each:
                    the recipient's fingerprint, then when it was last counted in each window

Invariant: ``0 <= tokens <= rate.count`` in every window, whatever the times passed in.
"""

from __future__ import annotations

import array
import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from spamguardd.core.protocol import ENCODING, ERRORS
from spamguardd.core.rate import Rate

if TYPE_CHECKING:
    UserState = array.array[float]
else:
    UserState = array.array  # not subscriptable at run time before Python 3.12

#: Slack for float rounding in the continuous refill, so that "N failures in a burst" empties an
#: N-token bucket exactly at the Nth failure and not one early.
_SLACK: Final = 1e-9

#: Distinct failed recipients remembered per user for de-duplication, at the least; a user with
#: more distinct failures than the largest limit is blocked anyway.
MIN_RECENT: Final = 32

_NEVER: Final = -math.inf


def refilled(tokens: float, elapsed: float, rate: Rate) -> float:
    """A token bucket's level after *elapsed* seconds of continuous refill, capped at capacity.

    A bucket holds up to ``rate.count`` tokens and regains ``rate.count`` per ``rate.period``;
    each counted failure takes one. It is *empty* when less than one whole token is left, so the
    failure that empties it is the one that trips the limit: a ``5/1h`` bucket trips on the 5th
    failure of a burst, and still on the 5th when those failures are seconds apart (the fraction
    of a token earned meanwhile does not pay for a 6th).
    """
    if elapsed <= 0:
        return tokens  # a clock that goes back credits nothing
    return min(float(rate.count), tokens + elapsed * rate.per_second)


def is_empty(tokens: float) -> bool:
    """Whether a bucket with *tokens* left has reached its limit (less than one whole token)."""
    return tokens < 1.0 - _SLACK


def fingerprint(rcpt: str) -> float:
    """A stable 52-bit fingerprint of a recipient, exact as a float (for de-duplication).

    Two distinct recipients of one user collide with a probability of about 2**-52 per pair; a
    collision would only make a new address look like a retry of an old one.
    """
    digest = hashlib.blake2b(rcpt.encode(ENCODING, ERRORS), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> 12)


def load(stored: bytes) -> UserState:
    """The working form of a stored state."""
    state = array.array("d")
    state.frombytes(stored)
    return state


def dump(state: UserState) -> bytes:
    """The stored form of a state: compact, and not tracked by the garbage collector."""
    return state.tobytes()


def new_state(rates: Sequence[Rate], now: float) -> UserState:
    """State of a user never seen before: every bucket full, no recent failure."""
    return array.array("d", [now, *(float(rate.count) for rate in rates)])


def refill(state: UserState, rates: Sequence[Rate], now: float) -> None:
    """Bring every bucket forward to *now*."""
    elapsed = now - state[0]
    if elapsed > 0:
        for index, rate in enumerate(rates, start=1):
            state[index] = refilled(state[index], elapsed, rate)
        state[0] = now


def tokens_left(state: UserState, rates: Sequence[Rate]) -> tuple[float, ...]:
    """Tokens left per window as of the last update."""
    return tuple(state[1 : 1 + len(rates)])


def count_failure(
    state: UserState, rates: Sequence[Rate], rcpt: str, now: float, limit: int
) -> tuple[bool, Rate | None]:
    """Count a failed *rcpt* at *now* in every window where it is not a repeat.

    A recipient already counted in a window within that window's period is a retry (Exim's
    callout cache makes those cheap for a spammer) and takes no token there. At most *limit*
    recent recipients are remembered; the oldest are forgotten first.

    Returns:
        Whether any window counted it, and the first rate whose bucket it emptied.
    """
    refill(state, rates, now)
    width = 1 + len(rates)
    start = width
    mark = fingerprint(rcpt)
    previous: list[float] | None = None
    for offset in range(start, len(state), width):
        if state[offset] == mark:
            previous = list(state[offset + 1 : offset + width])
            del state[offset : offset + width]  # re-appended below, as the most recent
            break
    counted = False
    tripped: Rate | None = None
    times = []
    for index, rate in enumerate(rates):
        last = _NEVER if previous is None else previous[index]
        if now - last < rate.period:
            times.append(last)
            continue
        counted = True
        times.append(now)
        level = max(0.0, state[1 + index] - 1.0)
        state[1 + index] = level
        if tripped is None and is_empty(level):
            tripped = rate
    state.append(mark)
    state.extend(times)
    excess = (len(state) - start) // width - limit
    if excess > 0:
        del state[start : start + excess * width]
    return counted, tripped


def is_idle(state: UserState, rates: Sequence[Rate], now: float) -> bool:
    """True when forgetting this user changes nothing: buckets full, failures out of window."""
    elapsed = now - state[0]
    for index, rate in enumerate(rates, start=1):
        if refilled(state[index], elapsed, rate) < rate.count - _SLACK:
            return False
    width = 1 + len(rates)
    for offset in range(width, len(state), width):
        for index, rate in enumerate(rates, start=1):
            if now - state[offset + index] < rate.period:
                return False
    return True


def remap(
    state: UserState, old: Sequence[Rate], new: Sequence[Rate], now: float, limit: int
) -> UserState:
    """The same user's state under new limits, keeping what it has already used up.

    Windows are matched by period. In a kept window the tokens used (old capacity minus tokens
    left, after refilling to *now*) stay used: after 3 failures under ``10/1h``, a change to
    ``4/1h`` leaves 1 token and the 4th failure trips. A new window starts full; a dropped one
    vanishes. Recent failures keep their times in the kept windows and count as never seen in a
    new one. At most *limit* recent failures are kept, the newest.
    """
    refill(state, old, now)
    old_index = {rate.period: index for index, rate in enumerate(old)}
    out = array.array("d", [state[0]])
    for rate in new:
        index = old_index.get(rate.period)
        if index is None:
            out.append(float(rate.count))
            continue
        used = old[index].count - state[1 + index]
        out.append(min(float(rate.count), max(0.0, rate.count - used)))
    width = 1 + len(old)
    records = [state[offset : offset + width] for offset in range(width, len(state), width)]
    for record in records[-limit:] if limit > 0 else []:
        out.append(record[0])
        for rate in new:
            index = old_index.get(rate.period)
            out.append(_NEVER if index is None else record[1 + index])
    return out


def shift_times(state: UserState, rates: Sequence[Rate], offset: float) -> None:
    """Add *offset* to every time in *state* (between the monotonic and the wall clock).

    "Never" stays never.
    """
    state[0] += offset
    width = 1 + len(rates)
    for offset_index in range(width, len(state), width):
        for index in range(1, width):
            if state[offset_index + index] != _NEVER:
                state[offset_index + index] += offset


def is_valid(state: UserState, rates: Sequence[Rate]) -> bool:
    """Whether *state* has this layout and its levels are in range (for data read from disk)."""
    width = 1 + len(rates)
    if len(state) < width or (len(state) - width) % width:
        return False
    if not all(math.isfinite(value) for value in state[:width]):
        return False
    return all(0.0 <= state[1 + index] <= rate.count for index, rate in enumerate(rates))


def window_counts(state: UserState, rates: Sequence[Rate], now: float) -> tuple[int, ...]:
    """Distinct failures counted in each window within that window's period, as of *now*.

    Only the remembered recent failures are seen (at least the window's limit of them), which is
    every failure that still matters for a bucket that has not emptied.
    """
    width = 1 + len(rates)
    counts = [0] * len(rates)
    for offset in range(width, len(state), width):
        for index, rate in enumerate(rates):
            if now - state[offset + 1 + index] < rate.period:
                counts[index] += 1
    return tuple(counts)
