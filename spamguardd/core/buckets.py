"""Per-user token buckets of failed recipients, with de-duplication of retries. Pure code.

A relay may track a million users, so one user's whole counting state is one ``bytearray`` of
doubles rather than a tree of Python objects: the garbage collector does not track a
``bytearray`` (a full collection over a million ``array`` objects stalls the process for about
250 ms), and it is changed in place, so counting a failure costs the same whatever the size of
the state. The functions below are the only code that knows the layout.

With ``w`` windows (the user's rates, in order) the layout is::

    [0]             updated: the time the levels below were brought forward to
    [1]             layout: a tag the owner keeps for the rates the state is laid out for
    [2]             entries: slots in use in the table below
    [3]             filed: another tag of the owner's (where its idle sweep filed the user)
    [4 .. 4+w)      tokens left in window 1 .. w
    [4+w ...)       a hash table of recent failures, a power of two of slots, (1 + w) doubles
                    each: the recipient's fingerprint (0 for an empty slot), then when it was
                    last counted in each window (-inf: never)

The table is open-addressed with linear probing and at most half full, so finding a recipient
takes one or two probes whatever the limits. It is rebuilt when it would pass half full: the
failures out of every window are dropped, and past *limit* entries only the newest *limit* are
kept; the new table is twice the entries kept, so a rebuild is paid for by the insertions before
it. Between rebuilds more than *limit* failures may be remembered, never fewer.

Every time in a state is at most ``updated``. The *portable* form (:func:`export`,
:func:`import_state`), used by the snapshot, is a flat run of doubles without the table's empty
slots: ``updated, tokens..., then (fingerprint, times...) per remembered failure``.

Invariant: ``0 <= tokens <= rate.count`` in every window, whatever the times passed in.
"""

from __future__ import annotations

import array
import hashlib
import math
import struct
from collections.abc import Sequence
from hashlib import blake2b as _blake2b
from typing import Final, Protocol, Self, TypeVar, cast, overload

from spamguardd.core.protocol import ENCODING, ERRORS
from spamguardd.core.rate import Rate

#: A user's counting state (see the module docstring for the layout).
UserState = bytearray

#: Slack for float rounding in the continuous refill, so that "N failures in a burst" empties an
#: N-token bucket exactly at the Nth failure and not one early.
_SLACK: Final = 1e-9

#: Distinct failed recipients remembered per user for de-duplication, at the least; a user with
#: more distinct failures than the largest limit is blocked anyway.
MIN_RECENT: Final = 32
#: ... and at the most, whatever the limits: a rebuild of the table costs a few microseconds per
#: remembered failure, so this bounds the longest one (about 4 ms) and a user's memory (48 KB
#: with two windows). Past it, a retry of an older recipient is counted again: one token out
#: of a limit that large.
MAX_RECENT: Final = 512

_NEVER: Final = -math.inf
_UPDATED: Final = 0
_LAYOUT: Final = 1
_ENTRIES: Final = 2
_FILED: Final = 3
_TOKENS: Final = 4
#: Largest fingerprint: 52 bits, exact as a double.
_FINGERPRINT_MAX: Final = float((1 << 52) - 1)
_EMPTY: Final = 0.0
#: The fingerprint of the early-warning mark (:func:`check_warning`), kept in the table like a
#: recipient so the snapshot, a reload and a merge carry it without a format of their own. A real
#: recipient has this fingerprint with a probability of 2**-52.
WARNED: Final = _FINGERPRINT_MAX
_DOUBLE: Final = struct.Struct("d")
_TOKEN_LAYOUTS: dict[int, struct.Struct] = {}
#: Per tuple of rates (by identity, the tuple kept alive here): capacities, refill speeds and
#: periods as :func:`count_failures` reads them, worked out once instead of per call.
_PARAMETERS: dict[int, tuple[Sequence[Rate], list[float], list[float], list[int]]] = {}
_MAX_PARAMETERS: Final = 256
#: A remembered failure: its fingerprint, then its time in each window.
_Entry = TypeVar("_Entry", bound=Sequence[float])


def recent_limit(rates: Sequence[Rate]) -> int:
    """Distinct recent failures remembered for a user with these limits."""
    return min(MAX_RECENT, max(MIN_RECENT, *(rate.count for rate in rates)))


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
    """A stable, non-zero 52-bit fingerprint of a recipient, exact as a float.

    Two distinct recipients of one user collide with a probability of about 2**-52 per pair; a
    collision would only make a new address look like a retry of an old one.
    """
    digest = hashlib.blake2b(rcpt.encode(ENCODING, ERRORS), digest_size=8).digest()
    return float((int.from_bytes(digest, "big") >> 12) or 1)


