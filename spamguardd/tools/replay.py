"""Replay Exim's logs through the policy: whom a limit would have blocked, how close the rest came.

``spamguardctl replay [--config FILE] [--limit RATE ...] [--relay-net CIDR ...] [--json]
[--html REPORT.html] LOGFILE...`` reads main and reject logs (plain or gzip, in any order), merges
them by time, and feeds every failed recipient of a countable user to one :class:`Policy` per
candidate limit, with the log's times as ``now``: the same code, limits, overrides, exemptions and
de-duplication as the daemon. Memory follows the users, not the log: the only other state is the
map from message id to sender, which forgets a message at ``Completed`` and is bounded.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import gzip
import heapq
import html
import ipaddress
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Final

import attrs

from spamguardd.core.config import Config, Mode, PolicyConfig, load_config
from spamguardd.core.errors import ConfigError
from spamguardd.core.policy import Blocked, Policy
from spamguardd.core.protocol import IPAddress, RcptRequest, Verify
from spamguardd.core.rate import Rate, format_duration
from spamguardd.tools.eximlog import (
    Arrival,
    Delivery,
    Event,
    Network,
    Rejection,
    ScanCounts,
    SkipTest,
    UserKeys,
    scan,
    stamp_seconds,
)

#: Messages whose sender is remembered until their ``Completed`` line. A message stays in the
#: queue at most ``timeout_frozen_after``/retry time; 200,000 is days of a busy relay's
#: traffic, about 40 MB. Past it the oldest are forgotten (their later ``**`` lines are then
#: not tied to a user).
MAX_MESSAGES: Final = 200_000
#: Failure times kept per blocked user for the HTML timeline (the most recent). Only blocked
#: users get one: everyone else's recent failures live in the sliding windows of the peaks.
TIMELINE_POINTS: Final = 2_000
#: Unparsed lines quoted in the summary.
UNPARSED_EXAMPLES: Final = 5
#: Seconds of log time between sweeps of idle users out of each policy.
SWEEP_INTERVAL: Final = 600.0
_PROGRESS_LINES: Final = 200_000


@attrs.frozen
class Candidate:
    """One set of limits to try: a ``--limit`` (``100/1h`` or ``100/1h,300/1d``) or the config's."""

    label: str
    rates: tuple[Rate, ...]

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """Parse ``RATE[,RATE...]``.

        Raises:
            ValueError: a part is not a rate, or two share a period.
        """
        rates = tuple(Rate.parse(part) for part in text.split(","))
        if len({rate.period for rate in rates}) != len(rates):
            raise ValueError(f"two rates with the same period (got {text!r})")
        return cls(",".join(map(str, rates)), rates)


@attrs.define
class BlockRecord:
    """A user the candidate would have blocked."""

    user: str
    at: float
    failures: int
    frozen_after: int = 0
    reason: str = ""


@attrs.define
class CandidateResult:
    """What one candidate limit would have done."""

    candidate: Candidate
    policy: Policy
    blocked: dict[str, BlockRecord] = attrs.field(factory=dict)


@attrs.define
class _Peak:
    """Sliding-window count of one user's failures in one window (repeats within it count once)."""

    times: collections.deque[float] = attrs.field(factory=collections.deque)
    last: dict[str, float] = attrs.field(factory=dict)
    peak: int = 0


@attrs.define
class Report:
    """Everything a replay found."""

    results: list[CandidateResult]
    windows: tuple[int, ...]
    peaks: dict[str, dict[int, int]] = attrs.field(factory=dict)
    timelines: dict[str, collections.deque[float]] = attrs.field(factory=dict)
    lines_read: int = 0
    unparsed: int = 0
    unparsed_examples: list[str] = attrs.field(factory=list)
    failures: int = 0
    zoned: bool = False


