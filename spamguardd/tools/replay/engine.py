"""The replay engine: Exim log events, in time order, fed to one policy per candidate limit.

Every failed recipient of a countable user goes to one :class:`Policy` per candidate, with the
log's times as ``now``: the same code, limits, overrides, exemptions and de-duplication as the
daemon. Besides the policies the engine keeps what the report needs: whom each candidate
blocked and how many later recipients it would have frozen, every user's peak failures per
window, and the failure times of blocked users. Memory follows the users, not the log: the only
other state is the map from message id to sender, which forgets a message at ``Completed`` and
is bounded. Pure code: no file, no clock.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
from collections.abc import Sequence
from typing import Final

import attrs

from spamguardd.core.config import Mode, PolicyConfig
from spamguardd.core.policy import Blocked, Policy
from spamguardd.core.protocol import IPAddress, RcptRequest, Verify
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import Arrival, Delivery, Event, Rejection, UserKeys

#: Messages whose sender is remembered until their ``Completed`` line. A message stays in the
#: queue at most ``timeout_frozen_after``/retry time; 200,000 is days of a busy relay's
#: traffic, about 40 MB. Past it the oldest are forgotten (their later ``**`` lines are then
#: not tied to a user).
MAX_MESSAGES: Final = 200_000
#: Failure times kept per blocked user for the HTML timeline (the most recent). Only blocked
#: users get one: everyone else's recent failures live in the sliding windows of the peaks.
TIMELINE_POINTS: Final = 2_000
#: Seconds of log time between sweeps of idle users out of each policy.
SWEEP_INTERVAL: Final = 600.0


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