class _Doubles(Protocol):
    """A ``memoryview`` cast to doubles, as typeshed cannot say (its items are ints there)."""

    @overload
    def __getitem__(self, index: int) -> float: ...
    @overload
    def __getitem__(self, index: slice) -> _Doubles: ...
    def __setitem__(self, index: int, value: float) -> None: ...
    def __len__(self) -> int: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...
    def tolist(self) -> list[float]: ...
    def release(self) -> None: ...


def _view(state: UserState) -> _Doubles:
    """Doubles over *state*'s bytes; release (``with``) before the state changes size."""
    return cast("_Doubles", memoryview(state).cast("d"))


def new_state(rates: Sequence[Rate], now: float, layout: float = 0.0) -> UserState:
    """State of a user never seen before: every bucket full, no recent failure, no table."""
    return _build(
        (now, layout, math.nan), [float(rate.count) for rate in rates], [], len(rates), room=1
    )


def _build(
    head: tuple[float, float, float],
    tokens: Sequence[float],
    entries: Sequence[Sequence[float]],
    w: int,
    room: int = 0,
) -> UserState:
    """A state holding *entries* (distinct fingerprints), with room for *room* more.

    *head* is ``(updated, layout, filed)``.
    """
    width = 1 + w
    capacity = 0
    if entries or room:
        capacity = 2
        while capacity < 2 * (len(entries) + room):
            capacity *= 2
    table = [_EMPTY] * (capacity * width)
    mask = capacity - 1
    for entry in entries:
        slot = int(entry[0]) & mask
        while table[slot * width] != _EMPTY:
            slot = (slot + 1) & mask
        table[slot * width : slot * width + width] = entry
    updated, layout, filed = head
    return bytearray(
        array.array("d", [updated, layout, float(len(entries)), filed, *tokens, *table])
    )


def _head(view: _Doubles) -> tuple[float, float, float]:
    return view[_UPDATED], view[_LAYOUT], view[_FILED]


def _entries(view: _Doubles, w: int) -> list[list[float]]:
    """The table's occupied slots, as ``[fingerprint, times...]`` lists."""
    width = 1 + w
    values = view[_TOKENS + w :].tolist()
    return [values[at : at + width] for at in range(0, len(values), width) if values[at] != _EMPTY]


def _live(entries: list[list[float]], rates: Sequence[Rate], now: float) -> list[list[float]]:
    """The remembered failures that still matter in some window at *now*."""
    cutoffs = [now - rate.period for rate in rates]
    if len(cutoffs) == 1:
        (first,) = cutoffs
        return [entry for entry in entries if entry[1] > first]
    if len(cutoffs) == 2:
        first, second = cutoffs
        return [entry for entry in entries if entry[1] > first or entry[2] > second]
    return [
        entry
        for entry in entries
        if any(time > cutoff for time, cutoff in zip(entry[1:], cutoffs, strict=True))
    ]


def _newest(entries: list[_Entry], keep: int) -> list[_Entry]:
    """The *keep* entries counted most recently."""
    if len(entries) <= keep:
        return entries
    entries.sort(key=lambda entry: max(entry[1:]))
    return entries[len(entries) - keep :] if keep > 0 else []


