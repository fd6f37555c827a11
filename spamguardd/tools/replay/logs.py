"""Reading Exim's logs for a replay: plain or gzip, one relay's or a fleet's, fed to the engine.

``replay()`` opens main and reject logs (in any order), merges them by time
(:mod:`~spamguardd.tools.replay.merge`) and feeds the events to a
:class:`~spamguardd.tools.replay.engine.Replayer`. A single file needs no merge and is read
straight through.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Final, TypeVar

import attrs

from spamguardd.core.config import PolicyConfig
from spamguardd.tools.eximlog import ScanCounts, SkipTest, UserKeys, scan, stamp_seconds
from spamguardd.tools.replay.engine import Candidate, RelayLines, Replayer, Report
from spamguardd.tools.replay.merge import Horizon, merge, read_events

T = TypeVar("T")

#: Unparsed lines quoted in the summary.
UNPARSED_EXAMPLES: Final = 5
#: Allocations between the garbage collector's young collections while a replay runs (Python's
#: default is 700). Every line allocates, few objects live long and none form cycles to speak
#: of: with the default, collecting took a fifth of a spam wave's replay (docs/performance.md).
GC_YOUNG_THRESHOLD: Final = 100_000
_PROGRESS_LINES: Final = 200_000


def open_log(path: Path) -> IO[str]:
    """Open a log, plain or gzip (by its magic bytes, so a renamed file still reads)."""
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return path.open(encoding="utf-8", errors="surrogateescape")


def _reporting(events: Iterable[T], progress: IO[str]) -> Iterator[T]:
    """*events*, writing how many have passed, and how fast, to *progress* now and then."""
    started = time.monotonic()
    for n, event in enumerate(events, start=1):
        yield event
        if n % _PROGRESS_LINES == 0:
            rate = n / max(time.monotonic() - started, 1e-9)
            progress.write(f"\rreplay: {n:,} events, {rate:,.0f}/s")
            progress.flush()


@attrs.frozen
class RelayLogs:
    """The logs of one relay of a fleet. Exim's message ids are unique per host only, so each
    relay's messages are kept apart; its users are everyone's (the fleet shares its limits)."""

    name: str
    paths: tuple[Path, ...]


def replay(
    logs: Sequence[Path | RelayLogs],
    config: PolicyConfig,
    candidates: Sequence[Candidate],
    keys: UserKeys,
    *,
    progress: IO[str] | None = None,
) -> Report:
    """Replay *logs* and report what each candidate would have done.

    Plain paths are the logs of one relay; each :class:`RelayLogs` is a relay of its own. All
    are merged by time and fed to one engine, so that a fleet's limits are tried on the
    fleet's traffic.
    """
    plain = tuple(log for log in logs if isinstance(log, Path))
    relays = ([RelayLogs("", plain)] if plain else []) + [
        log for log in logs if isinstance(log, RelayLogs)
    ]
    replayer = Replayer(config, candidates, keys, relays=len(relays))
    report = replayer.report
    counts = [ScanCounts(UNPARSED_EXAMPLES) for _ in relays]
    horizons = [Horizon() for _ in relays]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_collecting_less())
        files = [
            (relay, stack.enter_context(open_log(path)))
            for relay, logs_of_relay in enumerate(relays)
            for path in logs_of_relay.paths
        ]
        if len(files) == 1:  # nothing to merge: the stream decides alone, always
            relay, file = files[0]
            events = scan(file, counts[relay], replayer.skip_test(relay))
            replayer.feed_all(events if progress is None else _reporting(events, progress))
        else:
            streams = [
                read_events(file, counts[relay], i, _skip_before(horizons[relay], replayer, relay))
                for i, (relay, file) in enumerate(files)
            ]
            merged = merge(streams, [relay for relay, _ in files], horizons)
            replayer.feed_merged(merged if progress is None else _reporting(merged, progress))
    report.lines_read = sum(count.lines for count in counts)
    report.unparsed = sum(count.unparsed for count in counts)
    report.unparsed_examples = [x for count in counts for x in count.examples][:UNPARSED_EXAMPLES]
    report.zoned = any(count.zoned for count in counts)
    if any(relay.name for relay in relays):
        report.relays = [
            RelayLines(relay.name, count.lines, count.unparsed, count.zoned)
            for relay, count in zip(relays, counts, strict=True)
        ]
    if progress is not None:
        progress.write("\n")
    return report


@contextlib.contextmanager
def _collecting_less() -> Iterator[None]:
    """Raise the collector's young threshold to :data:`GC_YOUNG_THRESHOLD` meanwhile."""
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), *older)
    try:
        yield
    finally:
        gc.set_threshold(young, *older)


def _skip_before(horizon: Horizon, replayer: Replayer, relay: int) -> SkipTest:
    """The skip test of a merged stream: the relay's own, for lines before its horizon."""
    consume = replayer.skip_test(relay)

    def skip(line: str, end: int, flag: str) -> bool:
        try:
            at = stamp_seconds(line[:19])
        except ValueError:
            return False  # parsed, found damaged, counted
        return at < horizon.until and consume(line, end, flag)

    return skip