class Replayer:
    """Feeds events, in time order, to one policy per candidate. Pure apart from being stateful.

    Invariants: a message id is in ``_messages`` from its ``<=`` until its ``Completed`` (or until
    :data:`MAX_MESSAGES` newer ones push it out); a user is in ``blocked`` of a candidate from the
    failure that tripped it on, and every later recipient of a message received afterwards adds
    one to ``frozen_after``.
    """

    def __init__(
        self, config: PolicyConfig, candidates: Sequence[Candidate], keys: UserKeys
    ) -> None:
        base = attrs.evolve(config, mode=Mode.ENFORCE)
        self.keys = keys
        self.count_defer = config.count_defer
        results = [
            CandidateResult(c, Policy(attrs.evolve(base, failed_recipients=c.rates)))
            for c in candidates
        ]
        periods = {rate.period for c in candidates for rate in c.rates}
        periods.update(rate.period for rates in config.overrides.values() for rate in rates)
        self.report = Report(results=results, windows=tuple(sorted(periods)))
        # message id -> (user key, client address, whether it arrived after the user's block,
        # per candidate)
        self._messages: dict[str, tuple[str, str | None, tuple[bool, ...]]] = {}
        self._failures_seen: dict[str, int] = {}
        self._next_sweep = -float("inf")
        self._peak_state: dict[str, dict[int, _Peak]] = {}
        self._frozen_messages: set[str] = set()
        self._blocked_somewhere: set[str] = set()
        self._never_frozen = (False,) * len(results)

    def consume(self, stamp: str, message_id: str, flag: str) -> bool:  # noqa: ARG002 - SkipTest
        """Deal with a message line without parsing it, if it can be; False if it must be parsed.

        *flag* is ``=>``, ``->``, ``**`` or ``Co`` (``Completed``). Only ``**`` lines of messages
        from counted users need their recipient; the rest need only the message id. The caller
        must pass lines in time order relative to everything already fed.
        """
        if flag == "=>" or flag == "->":  # noqa: PLR1714 - the commonest test first, no tuple
            if message_id in self._frozen_messages:
                self._count_frozen(message_id)
            return True
        if flag == "Co":
            if self._messages.pop(message_id, None) is not None:
                self._frozen_messages.discard(message_id)
            return True
        return message_id not in self._messages  # "**": parsed only for counted users

    def _forget(self, message_id: str) -> None:
        self._messages.pop(message_id, None)
        self._frozen_messages.discard(message_id)

    def _count_frozen(self, message_id: str) -> None:
        user, _, frozen = self._messages[message_id]
        for result, is_frozen in zip(self.report.results, frozen, strict=True):
            if is_frozen:
                result.blocked[user].frozen_after += 1

    def feed(self, event: Event) -> None:
        """Account for one event (events must come in time order, as :func:`merge` gives)."""
        if isinstance(event, Rejection):
            self._rejection(event)
        elif isinstance(event, Delivery):
            self._delivery(event)
        elif isinstance(event, Arrival):
            self._arrival(event)
        else:
            self._forget(event.message_id)

    def _rejection(self, event: Rejection) -> None:
        if event.null_sender:
            return  # bounces are neither verified nor counted by the shipped ACL
        if event.verify_failed and (not event.temporary or self.count_defer):
            user = self.keys.key(event.auth_id, event.host)
            if user is not None:
                verify = Verify.DEFER if event.temporary else Verify.FAIL
                self._failure(user, event.rcpt, event.host, event.at, verify)

    def _delivery(self, event: Delivery) -> None:
        known = self._messages.get(event.message_id)
        if known is None:
            return  # not from a countable user, or received before the logs start
        user, host, frozen = known
        if any(frozen):
            self._count_frozen(event.message_id)
        if event.by_transport:  # what the shipped event_action reports (msg:fail:delivery)
            self._failure(user, event.rcpt, host, event.at, Verify.FAIL)

    def _arrival(self, event: Arrival) -> None:
        user = None if event.null_sender else self.keys.key(event.auth_id, event.host)
        if user is None:
            return
        frozen = (
            tuple([user in result.blocked for result in self.report.results])
            if user in self._blocked_somewhere
            else self._never_frozen
        )
        messages = self._messages
        messages[event.message_id] = (user, event.host, frozen)
        if any(frozen):
            self._frozen_messages.add(event.message_id)
        if len(messages) > MAX_MESSAGES:
            oldest = next(iter(messages))
            del messages[oldest]
            self._frozen_messages.discard(oldest)

    def _failure(self, user: str, rcpt: str, host: str | None, at: float, verify: Verify) -> None:
        report = self.report
        report.failures += 1
        seen = self._failures_seen.get(user, 0) + 1
        self._failures_seen[user] = seen
        request = RcptRequest(user=user, rcpt=rcpt, verify=verify, ip=_ip(host))
        if at >= self._next_sweep:
            for result in report.results:
                result.policy.forget_idle(at)
            self._next_sweep = at + SWEEP_INTERVAL
        self._peaks(user, rcpt, at)
        timeline = report.timelines.get(user)
        if timeline is not None:
            timeline.append(at)
        for result in report.results:
            decision = result.policy.decide(request, now=at, wall_now=at)
            for effect in decision.effects:
                if isinstance(effect, Blocked):
                    result.blocked[user] = BlockRecord(user, at, seen, reason=effect.block.reason)
                    self._blocked_somewhere.add(user)
                    if user not in report.timelines:
                        # the failures that led to the block are the longest window's; from
                        # now on every failure of the user is kept
                        windows = self._peak_state[user]
                        recent = windows[max(windows)].times
                        report.timelines[user] = collections.deque(recent, maxlen=TIMELINE_POINTS)

    def _peaks(self, user: str, rcpt: str, at: float) -> None:
        per_user = self.report.peaks.setdefault(user, {})
        windows = self._peak_state.setdefault(user, {})
        for period in self.report.windows:
            state = windows.get(period)
            if state is None:
                state = windows[period] = _Peak()
            last = state.last.get(rcpt)
            if last is not None and at - last < period:
                continue  # a repeat within the window: the policy does not count it either
            state.last[rcpt] = at
            times = state.times
            times.append(at)
            while times and times[0] <= at - period:
                times.popleft()
            if len(state.last) > 2 * len(times) + 32:
                state.last = {r: t for r, t in state.last.items() if at - t < period}
            state.peak = max(state.peak, len(times))
            per_user[period] = state.peak