def _rebuild(state: UserState, rates: Sequence[Rate], now: float, keep: int) -> None:
    """Rebuild the table in place: live entries only (the newest *keep*), room for one more.

    The table :func:`_build` makes from the :func:`_live` entries, made with fewer steps (a
    user failing steadily rebuilds about once in twenty failures): the entries are read and
    placed in the same order, so the table is the same, slot for slot.
    """
    w = len(rates)
    width = 1 + w
    base = _TOKENS + w
    with _view(state) as view:
        values = view[base:].tolist()
    live: list[Sequence[float]]
    if w == 1:
        cutoff = now - rates[0].period
        # an empty slot is (0.0, 0.0): its time is never later than a cutoff at or after 0
        live = [
            (mark, time)
            for mark, time in zip(values[0::2], values[1::2], strict=True)
            if time > cutoff and mark
        ]
    else:
        entries = [values[at : at + width] for at in range(0, len(values), width) if values[at]]
        live = list(_live(entries, rates, now))
    # past *keep*, leave room for keep/2 more, so that the next rebuild is as far away
    room = 1 if len(live) <= keep else max(1, keep // 2)
    kept = _newest(live, keep)
    capacity = 2
    while capacity < 2 * (len(kept) + room):
        capacity *= 2
    size = capacity * width
    table = [_EMPTY] * size
    mask = capacity - 1
    if w == 1:
        for mark, time in kept:
            at = (int(mark) & mask) << 1
            while table[at]:  # a fingerprint is never 0.0
                at += 2
                if at == size:
                    at = 0
            table[at] = mark
            table[at + 1] = time
    else:
        for entry in kept:
            at = (int(entry[0]) & mask) * width
            while table[at] != _EMPTY:
                at += width
                if at == size:
                    at = 0
            table[at : at + width] = entry
    with _view(state) as view:
        view[_ENTRIES] = float(len(kept))
    state[8 * base :] = array.array("d", table).tobytes()


def refill(state: UserState, rates: Sequence[Rate], now: float) -> None:
    """Bring every bucket forward to *now*."""
    with _view(state) as view:
        elapsed = now - view[_UPDATED]
        if elapsed > 0:
            for index, rate in enumerate(rates, start=_TOKENS):
                view[index] = refilled(view[index], elapsed, rate)
            view[_UPDATED] = now


def updated(state: UserState) -> float:
    """The time the state's levels were last brought forward to."""
    return cast("float", _DOUBLE.unpack_from(state, 8 * _UPDATED)[0])


def layout(state: UserState) -> float:
    """The owner's tag for the rates *state* is laid out for (see :func:`set_layout`)."""
    return cast("float", _DOUBLE.unpack_from(state, 8 * _LAYOUT)[0])


def set_layout(state: UserState, tag: float) -> None:
    """Tag *state* as laid out for the owner's rates *tag*."""
    _DOUBLE.pack_into(state, 8 * _LAYOUT, tag)


def filed(state: UserState) -> float:
    """The owner's sweep tag of *state* (NaN until :func:`set_filed`)."""
    return cast("float", _DOUBLE.unpack_from(state, 8 * _FILED)[0])


def set_filed(state: UserState, tag: float) -> None:
    """Set the owner's sweep tag of *state*."""
    _DOUBLE.pack_into(state, 8 * _FILED, tag)


def tokens_left(state: UserState, rates: Sequence[Rate]) -> tuple[float, ...]:
    """Tokens left per window as of the last update."""
    w = len(rates)
    layout = _TOKEN_LAYOUTS.get(w)
    if layout is None:
        layout = _TOKEN_LAYOUTS[w] = struct.Struct(f"{w}d")
    return cast("tuple[float, ...]", layout.unpack_from(state, 8 * _TOKENS))


def remembered(state: UserState, rates: Sequence[Rate]) -> int:
    """How many recent failures the state remembers (for tests and memory accounting)."""
    del rates
    with _view(state) as view:
        return int(view[_ENTRIES])


def count_failure(
    state: UserState, rates: Sequence[Rate], rcpt: str, now: float, limit: int
) -> tuple[bool, Rate | None]:
    """Count a failed *rcpt* at *now* in every window where it is not a repeat.

    A recipient already counted in a window within that window's period is a retry (Exim's
    callout cache makes those cheap for a spammer) and takes no token there. At least the
    *limit* most recent distinct recipients are remembered. One or two probes of the table,
    whatever *limit* is; now and then a rebuild, paid for by the insertions before it.

    Returns:
        Whether any window counted it, and the first rate whose bucket it emptied.
    """
    counted, tripped = count_failures(state, rates, (rcpt,), (now,), limit)
    return counted[0], tripped


def count_failures(  # noqa: C901, PLR0912, PLR0915 - one loop over one view: the hot path
    state: UserState,
    rates: Sequence[Rate],
    rcpts: Sequence[str],
    times: Sequence[float],
    limit: int,
) -> tuple[list[bool], Rate | None]:
    """Count failed *rcpts* at *times* (in order) as :func:`count_failure` counts each, up to
    and including the first that empties a bucket.

    Every failed recipient of the daemon (a run of one) and of a replay (a user's failures
    at a time) passes through here, so the refill (:func:`refilled`), the fingerprint, the
    probe (:func:`_probe`) and the taking of tokens (:func:`_take`) are written out over one
    view of the state, with the same arithmetic.

    Returns:
        Whether each failure counted, for those dealt with, and the first rate whose bucket the
        last of them emptied (None: none did, and all were dealt with).
    """
    w = len(rates)
    width = 1 + w
    base = _TOKENS + w
    known = _PARAMETERS.get(id(rates))
    if known is None or known[0] is not rates:
        known = (
            rates,
            [float(rate.count) for rate in rates],
            [rate.per_second for rate in rates],
            [rate.period for rate in rates],
        )
        if type(rates) is tuple:  # not a list, which could change under the same identity
            if len(_PARAMETERS) >= _MAX_PARAMETERS:
                _PARAMETERS.clear()
            _PARAMETERS[id(rates)] = known
    _, counts, speeds, periods = known
    windows = range(w)
    counted: list[bool] = []
    tripped: Rate | None = None
    view = _view(state)
    try:
        capacity = (len(view) - base) // width
        for rcpt, now in zip(rcpts, times, strict=True):
            digest = _blake2b(rcpt.encode(ENCODING, ERRORS), digest_size=8).digest()
            mark = float((int.from_bytes(digest, "big") >> 12) or 1)
            elapsed = now - view[_UPDATED]
            if elapsed > 0:
                for i in windows:
                    view[_TOKENS + i] = min(counts[i], view[_TOKENS + i] + elapsed * speeds[i])
                view[_UPDATED] = now
            found = free = -1
            if capacity:
                mask = capacity - 1
                slot = int(mark) & mask
                while True:
                    offset = base + slot * width
                    held = view[offset]
                    if held == mark:
                        found = offset
                        break
                    if held == _EMPTY:
                        free = offset
                        break
                    slot = (slot + 1) & mask
            if found < 0:  # never counted (or forgotten): counted in every window
                if 2 * (view[_ENTRIES] + 1) > capacity:
                    view.release()
                    _rebuild(state, rates, now, limit)
                    view = _view(state)
                    capacity = (len(view) - base) // width
                    free = _probe(view, mark, w)[1]
                view[free] = mark
                view[_ENTRIES] += 1
                found = free
                for i in windows:
                    view[found + 1 + i] = now
                    level = view[_TOKENS + i] - 1.0
                    if level < 0.0:  # noqa: PLR1730 - a comparison, not a call, per failure
                        level = 0.0
                    view[_TOKENS + i] = level
                    if tripped is None and level < 1.0 - _SLACK:
                        tripped = rates[i]
                counted.append(True)
                if tripped is not None:
                    break
                continue
            hit = False
            for i in windows:
                at = found + 1 + i
                if now - view[at] < periods[i]:
                    continue  # a retry in this window
                hit = True
                view[at] = now
                level = view[_TOKENS + i] - 1.0
                if level < 0.0:  # noqa: PLR1730 - a comparison, not a call, per failure
                    level = 0.0
                view[_TOKENS + i] = level
                if tripped is None and level < 1.0 - _SLACK:
                    tripped = rates[i]
            counted.append(hit)
            if tripped is not None:
                break
        return counted, tripped
    finally:
        view.release()


def take(state: UserState, rates: Sequence[Rate], now: float) -> Rate | None:
    """Take one token at *now* from every window, with no de-duplication (the volume guard:
    each accepted recipient counts). Returns the first rate whose bucket it emptied."""
    tripped: Rate | None = None
    with _view(state) as view:
        elapsed = now - view[_UPDATED]
        if elapsed > 0:
            view[_UPDATED] = now
        for index, rate in enumerate(rates, start=_TOKENS):
            level = max(0.0, refilled(view[index], elapsed, rate) - 1.0)
            view[index] = level
            if tripped is None and is_empty(level):
                tripped = rate
    return tripped


def check_warning(  # noqa: PLR0913 - the state, its limits, the times and the mark, all needed
    state: UserState,
    rates: Sequence[Rate],
    before: Sequence[float],
    now: float,
    *,
    warn_at: float,
    limit: int,
) -> Rate | None:
    """Whether the failure just counted at *now* takes a window past the warning mark.

    The *mark* of a window of ``N`` tokens is ``M = ceil(warn_at * N)`` used: the failure that
    uses the Mth token warns (as with a block, the fraction of a token earned since the first
    failure of a burst does not put it off). *before* are the levels just before the failure
    (refilled to *now*). A warned window is not warned again until its bucket has refilled to
    half the mark (``M / 2`` used): without that margin, a user failing at about the refill
    rate would cross the mark on every failure. The mark is
    the table entry :data:`WARNED`, its time per window the last failure seen while warned
    (never: not warned); a mark older than the window's period has lapsed, since the bucket
    has refilled whole since.

    Returns:
        The first window warned by this failure, or None.
    """
    w = len(rates)
    with _view(state) as view:
        found, free = _probe(view, WARNED, w)
        marks: list[bool] = []
        warned: Rate | None = None
        for index, rate in enumerate(rates):
            mark = math.ceil(warn_at * rate.count - _SLACK)
            marked = found >= 0 and now - view[found + 1 + index] < rate.period
            if marked and before[index] >= rate.count - mark / 2 - _SLACK:
                marked = False  # refilled to half the mark: warn again next time
            if not marked and view[_TOKENS + index] < rate.count - mark + 1 - _SLACK:
                marked = True
                warned = warned or rate
            marks.append(marked)
        if found >= 0:
            for index, marked in enumerate(marks):
                view[found + 1 + index] = now if marked else _NEVER
            return warned
        if warned is None:
            return None  # no mark to keep: the table is left alone
        roomy = free >= 0 and 2 * (view[_ENTRIES] + 1) <= (len(view) - _TOKENS - w) // (1 + w)
    if not roomy:
        _rebuild(state, rates, now, limit)
    with _view(state) as view:
        found = _insert(view, _probe(view, WARNED, w)[1], WARNED, w)
        for index, marked in enumerate(marks):
            view[found + 1 + index] = now if marked else _NEVER
    return warned


def warned_windows(state: UserState, rates: Sequence[Rate], now: float) -> tuple[bool, ...]:
    """Per window, whether *state* carries a warning mark still in force at *now*."""
    w = len(rates)
    with _view(state) as view:
        found = _probe(view, WARNED, w)[0]
        if found < 0:
            return (False,) * w
        return tuple(now - view[found + 1 + i] < rate.period for i, rate in enumerate(rates))


def _insert(view: _Doubles, at: int, mark: float, w: int) -> int:
    """Put a recipient never counted into the empty slot at *at*."""
    view[at] = mark
    for index in range(at + 1, at + 1 + w):
        view[index] = _NEVER
    view[_ENTRIES] += 1
    return at


def _take(
    view: _Doubles, found: int, rates: Sequence[Rate], now: float
) -> tuple[bool, Rate | None]:
    """Take a token in every window where the recipient at *found* is not a retry."""
    counted = False
    tripped: Rate | None = None
    for index, rate in enumerate(rates):
        at = found + 1 + index
        if now - view[at] < rate.period:
            continue  # a retry in this window
        counted = True
        view[at] = now
        level = max(0.0, view[_TOKENS + index] - 1.0)
        view[_TOKENS + index] = level
        if tripped is None and is_empty(level):
            tripped = rate
    return counted, tripped


def _probe(view: _Doubles, mark: float, w: int) -> tuple[int, int]:
    """Where *mark* is in the table (or -1), and the empty slot where it would go (or -1)."""
    width = 1 + w
    base = _TOKENS + w
    capacity = (len(view) - base) // width
    if not capacity:
        return -1, -1
    mask = capacity - 1
    slot = int(mark) & mask
    while True:
        offset = base + slot * width
        held = view[offset]
        if held == mark:
            return offset, -1
        if held == _EMPTY:
            return -1, offset
        slot = (slot + 1) & mask


def is_idle(state: UserState, rates: Sequence[Rate], now: float) -> bool:
    """True when forgetting this user changes nothing: buckets full, failures out of window."""
    with _view(state) as view:
        elapsed = now - view[_UPDATED]
        for index, rate in enumerate(rates, start=_TOKENS):
            if refilled(view[index], elapsed, rate) < rate.count - _SLACK:
                return False
        if all(elapsed >= rate.period for rate in rates):
            return True  # every time in the state is at most `updated`
        return not _live(_entries(view, len(rates)), rates, now)


def remap(
    state: UserState, old: Sequence[Rate], new: Sequence[Rate], now: float, limit: int
) -> UserState:
    """The same user's state under new limits, keeping what it has already used up.

    Windows are matched by period. In a kept window the tokens used (old capacity minus tokens
    left, after refilling to *now*) stay used: after 3 failures under ``10/1h``, a change to
    ``4/1h`` leaves 1 token and the 4th failure trips. A new window starts full; a dropped one
    vanishes. Recent failures keep their times in the kept windows and count as never seen in a
    new one. At most *limit* recent failures are kept, the newest. *state* is not changed.
    """
    state = bytearray(state)
    refill(state, old, now)
    old_index = {rate.period: index for index, rate in enumerate(old)}
    with _view(state) as view:
        tokens = []
        for rate in new:
            index = old_index.get(rate.period)
            if index is None:
                tokens.append(float(rate.count))
                continue
            used = old[index].count - view[_TOKENS + index]
            tokens.append(min(float(rate.count), max(0.0, rate.count - used)))
        entries = _entries(view, len(old))
        head = _head(view)
    moved = [
        [
            entry[0],
            *(_NEVER if (i := old_index.get(r.period)) is None else entry[1 + i] for r in new),
        ]
        for entry in _newest(entries, limit)
    ]
    return _build(head, tokens, moved, len(new))


def merge(
    ours: UserState, theirs: UserState, rates: Sequence[Rate], now: float, limit: int
) -> None:
    """Add the failures counted in *theirs* to *ours* (both under *rates*), in place.

    For a user counted from full buckets since a start while the snapshot was still loading:
    the tokens used in each state are both used, and the recent failures of both are
    remembered (the later time where both remember one).
    """
    other = bytearray(theirs)
    refill(ours, rates, now)
    refill(other, rates, now)
    w = len(rates)
    with _view(ours) as mine, _view(other) as view:
        tokens = [
            max(0.0, mine[_TOKENS + i] + view[_TOKENS + i] - rate.count)
            for i, rate in enumerate(rates)
        ]
        known: dict[float, list[float]] = {entry[0]: entry for entry in _entries(view, w)}
        for entry in _entries(mine, w):
            before = known.get(entry[0])
            known[entry[0]] = (
                entry if before is None else [max(a, b) for a, b in zip(entry, before, strict=True)]
            )
        head = max(mine[_UPDATED], view[_UPDATED]), mine[_LAYOUT], mine[_FILED]
    ours[:] = _build(head, tokens, _newest(list(known.values()), limit), w)


def window_counts(state: UserState, rates: Sequence[Rate], now: float) -> tuple[int, ...]:
    """Distinct failures counted in each window within that window's period, as of *now*.

    Only the remembered recent failures are seen (at least the window's limit of them), which is
    every failure that still matters for a bucket that has not emptied.
    """
    with _view(state) as view:
        entries = _entries(view, len(rates))
    return tuple(
        sum(1 for entry in entries if now - entry[1 + index] < rate.period and entry[0] != WARNED)
        for index, rate in enumerate(rates)
    )


# -- the portable form, for the snapshot ---------------------------------------------------------


def export(state: UserState, rates: Sequence[Rate], now: float, shift: float) -> list[float]:
    """The portable form of *state*: failures out of every window left out, times + *shift*.

    "Never" stays never.
    """
    w = len(rates)
    with _view(state) as view:
        out = [view[_UPDATED] + shift, *view[_TOKENS : _TOKENS + w].tolist()]
        for entry in _live(_entries(view, w), rates, now):
            out.append(entry[0])
            out.extend(time if time == _NEVER else time + shift for time in entry[1:])
    return out


def import_state(
    values: Sequence[float], rates: Sequence[Rate], limit: int, *, shift: float, latest: float
) -> UserState:
    """A state from its portable form, times + *shift* and none later than *latest*.

    A time later than *latest* (saved while the wall clock was ahead) is taken as *latest*, so
    a clock put right does not leave buckets drained. At most *limit* failures are kept.

    Raises:
        ValueError: *values* is not a portable state for *rates* (says what is wrong).
    """
    w = len(rates)
    width = 1 + w
    values = list(values)
    if len(values) < 1 + w or (len(values) - 1 - w) % width:
        raise ValueError(f"{len(values)} values do not fit {w} window(s)")
    updated = values[0]
    if not math.isfinite(updated):
        raise ValueError("the update time is not a finite number")
    updated = min(updated + shift, latest)
    tokens = values[1 : 1 + w]
    for level, rate in zip(tokens, rates, strict=True):
        if not 0.0 <= level <= rate.count:
            raise ValueError(f"{level!r} tokens left is outside 0..{rate.count} for {rate}")
    entries: dict[float, list[float]] = {}
    for at in range(1 + w, len(values), width):
        entry = values[at : at + width]
        mark = entry[0]
        if not 1.0 <= mark <= _FINGERPRINT_MAX or mark != int(mark):
            raise ValueError(f"{mark!r} is not a recipient fingerprint")
        for index in range(1, width):
            time = entry[index]
            if time != _NEVER:
                if not math.isfinite(time):
                    raise ValueError(f"{time!r} is not a time")
                entry[index] = min(time + shift, updated)
        entries[mark] = entry
    return _build((updated, 0.0, math.nan), tokens, _newest(list(entries.values()), limit), w)
