"""Merging several Exim logs by time, for one relay or a fleet of them.

Each log is a stream of ``(time, stream index, n, event)`` items; :func:`merge` orders them
with a heap (equal times keep the order of the streams) and gives each event with the index of
its relay. Two things make it more than a heap merge:

* **Twins.** Exim writes a rejection to the main log and again to the reject log. At each
  time, a rejection already seen in another stream of the same relay cancels one copy. Two
  relays rejecting the same recipient of the same user at the same second are two failures.
* **Horizons.** A stream skips the message lines the replay has no use for while it reads
  them (:data:`~spamguardd.tools.eximlog.SkipTest`), which is only right once everything
  before them that could change the replay's state has been fed. A message line depends only
  on its own relay's messages, so before a stream is advanced its relay's horizon is set to
  the time of the next item of that relay's other streams: lines before it may be skipped.
  The relays of a fleet run side by side without holding each other back.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from typing import IO

from spamguardd.tools.eximlog import Event, Rejection, ScanCounts, SkipTest, scan

Item = tuple[float, int, int, Event]


class Horizon:
    """Until when a relay's streams may decide alone that a line is of no use."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = math.inf


def read_events(
    file: IO[str], counts: ScanCounts, index: int, skip: SkipTest | None = None
) -> Iterator[Item]:
    """The events of one log as ``(time, stream index, n, event)``, ready for :func:`merge`."""
    for n, event in enumerate(scan(file, counts, skip)):
        yield event.at, index, n, event


def merge(
    streams: Sequence[Iterator[Item]],
    relays: Sequence[int] | None = None,
    horizons: Sequence[Horizon] | None = None,
) -> Iterator[tuple[int, Event]]:
    """Merge *streams* by time; yield ``(relay index, event)``.

    Args:
        streams: one per log, each in its own time order.
        relays: the relay index of each stream (default: all of relay 0).
        horizons: one per relay, set before each stream is advanced (see the module
            docstring); the streams' skip tests read them.
    """
    relays = relays if relays is not None else [0] * len(streams)
    horizons = horizons or [Horizon() for _ in range(max(relays, default=-1) + 1)]
    siblings = [[j for j, other in enumerate(relays) if other == relay] for relay in relays]
    heads = [math.inf] * len(streams)  # the time of each stream's item in the heap
    heap: list[tuple[Item, int]] = []
    for horizon in horizons:
        horizon.until = -math.inf  # nothing is fed yet: skip nothing
    for i, stream in enumerate(streams):
        item = next(stream, None)
        if item is not None:
            heap.append((item, i))
            heads[i] = item[0]
    heapq.heapify(heap)
    pending: dict[tuple[int, str, str | None, str], list[int]] = {}
    current = -math.inf
    while heap:
        (at, index, _, event), i = heap[0]
        relay = relays[i]
        duplicate = False
        if isinstance(event, Rejection):
            if at != current:
                pending.clear()
                current = at
            copies = pending.setdefault((relay, event.rcpt, event.auth_id, event.reason), [])
            twin = next((j for j, other in enumerate(copies) if other != index), None)
            if twin is not None:
                del copies[twin]
                duplicate = True
            else:
                copies.append(index)
        if not duplicate:
            yield relay, event
        heapq.heappop(heap)
        heads[i] = math.inf
        horizons[relay].until = min([heads[j] for j in siblings[i]])
        item = next(streams[i], None)
        if item is not None:
            heapq.heappush(heap, (item, i))
            heads[i] = item[0]
