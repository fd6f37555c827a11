"""Reading Exim's logs for a replay: plain or compressed, one relay's or a fleet's, to the engine.

``replay()`` opens main and reject logs (in any order), merges them by time
(:mod:`~spamguardd.tools.replay.merge`) and feeds the events to a
:class:`~spamguardd.tools.replay.engine.Replayer`. A single file needs no merge and is read
straight through.

A log is read once, front to back, so a pipe serves as well as a file (``-`` is standard
input): ``zcat``, ``ssh relay cat ...`` and process substitutions are an admin's habits. Its
format (plain, gzip, bzip2, xz) is told by its first bytes, which are kept and given again to
the reader rather than re-read from the start, since a pipe cannot seek back.
"""

from __future__ import annotations

import bz2
import contextlib
import gc
import gzip
import io
import lzma
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, TypeVar

import attrs

from spamguardd.core.config import PolicyConfig
from spamguardd.core.notice import printable
from spamguardd.tools.eximlog import ScanCounts, SkipTest, UserKeys, scan, stamp_seconds
from spamguardd.tools.replay.engine import Candidate, RelayLines, Replayer, Report
from spamguardd.tools.replay.merge import Horizon, merge, read_events

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

T = TypeVar("T")

#: Unparsed lines quoted in the summary.
UNPARSED_EXAMPLES: Final = 5
#: Allocations between the garbage collector's young collections while a replay runs (Python's
#: default is 700). Every line allocates, few objects live long and none form cycles to speak
#: of: with the default, collecting took a fifth of a spam wave's replay (docs/performance.md).
GC_YOUNG_THRESHOLD: Final = 100_000
_PROGRESS_LINES: Final = 200_000

#: The ``LOGFILE`` that stands for standard input.
STDIN: Final = "-"
#: How standard input is named in messages and in ``FILE:LINE``.
STDIN_NAME: Final = "<stdin>"
#: The first bytes read to tell a log's format: enough for the longest magic (xz's).
_HEAD: Final = 6
_GZIP: Final = b"\x1f\x8b"
_BZIP2: Final = b"BZh"
_XZ: Final = b"\xfd7zXZ\x00"
_ZSTD: Final = b"\x28\xb5\x2f\xfd"


class LogError(Exception):
    """A log that cannot be replayed. The message names the file and says what is wrong."""


def log_name(path: Path) -> str:
    """*path* as messages name it: as given, or :data:`STDIN_NAME` for ``-``."""
    return STDIN_NAME if str(path) == STDIN else str(path)


