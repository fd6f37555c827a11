"""Reading Exim's logs for a replay: plain or gzip, several merged by time, fed to the engine.

``replay()`` reads main and reject logs (in any order), merges them by time and feeds the
events to a :class:`~spamguardd.tools.replay.engine.Replayer`. With several files a heap merge
orders them; a stream may skip a message line the replay has no use for only while every
other stream's next line is later, so that the replay's state is current for it.
"""

from __future__ import annotations

import gzip
import heapq
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Final

from spamguardd.core.config import PolicyConfig
from spamguardd.tools.eximlog import (
    Event,
    Rejection,
    ScanCounts,
    SkipTest,
    UserKeys,
    scan,
    stamp_seconds,
)
from spamguardd.tools.replay.engine import Candidate, Replayer, Report

#: Unparsed lines quoted in the summary.
UNPARSED_EXAMPLES: Final = 5
_PROGRESS_LINES: Final = 200_000


def open_log(path: Path) -> IO[str]:
    """Open a log, plain or gzip (by its magic bytes, so a renamed file still reads)."""
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return path.open(encoding="utf-8", errors="surrogateescape")


_Item = tuple[float, int, int, Event]


class _Horizon:
    """Until when a stream may decide alone that a line is of no use (see :func:`merge`)."""

    def __init__(self) -> None:
        self.until = math.inf


def read_events(
    file: IO[str], counts: ScanCounts, index: int, skip: SkipTest | None = None
) -> Iterator[_Item]:
    """The events of one log as ``(time, file index, n, event)``, ready for :func:`merge`."""
    for n, event in enumerate(scan(file, counts, skip)):
        yield event.at, index, n, event


def merge(streams: Sequence[Iterator[_Item]], horizon: _Horizon | None = None) -> Iterator[Event]:
    """Merge per-file event streams by time (a heap merge); equal times keep file order.

    Before a stream is advanced, *horizon* is set to the time of the next item of the other
    streams: lines before it are fed before anything else, so the stream may skip those the
    replay has no use for, knowing the replay's state is current.

    The same rejection written to a main log and its reject log is kept once: at each time, a
    rejection line already seen in another file cancels one copy.
    """
    horizon = horizon or _Horizon()
    heap: list[tuple[_Item, int]] = []
    for i, stream in enumerate(streams):
        horizon.until = -math.inf  # nothing is fed yet: skip nothing
        item = next(stream, None)
        if item is not None:
            heap.append((item, i))
    heapq.heapify(heap)
    pending: dict[tuple[str, str | None, str], list[int]] = {}
    current = -math.inf
    while heap:
        (at, index, _, event), i = heap[0]
        duplicate = False
        if isinstance(event, Rejection):
            if at != current:
                pending.clear()
                current = at
            key = (event.rcpt, event.auth_id, event.reason)
            copies = pending.setdefault(key, [])
            twin = next((j for j, other in enumerate(copies) if other != index), None)
            if twin is not None:
                del copies[twin]
                duplicate = True
            else:
                copies.append(index)
        if not duplicate:
            yield event
        heapq.heappop(heap)
        horizon.until = heap[0][0][0] if heap else math.inf
        item = next(streams[i], None)
        if item is not None:
            heapq.heappush(heap, (item, i))


def _reporting(events: Iterable[Event], progress: IO[str]) -> Iterator[Event]:
    """*events*, writing how many have passed, and how fast, to *progress* now and then."""
    started = time.monotonic()
    for n, event in enumerate(events, start=1):
        yield event
        if n % _PROGRESS_LINES == 0:
            rate = n / max(time.monotonic() - started, 1e-9)
            progress.write(f"\rreplay: {n:,} events, {rate:,.0f}/s")
            progress.flush()


def replay(
    paths: Sequence[Path],
    config: PolicyConfig,
    candidates: Sequence[Candidate],
    keys: UserKeys,
    *,
    progress: IO[str] | None = None,
) -> Report:
    """Replay the logs at *paths* and report what each candidate would have done."""
    replayer = Replayer(config, candidates, keys)
    report = replayer.report
    horizon = _Horizon()

    consume = replayer.consume

    def skip(line: str, end: int, flag: str) -> bool:
        try:
            at = stamp_seconds(line[:19])
        except ValueError:
            return False  # parsed, found damaged, counted
        return at < horizon.until and consume(line, end, flag)

    counts = ScanCounts(UNPARSED_EXAMPLES)
    files = [open_log(path) for path in paths]
    try:
        if len(files) == 1:  # nothing to merge: the stream decides alone, always
            events = scan(files[0], counts, replayer.consume)
        else:
            streams = [read_events(file, counts, i, skip) for i, file in enumerate(files)]
            events = merge(streams, horizon)
        replayer.feed_all(events if progress is None else _reporting(events, progress))
    finally:
        for file in files:
            file.close()
    report.lines_read = counts.lines
    report.unparsed = counts.unparsed
    report.unparsed_examples = counts.examples
    report.zoned = counts.zoned
    if progress is not None:
        progress.write("\n")
    return report