@functools.lru_cache(maxsize=65536)
def _ip(host: str | None) -> IPAddress | None:
    """The client address for exemptions by network (cached: a client sends many failures)."""
    if host is None:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Reading


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

    def skip(stamp: str, message_id: str, flag: str) -> bool:
        try:
            at = stamp_seconds(stamp)
        except ValueError:
            return False  # parsed, found damaged, counted
        return at < horizon.until and consume(stamp, message_id, flag)

    counts = ScanCounts(UNPARSED_EXAMPLES)
    files = [open_log(path) for path in paths]
    try:
        if len(files) == 1:  # nothing to merge: the stream decides alone, always
            events = scan(files[0], counts, replayer.consume)
        else:
            streams = [read_events(file, counts, i, skip) for i, file in enumerate(files)]
            events = merge(streams, horizon)
        started = time.monotonic()
        for n, event in enumerate(events, start=1):
            replayer.feed(event)
            if progress is not None and n % _PROGRESS_LINES == 0:
                rate = n / max(time.monotonic() - started, 1e-9)
                progress.write(f"\rreplay: {n:,} events, {rate:,.0f}/s")
                progress.flush()
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


# ---------------------------------------------------------------------------------------------
# Output


def _iso(at: float, *, zoned: bool) -> str:
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    text = moment.replace(tzinfo=None).isoformat(timespec="seconds")
    return text + "Z" if zoned else text


def to_json(report: Report) -> dict[str, object]:
    """The ``--json`` document (schema in docs/tuning.md)."""
    limits = []
    for result in report.results:
        blocked = sorted(result.blocked.values(), key=lambda b: (b.at, b.user))
        limits.append(
            {
                "limit": result.candidate.label,
                "blocked": [
                    {
                        "user": b.user,
                        "at": _iso(b.at, zoned=report.zoned),
                        "failures": b.failures,
                        "frozen_after": b.frozen_after,
                        "reason": b.reason,
                    }
                    for b in blocked
                ],
            }
        )
    return {
        "limits": limits,
        "peaks": {
            user: {format_duration(period): n for period, n in sorted(per.items())}
            for user, per in sorted(report.peaks.items())
        },
        "lines": {
            "read": report.lines_read,
            "unparsed": report.unparsed,
            "unparsed_examples": report.unparsed_examples,
        },
        "failures": report.failures,
    }


def to_table(report: Report) -> str:
    """A readable summary: blocks per candidate, then the users who came closest."""
    out = [
        (
            f"lines read: {report.lines_read:,}, unparsed: {report.unparsed:,}, "
            f"failed recipients counted: {report.failures:,}"
        )
    ]
    out.extend(f"  unparsed: {example!r}" for example in report.unparsed_examples)
    for result in report.results:
        out.append("")
        out.append(f"limit {result.candidate.label}: {len(result.blocked)} user(s) blocked")
        if result.blocked:
            out.append(f"  {'user':<40} {'blocked at':<20} {'failures':>8} {'frozen after':>12}")
            for b in sorted(result.blocked.values(), key=lambda b: (b.at, b.user)):
                at = _iso(b.at, zoned=report.zoned)
                out.append(f"  {b.user:<40} {at:<20} {b.failures:>8} {b.frozen_after:>12}")
    if report.peaks:
        out.append("")
        heads = " ".join(f"{format_duration(p):>8}" for p in report.windows)
        out.append(f"peak failures per window (top 20)\n  {'user':<40} {heads}")
        top = sorted(report.peaks.items(), key=lambda item: (-max(item[1].values()), item[0]))
        for user, per in top[:20]:
            cells = " ".join(f"{per.get(p, 0):>8}" for p in report.windows)
            out.append(f"  {user:<40} {cells}")
    return "\n".join(out) + "\n"