class _Source(io.RawIOBase):
    """A file's bytes from the start: *head* (read to tell the format) first, then the rest.

    The head is not read again from the file: a pipe cannot seek back, and a second ``open``
    of ``/dev/fd/N`` would start after what the first had read ahead.
    """

    def __init__(self, raw: io.FileIO, head: bytes, name: str) -> None:
        super().__init__()
        self._raw = raw
        self._head = head
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._head:
            n = min(len(self._head), memoryview(buffer).nbytes)
            memoryview(buffer).cast("B")[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        try:
            return self._raw.readinto(buffer) or 0
        except OSError as exc:
            raise LogError(f"{self._name}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Decompressed(io.RawIOBase):
    """The data of a compressed log, ending where the compressed data does.

    A file cut short (copied while logrotate compressed it) ends at what could be read, and
    says so in :attr:`cut`, as a plain log copied while Exim wrote it ends at its last line.
    Damaged data (a bad CRC, a header that is not the format's) stops the replay with a
    :class:`LogError` naming the file: what was read of it may be wrong already.
    """

    def __init__(self, stream: io.BufferedIOBase, source: IO[bytes], name: str, kind: str) -> None:
        super().__init__()
        self._stream = stream
        self._source = source  # the decompressors leave a file object they were given open
        self._name = name
        self._kind = kind
        #: Whether the compressed data ended before its end-of-stream marker.
        self.cut = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.cut:
            return 0
        try:
            return self._stream.readinto(buffer)
        except EOFError:
            self.cut = True
            return 0
        except (OSError, zlib.error, lzma.LZMAError) as exc:
            raise LogError(f"{self._name}: damaged {self._kind} data: {exc}") from exc

    def close(self) -> None:
        self._stream.close()
        self._source.close()
        super().close()


def _read_head(raw: io.FileIO) -> bytes:
    head = b""
    while len(head) < _HEAD:
        chunk = raw.read(_HEAD - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _decompressor(
    head: bytes, name: str
) -> tuple[str, Callable[[IO[bytes]], io.BufferedIOBase]] | None:
    """The compression *head* (a log's first bytes) shows, and how to read it; None: plain."""
    if head.startswith(_GZIP):
        if len(head) >= 4 and (head[2] != 8 or head[3] & 0xE0):  # deflate, no reserved flags
            raise LogError(f"{name}: not gzip data: it starts like gzip, but its header is not")
        return "gzip", lambda binary: gzip.GzipFile(fileobj=binary, mode="rb")
    if head.startswith(_BZIP2) and head[3:4].isdigit():
        return "bzip2", bz2.BZ2File
    if head.startswith(_XZ):
        return "xz", lzma.LZMAFile
    if head.startswith(_ZSTD):
        raise LogError(
            f"{name}: zstd-compressed, which cannot be read here; give it decompressed"
            f" (zstdcat {name} | spamguardctl replay ... -)"
        )
    return None


@attrs.define
class _Log:
    """One log of a replay, open, with what was read of it."""

    name: str
    relay: int
    file: IO[str]
    counts: ScanCounts
    #: The compression, and the reader that notices a cut ("", None: a plain log).
    kind: str = ""
    decompressed: _Decompressed | None = None


def _open(path: Path, relay: int) -> _Log:
    """Open *path* (``-``: standard input), plain or compressed, told by its first bytes (so a
    renamed file still reads). Raises OSError (naming the file) or :class:`LogError`."""
    name = log_name(path)
    if str(path) == STDIN:
        if sys.stdin is None:
            raise LogError(f"{name}: there is no standard input")
        raw = io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
    else:
        raw = io.FileIO(path, "rb")
    try:
        head = _read_head(raw)
        binary: IO[bytes] = io.BufferedReader(_Source(raw, head, name))
        found = _decompressor(head, name)
    except BaseException:
        raw.close()
        raise
    counts = ScanCounts(UNPARSED_EXAMPLES)
    if found is None:
        return _Log(name, relay, _text(binary), counts)
    kind, decompress = found
    decompressed = _Decompressed(decompress(binary), binary, name, kind)
    return _Log(name, relay, _text(io.BufferedReader(decompressed)), counts, kind, decompressed)


def _text(binary: IO[bytes]) -> IO[str]:
    """*binary* as text, as ``open()`` reads a log: UTF-8, other bytes kept as surrogates."""
    return io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape")


def open_log(path: Path) -> IO[str]:
    """Open a log as text: plain, gzip, bzip2 or xz (by its first bytes); ``-`` is stdin."""
    return _open(path, 0).file


def given_twice(sources: Sequence[Path | RelayLogs]) -> str | None:
    """What is wrong if a log is given twice, by the same name or another (a hard or symbolic
    link, ``-`` and ``/dev/stdin``), across relays too: its lines would be counted twice."""
    seen: dict[tuple[int, int], str] = {}
    names: set[str] = set()
    for source in sources:
        for path in source.paths if isinstance(source, RelayLogs) else (source,):
            given = str(path)
            if given in names:
                if given == STDIN:
                    return "- (standard input) is given twice; it can be read once"
                return f"{given} is given twice; its lines would be counted twice"
            names.add(given)
            try:
                stat = os.fstat(sys.stdin.fileno()) if given == STDIN else path.stat()
            except (OSError, ValueError, AttributeError):
                continue  # a file that cannot be read is said when it is opened
            first = seen.setdefault((stat.st_dev, stat.st_ino), given)
            if first != given:
                return f"{first} and {given} are the same file; its lines would be counted twice"
    return None


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


def replay(  # noqa: PLR0913 - keyword-only: where progress and warnings go
    logs: Sequence[Path | RelayLogs],
    config: PolicyConfig,
    candidates: Sequence[Candidate],
    keys: UserKeys,
    *,
    progress: IO[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Report:
    """Replay *logs* and report what each candidate would have done.

    Plain paths are the logs of one relay; each :class:`RelayLogs` is a relay of its own. All
    are merged by time and fed to one engine, so that a fleet's limits are tried on the
    fleet's traffic. ``-`` is standard input. A compressed log cut short is replayed as far as
    it goes and *warn* is told (``FILE: ...``); one that cannot be read raises OSError or
    :class:`LogError`, naming it.
    """
    plain = tuple(log for log in logs if isinstance(log, Path))
    relays = ([RelayLogs("", plain)] if plain else []) + [
        log for log in logs if isinstance(log, RelayLogs)
    ]
    replayer = Replayer(config, candidates, keys, relays=len(relays))
    report = replayer.report
    horizons = [Horizon() for _ in relays]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_collecting_less())
        files = [
            stack.enter_context(_closing(_open(path, relay)))
            for relay, logs_of_relay in enumerate(relays)
            for path in logs_of_relay.paths
        ]
        if len(files) == 1:  # nothing to merge: the stream decides alone, always
            (log,) = files
            events = scan(log.file, log.counts, replayer.skip_test(log.relay))
            replayer.feed_all(events if progress is None else _reporting(events, progress))
        else:
            streams = [
                read_events(
                    log.file, log.counts, i, _skip_before(horizons[log.relay], replayer, log.relay)
                )
                for i, log in enumerate(files)
            ]
            merged = merge(streams, [log.relay for log in files], horizons)
            replayer.feed_merged(merged if progress is None else _reporting(merged, progress))
    if progress is not None:
        progress.write("\n")
    report.lines_read = sum(log.counts.lines for log in files)
    report.unparsed = sum(log.counts.unparsed for log in files)
    report.unparsed_examples = [
        f"{log.name}:{n}: {printable(text)}"
        for log in files
        for n, text in zip(log.counts.example_lines, log.counts.examples, strict=True)
    ][:UNPARSED_EXAMPLES]
    report.zoned = any(log.counts.zoned for log in files)
    if any(relay.name for relay in relays):
        report.relays = [
            RelayLines(
                relay.name,
                sum(log.counts.lines for log in files if log.relay == i),
                sum(log.counts.unparsed for log in files if log.relay == i),
                any(log.counts.zoned for log in files if log.relay == i),
            )
            for i, relay in enumerate(relays)
        ]
    for log in files:
        if log.decompressed is not None and log.decompressed.cut and warn is not None:
            warn(
                f"{log.name}: {log.kind} data ends early (cut while it was written or copied):"
                f" replayed the {log.counts.lines:,} lines before"
            )
    return report


@contextlib.contextmanager
def _closing(log: _Log) -> Iterator[_Log]:
    with log.file:
        yield log


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