def to_html(report: Report) -> str:
    """One self-contained page: a timeline per blocked user, and peaks against each limit."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>spamguardd replay</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em}"
            "svg{background:#fafafa;border:1px solid #ddd}</style></head><body>"
        ),
        "<h1>spamguardd replay</h1>",
        (
            f"<p>{report.lines_read:,} lines read, {report.unparsed:,} unparsed, "
            f"{report.failures:,} failed recipients.</p>"
        ),
    ]
    for result in report.results:
        label = esc(result.candidate.label)
        parts.append(f"<h2>limit {label}: {len(result.blocked)} blocked</h2>")
        for b in sorted(result.blocked.values(), key=lambda b: (b.at, b.user)):
            times = list(report.timelines.get(b.user, ()))
            parts.append(
                f"<h3>{esc(b.user)}</h3><p>blocked {esc(_iso(b.at, zoned=report.zoned))} "
                f"after {b.failures} failures; {b.frozen_after} later recipients frozen</p>"
            )
            parts.append(_timeline_svg(times, b.at, zoned=report.zoned))
        parts.append(_peaks_svg(report, result.candidate))
    parts.append("</body></html>\n")
    return "".join(parts)


def _timeline_svg(times: Sequence[float], block_at: float, *, zoned: bool) -> str:
    width, height, pad = 600, 75, 10
    if not times:
        return ""
    start, end = min(times[0], block_at), max(times[-1], block_at)
    span = max(end - start, 1.0)

    def x(t: float) -> float:
        return pad + (t - start) / span * (width - 2 * pad)

    marks = "".join(
        f"<line x1='{x(t):.1f}' y1='15' x2='{x(t):.1f}' y2='45' stroke='#36c'/>" for t in times
    )
    block = (
        f"<line x1='{x(block_at):.1f}' y1='5' x2='{x(block_at):.1f}' y2='55' "
        "stroke='#d00' stroke-width='3'><title>block</title></line>"
    )
    labels = (
        f"<text x='{pad}' y='70' font-size='10'>{_iso(start, zoned=zoned)}</text>"
        f"<text x='{width - pad}' y='70' font-size='10' text-anchor='end'>"
        f"{_iso(end, zoned=zoned)}</text>"
    )
    return f"<svg width='{width}' height='{height}' role='img'>{marks}{block}{labels}</svg>"


def _peaks_svg(report: Report, candidate: Candidate) -> str:
    """Per window of *candidate*: each user's peak as a bar, sorted, with the limit as a line."""
    out = []
    for rate in candidate.rates:
        peaks = sorted((per.get(rate.period, 0) for per in report.peaks.values()), reverse=True)[
            :200
        ]
        if not peaks:
            continue
        width, height, pad = 600, 160, 20
        top = max(*peaks, rate.count) * 1.1
        bar = (width - 2 * pad) / len(peaks)

        def y(n: float, top: float = top, height: int = height, pad: int = pad) -> float:
            return height - pad - n / top * (height - 2 * pad)

        bars = "".join(
            f"<rect x='{pad + i * bar:.1f}' y='{y(n):.1f}' width='{max(bar - 1, 1):.1f}' "
            f"height='{height - pad - y(n):.1f}' fill='{'#d00' if n >= rate.count else '#36c'}'/>"
            for i, n in enumerate(peaks)
        )
        limit = (
            f"<line x1='{pad}' x2='{width - pad}' y1='{y(rate.count):.1f}' "
            f"y2='{y(rate.count):.1f}' stroke='#000' stroke-dasharray='4'/>"
            f"<text x='{width - pad}' y='{y(rate.count) - 3:.1f}' text-anchor='end' "
            f"font-size='11'>limit {rate}</text>"
        )
        out.append(
            f"<h4>peak failures within {format_duration(rate.period)}, per user</h4>"
            f"<svg width='{width}' height='{height}' role='img'>{bars}{limit}</svg>"
        )
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamguardctl replay",
        description="Replay Exim main/reject logs through the policy to choose a limit.",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="spamguardd TOML (overrides, exemptions)"
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="RATE",
        help="candidate limit such as 100/1h (or 100/1h,300/1d); repeatable",
    )
    parser.add_argument(
        "--relay-net",
        action="append",
        default=[],
        metavar="CIDR",
        help="networks whose unauthenticated clients are counted by address; repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", type=Path, metavar="REPORT.html", help="write an HTML report")
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOGFILE")
    return parser


def replay_main(argv: Sequence[str] | None = None) -> int:
    """``spamguardctl replay``: exit 0, 1 (a log cannot be read), 2 (usage) or 78 (config)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config is not None else Config()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"spamguardctl replay: {problem}", file=sys.stderr)
        return 78
    try:
        candidates = [Candidate.parse(text) for text in args.limit] or [
            Candidate(
                ",".join(map(str, config.policy.failed_recipients)),
                config.policy.failed_recipients,
            )
        ]
        networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in args.relay_net]
    except ValueError as exc:
        parser.error(str(exc))
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        report = replay(args.logs, config.policy, candidates, UserKeys(networks), progress=progress)
    except OSError as exc:
        print(f"spamguardctl replay: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.html is not None:
        args.html.write_text(to_html(report), encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(to_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(to_table(report))
    return 0
