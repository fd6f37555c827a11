"""The replay engine: Exim log events, in time order, fed to one policy per candidate limit.

Every failed recipient of a countable user goes to one :class:`Policy` per candidate, with the
log's times as ``now``: the same code, limits, overrides, exemptions and de-duplication as the
daemon. Besides the policies the engine keeps what the report needs: whom each candidate
blocked and how many later recipients it would have frozen, every user's peak failures per
window, and the failure times of blocked users. Memory follows the users, not the log: the only
other state is the map from message id to sender (one per relay: Exim's ids are unique per host
only), which forgets a message at ``Completed`` and is bounded. Pure code: no file, no clock.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Final

import attrs

from spamguardd.core.config import ACCEPTED_SUFFIX, Mode, PolicyConfig
from spamguardd.core.counters import SLOT
from spamguardd.core.expiry import expires
from spamguardd.core.policy import Block, Blocked, Effect, Failure, Policy, Warned
from spamguardd.core.protocol import IPAddress, RcptRequest, Verify
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import Arrival, Delivery, Event, Rejection, SkipTest, UserKeys
from spamguardd.tools.replay.peaks import UserPeaks

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
#: Failures held back, across users, before each user's are handed to the policies as a run
#: (:meth:`Policy.decide_failures`); they are handed over sooner when anything else needs the
#: user's blocks, and before every sweep. Bounds the memory they take (about 150 bytes each).
MAX_PENDING: Final = 65_536


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
    #: Blocks of the user in the replay: more than one when blocks expire (``block.expire``).
    blocks: int = 1
    #: When the user's last block lifts itself (log time); None: never.
    until: float | None = None


@attrs.define
class WarningRecord:
    """A user the candidate would have warned (``limits.warn_at``): the first warning."""

    user: str
    at: float
    limit: str
    counted: str
    #: Warnings in all, one per window and crossing.
    warnings: int = 1


@attrs.define
class CandidateResult:
    """What one candidate limit would have done."""

    candidate: Candidate
    policy: Policy
    blocked: dict[str, BlockRecord] = attrs.field(factory=dict)
    warned: dict[str, WarningRecord] = attrs.field(factory=dict)


@attrs.frozen
class RelayLines:
    """What was read of one relay's logs (a fleet's report lists them)."""

    name: str
    lines: int
    unparsed: int
    #: Whether its lines carried zones (``log_timezone``).
    zoned: bool


@attrs.define
class Report:
    """Everything a replay found."""

    results: list[CandidateResult]
    windows: tuple[int, ...]
    #: User -> period -> the most failures within any span of that length (live while fed).
    peaks: dict[str, UserPeaks] = attrs.field(factory=dict)
    timelines: dict[str, collections.deque[float]] = attrs.field(factory=dict)
    lines_read: int = 0
    unparsed: int = 0
    unparsed_examples: list[str] = attrs.field(factory=list)
    failures: int = 0
    zoned: bool = False
    #: The relays of a fleet, in the order given; empty for the logs of one unnamed relay.
    relays: list[RelayLines] = attrs.field(factory=list)
    #: Whether ``limits.warn_at`` was set (the report then lists warnings).
    warn: bool = False
    #: Whether the volume guard was on (the report then counts accepted recipients).
    volume: bool = False
    #: Accepted recipients fed to the volume guard.
    accepted: int = 0
    #: Users with their own limits on failed recipients (``[[override]]``), which the HTML
    #: compares their peaks with instead of the candidate's.
    overrides: dict[str, tuple[Rate, ...]] = attrs.field(factory=dict)


class Replayer:
    """Feeds events, in time order, to one policy per candidate. Pure apart from being stateful.

    Invariants: a user is in ``blocked`` of a candidate from the failure (or accepted
    recipient) that tripped it on, and every recipient of a message received afterwards, bounces
    too, or of the message whose recipient tripped the volume guard, adds one to
    ``frozen_after``;
    each relay's messages are its own (:class:`_Messages`), its users everyone's.
    """

    def __init__(
        self,
        config: PolicyConfig,
        candidates: Sequence[Candidate],
        keys: UserKeys,
        *,
        relays: int = 1,
    ) -> None:
        base = attrs.evolve(config, mode=Mode.ENFORCE)
        self.keys = keys
        self.count_defer = config.count_defer
        results = [
            CandidateResult(c, Policy(attrs.evolve(base, failed_recipients=c.rates)))
            for c in candidates
        ]
        periods = {rate.period for c in candidates for rate in c.rates}
        periods.update(
            rate.period
            for user, rates in config.overrides.items()
            if not user.endswith(ACCEPTED_SUFFIX)  # the volume guard's: no failure windows
            for rate in rates
        )
        self.report = Report(
            results=results,
            windows=tuple(sorted(periods)),
            warn=config.warn_at is not None,
            volume=config.volume_guard,
            overrides={
                user: rates
                for user, rates in config.overrides.items()
                if not user.endswith(ACCEPTED_SUFFIX)
            },
        )
        self._relays = [_Messages(results) for _ in range(relays)]
        self._users: dict[str, _User] = {}
        self._next_sweep = -float("inf")
        self._blocked_somewhere: set[str] = set()
        self._never_frozen = (False,) * len(results)
        # what a user's block is looked up in: the policy's own block list, which loses a user
        # when its block expires (result.blocked keeps every user blocked once, for the report)
        self._deciders = [
            (result, result.policy.blocks, result.policy.decide) for result in results
        ]
        #: Each candidate's limits, for the order in which its policy files users.
        self._configs = [attrs.evolve(base, failed_recipients=c.rates) for c in candidates]
        #: Every failure's place in the log, for that order.
        self._seq = 0
        #: Log time of the earliest block to lift (``block.expire``), across the candidates.
        self._next_lift = float("inf")
        #: Users with failures not yet handed to the policies, in the order of their first.
        self._pending: dict[str, _User] = {}
        self._pending_count = 0
        # A run of one user's failures is decided as they would be one by one as long as
        # nothing in between depends on the user's blocks, which this engine sees to, and no
        # other user's counting changes the user's. It can when blocks lift themselves by time
        # (a lift is due at a time another user's failure reveals), so then each failure is
        # handed over at once; and at the cap of tracked users, where which user goes depends
        # on the order of all users' failures, so users are held back only while every one of
        # them could be counted without reaching it (*room*).
        self._flush_at = MAX_PENDING if not expires(config.expire) else 1
        self._cap = config.max_tracked_users
        self._room = self._cap
        # Exempt users are never counted by the daemon: their failures are neither counted nor
        # peaked here. By user: looked up only when a user has no state yet (an exempt user
        # never gets one), so counted users pay nothing. By network: per client address
        # (cached), and only when the configuration has exempt networks.
        self._exempt_users = config.exempt_users
        self._count_failure = self._failure
        if config.exempt_networks:

            @functools.lru_cache(maxsize=65536)
            def exempt_host(host: str | None) -> bool:
                return config.exempt_address(_ip(host))

            def failure(user: str, rcpt: str, host: str | None, at: float, verify: Verify) -> None:
                if not exempt_host(host):
                    self._failure(user, rcpt, host, at, verify)

            self._count_failure = failure

    def skip_test(self, relay: int = 0) -> SkipTest:
        """The skip test for the message lines of *relay* (:meth:`_Messages.consume`)."""
        return self._relays[relay].consume

    def feed(self, event: Event, relay: int = 0) -> None:
        """Account for one event of *relay* (events must come in time order)."""
        self.feed_all((event,), relay)

    def feed_all(self, events: Iterable[Event], relay: int = 0) -> None:
        """Account for every event of *events*, all of *relay*, in order."""
        self.feed_merged(zip(itertools.repeat(relay), events))

    def feed_merged(self, events: Iterable[tuple[int, Event]]) -> None:
        """Account for every ``(relay, event)`` of *events*, in order: the loop of a replay.

        A rejection, every line of a spam wave, is dealt with here (:meth:`_rejection` says
        what), from the tuple's fields unpacked at once.
        """
        delivery, arrival, failure = self._delivery, self._arrival, self._count_failure
        key = self.keys.key
        count_defer = self.count_defer
        relays = self._relays
        for relay, event in events:
            if type(event) is Rejection:
                at, rcpt, auth_id, host, _, verify_failed, temporary, null_sender, local = event
                if null_sender or not verify_failed or (temporary and not count_defer):
                    continue
                user = key(auth_id, host, local)
                if user is not None:
                    failure(user, rcpt, host, at, Verify.DEFER if temporary else Verify.FAIL)
            elif isinstance(event, Delivery):
                delivery(event, relays[relay])
            elif isinstance(event, Arrival):
                arrival(event, relays[relay])
            elif isinstance(event, Rejection):
                self._rejection(event)
            else:
                relays[relay].forget(event.message_id)
        self._flush()

    def _rejection(self, event: Rejection) -> None:
        """A failed recipient, unless a bounce's (neither verified nor counted by the shipped
        ACL), not a verification failure, or a 4xx not counted; the user as the ACL keys it."""
        if event.null_sender:
            return
        if event.verify_failed and (not event.temporary or self.count_defer):
            user = self.keys.key(event.auth_id, event.host, event.local)
            if user is not None:
                verify = Verify.DEFER if event.temporary else Verify.FAIL
                self._count_failure(user, event.rcpt, event.host, event.at, verify)

    def _delivery(self, event: Delivery, messages: _Messages) -> None:
        message_id = event.message_id
        known = messages.senders.get(message_id)
        if known is None:
            return  # not from a countable user, or received before the logs start
        user, host, frozen, bounce = known
        delivered = messages.by_delivery.get(message_id)
        if delivered is not None:  # no "for" list: its deliveries are its accepted recipients
            messages.by_delivery[message_id] = delivered + 1
            before = self._blocks_of(user)
            self._accepted(user, host, event.at, 1)
            after = self._blocks_of(user)
            if after != before:
                # the guard blocked the user at a recipient of this very message, and the
                # ACL's freeze holds the whole message: its recipients delivered so far too
                newly = [a and not b for a, b in zip(after, before, strict=True)]
                messages.freeze(message_id, newly, delivered)
                frozen = messages.senders[message_id][2]
        if any(frozen):
            messages.count_frozen(message_id)
        if event.by_transport and not bounce:  # what the shipped event_action reports
            self._count_failure(user, event.rcpt, host, event.at, Verify.FAIL)

    def _arrival(self, event: Arrival, messages: _Messages) -> None:
        if event.null_sender and event.host is None and event.auth_id is None:
            # Exim's own bounces and other local ones: the non-SMTP ACL leaves them alone
            return
        user = self.keys.key(event.auth_id, event.host, event.local)
        if user is None:
            return
        if event.at >= self._next_lift:
            self._lift(event.at)
        self._decide_now(user)  # its blocks decide whether the message is frozen
        volume = self.report.volume
        if volume and event.recipients:
            # counted at RCPT time, before the message is accepted: a block at one of its
            # recipients freezes the whole message (the ACL's freeze is per message)
            self._accepted(user, event.host, event.at, event.recipients)
        # A bounce (null sender) of an outgoing user is asked about too (verify=ok, so the
        # guard counts its recipients), and frozen when the user is blocked; its failures at
        # delivery are not reported (the shipped event_action skips the null sender).
        frozen = (  # self._blocks_of(user), inline: one in six lines of a main log is a "<="
            tuple([user in result.policy.blocks for result in self.report.results])
            if user in self._blocked_somewhere
            else self._never_frozen
        )
        messages.add(event.message_id, user, event.host, frozen, bounce=event.null_sender)
        if volume and not event.recipients:
            messages.by_delivery[event.message_id] = 0

    def _blocks_of(self, user: str) -> tuple[bool, ...]:
        """Per candidate, whether *user* is blocked now."""
        if user not in self._blocked_somewhere:
            return self._never_frozen
        return tuple([user in result.policy.blocks for result in self.report.results])

    def _accepted(self, user: str, host: str | None, at: float, count: int) -> None:
        """Feed *count* accepted recipients of *user* to the volume guard of each candidate."""
        report = self.report
        report.accepted += count
        self._housekeep(at)
        # a failure's block or the guard's: the order counts; and the guard files the user in
        # the policies' wheel now, so everyone held back before goes first
        self._flush()
        self._room -= 1  # the guard may count a user new to the policies
        request = RcptRequest(user, "", Verify.OK, _ip(host))
        for result, blocked, decide in self._deciders:
            for _ in range(count):
                if user in blocked:
                    break
                self._effects(result, user, at, decide(request, now=at, wall_now=at).effects)

    def _sweep(self, at: float) -> None:
        if at >= self._next_sweep:
            self._flush()  # the sweep judges users idle by what is counted
            for result in self.report.results:
                result.policy.forget_idle(at)
            self._next_sweep = at + SWEEP_INTERVAL

    def _effects(
        self, result: CandidateResult, user: str, at: float, effects: Sequence[Effect]
    ) -> None:
        """Record the blocks and warnings among *effects* of *user* under *result*."""
        for effect in effects:
            if isinstance(effect, Blocked):
                state = self._users.get(user)
                if state is None:  # blocked by the volume guard before any failure
                    state = self._users[user] = _User(UserPeaks(self.report.windows), user)
                self._blocked(result, state, user, at, effect.block)
            elif isinstance(effect, Warned):
                known = result.warned.get(user)
                if known is None:
                    result.warned[user] = WarningRecord(user, at, str(effect.rate), effect.counted)
                else:
                    known.warnings += 1

    def _failure(self, user: str, rcpt: str, host: str | None, at: float, verify: Verify) -> None:
        state = self._users.get(user)
        if state is None:
            if user in self._exempt_users:
                return  # never counted by the daemon (and never given a state here)
            state = self._users[user] = _User(UserPeaks(self.report.windows), user)
            self.report.peaks[user] = state.peaks
        if at >= self._next_lift or at >= self._next_sweep:
            self._housekeep(at)
        pending = state.pending
        state.seqs.append(self._seq)
        self._seq += 1
        if not pending:
            self._pending[user] = state
            if len(self._pending) >= self._room:
                pending.append((rcpt, verify, _ip(host), at, at))
                self._pending_count += 1
                self._flush()
                return
        pending.append((rcpt, verify, _ip(host), at, at))
        self._pending_count += 1
        if self._pending_count >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        """Hand every user's held-back failures to the policies."""
        if self._pending:
            held = self._pending
            self._pending = {}
            self._pending_count = 0
            self._decide_all(held)
        self._update_room()

    def _update_room(self) -> None:
        """How many users may be held back: the room left under the cap of tracked users."""
        self._room = self._cap - max(
            (result.policy.statistics().tracked_users for result in self.report.results),
            default=0,
        )

    def _decide_now(self, user: str) -> None:
        """Hand *user*'s held-back failures to the policies, before what depends on its blocks;
        with everyone else's (see :meth:`_flush`)."""
        if user in self._pending:
            self._flush()

    def _decide_all(self, held: dict[str, _User]) -> None:
        """Hand every held user's failures to each candidate's policy, one run per user.

        The policies file each user in a wheel of one-minute slots, and at the cap of tracked
        users the first user filed in the earliest slot makes room: so each candidate gets the
        users in the order one by one would have filed them in their last slot (the first
        failure there), not in the order of their first failure.
        """
        users = list(held.items())
        notable: list[list[tuple[int, int, CandidateResult, Sequence[Effect]]]] = [
            [] for _ in users
        ]
        for order, (result, blocked, _) in enumerate(self._deciders):
            config = self._configs[order]
            ranked = (
                range(len(users))
                if len(users) == 1
                else sorted(
                    range(len(users)), key=lambda i: _entering(users[i][1], config, users[i][0])
                )
            )
            for i in ranked:
                user, state = users[i]
                if user in blocked:
                    continue  # the policy would answer from its block list and change nothing
                notable[i].extend(
                    (index, order, result, decision.effects)
                    for index, decision in result.policy.decide_failures(user, state.pending)
                )
        for (user, state), found in zip(users, notable, strict=True):
            self._settle(state, user, found)

    def _settle(
        self,
        state: _User,
        user: str,
        notable: list[tuple[int, int, CandidateResult, Sequence[Effect]]],
    ) -> None:
        """Account for *user*'s handed-over failures in the order they came, with the effects
        the policies found (*notable*: index of the failure, candidate, effects)."""
        failures = state.pending
        state.pending = []
        state.seqs = []
        if failures:
            latest = max(failure[3] for failure in failures)
            state.last_at = max(state.last_at, latest)
        self.report.failures += len(failures)
        if failures and user not in self.report.peaks:  # given a state by a block of the guard
            self.report.peaks[user] = state.peaks
        if len(notable) > 1:
            notable.sort(key=lambda item: (item[0], item[1]))
        start = 0
        for index, _, result, effects in notable:
            if index >= start:
                self._account(state, failures, start, index + 1)
                start = index + 1
            self._effects(result, user, failures[index][3], effects)
        self._account(state, failures, start, len(failures))

    @staticmethod
    def _account(state: _User, failures: Sequence[Failure], start: int, stop: int) -> None:
        """Count *failures[start:stop]* into *state*'s failures, peaks and timeline."""
        if start >= stop:
            return
        state.failures += stop - start
        run = failures[start:stop] if start or stop < len(failures) else failures
        state.peaks.add_run(run)
        if state.timeline is not None:
            state.timeline.extend(failure[3] for failure in run)

    def _housekeep(self, at: float) -> None:
        """Lift what expired and sweep idle users, when either is due at log time *at*."""
        if at >= self._next_lift:
            self._lift(at)
        self._sweep(at)

    def _lift(self, at: float) -> None:
        """Lift the blocks whose time is up at log time *at*, as the daemon would."""
        upcoming = float("inf")
        self._flush()
        for result in self.report.results:
            policy = result.policy
            policy.expire_due(at)
            following = policy.next_expiry()
            if following is not None:
                upcoming = min(upcoming, following)
        self._next_lift = upcoming

    def _blocked(
        self, result: CandidateResult, state: _User, user: str, at: float, block: Block
    ) -> None:
        if block.expires_at is not None:
            self._next_lift = min(self._next_lift, block.expires_at)
        earlier = result.blocked.get(user)
        if earlier is not None:  # blocked again after an expiry: the first block's record stays
            earlier.blocks += 1
            earlier.until = block.expires_at
            return
        result.blocked[user] = BlockRecord(
            user, at, state.failures, reason=block.reason, until=block.expires_at
        )
        self._blocked_somewhere.add(user)
        if state.timeline is None:
            # the failures that led to the block are the longest window's; from now on every
            # failure of the user is kept
            recent = state.peaks.longest().times
            state.timeline = collections.deque(recent, maxlen=TIMELINE_POINTS)
            self.report.timelines[user] = state.timeline


class _Messages:
    """One relay's messages from counted users: their sender, until their ``Completed``.

    Invariant: a message id is in ``senders`` from its ``<=`` until its ``Completed`` (or until
    :data:`MAX_MESSAGES` newer ones push it out), and in ``frozen`` meanwhile if it arrived
    after its user's block in some candidate.
    """

    __slots__ = ("by_delivery", "frozen", "results", "senders")

    def __init__(self, results: Sequence[CandidateResult]) -> None:
        self.results = results
        #: message id -> (user key, client address, frozen per candidate, a bounce)
        self.senders: dict[str, tuple[str, str | None, tuple[bool, ...], bool]] = {}
        self.frozen: set[str] = set()
        #: Messages whose ``<=`` line had no ``for`` list, while the volume guard is on: their
        #: deliveries (``=>``, ``->``, ``**``) are its accepted recipients. Each with its
        #: deliveries so far (frozen too when the guard blocks at one of them).
        self.by_delivery: dict[str, int] = {}

    def add(
        self,
        message_id: str,
        user: str,
        host: str | None,
        frozen: tuple[bool, ...],
        *,
        bounce: bool = False,
    ) -> None:
        """Remember a message received from *user*; forget the oldest past the bound."""
        senders = self.senders
        senders[message_id] = (user, host, frozen, bounce)
        if any(frozen):
            self.frozen.add(message_id)
        if len(senders) > MAX_MESSAGES:
            oldest = next(iter(senders))
            del senders[oldest]
            self.frozen.discard(oldest)
            self.by_delivery.pop(oldest, None)

    def forget(self, message_id: str) -> None:
        """The message is ``Completed``."""
        self.senders.pop(message_id, None)
        self.frozen.discard(message_id)
        self.by_delivery.pop(message_id, None)

    def freeze(self, message_id: str, newly: Sequence[bool], delivered: int) -> None:
        """Freeze the message for the candidates *newly* says, counting its *delivered*
        recipients so far as frozen there."""
        user, host, frozen, bounce = self.senders[message_id]
        for result, is_new in zip(self.results, newly, strict=True):
            if is_new:
                result.blocked[user].frozen_after += delivered
        frozen = tuple(old or new for old, new in zip(frozen, newly, strict=True))
        self.senders[message_id] = (user, host, frozen, bounce)
        self.frozen.add(message_id)

    def count_frozen(self, message_id: str) -> None:
        """One more recipient of a frozen message, for each candidate that froze it."""
        user, _, frozen, _ = self.senders[message_id]
        for result, is_frozen in zip(self.results, frozen, strict=True):
            if is_frozen:
                result.blocked[user].frozen_after += 1

    def consume(self, line: str, end: int, flag: str) -> bool:
        """Deal with a message line without parsing it, if it can be; False if it must be parsed.

        *flag* is ``=>``, ``->``, ``**`` or ``Co`` (``Completed``), ``line[20:end]`` the
        message id (:data:`~spamguardd.tools.eximlog.SkipTest`). Only ``**`` lines of messages
        from counted users need their recipient; the rest need only the message id, and a
        delivery not even that while no message is frozen. The caller must pass the relay's
        lines in time order relative to everything of the relay already fed.
        """
        if flag == "=>" or flag == "->":  # noqa: PLR1714 - the commonest test first, no tuple
            by_delivery = self.by_delivery
            if by_delivery and line[20:end] in by_delivery:
                return False  # counted by the volume guard: parsed, then fed
            frozen = self.frozen
            if frozen and line[20:end] in frozen:
                self.count_frozen(line[20:end])
            return True
        if flag == "Co":
            message_id = line[20:end]
            if self.senders.pop(message_id, None) is not None:
                self.frozen.discard(message_id)
                self.by_delivery.pop(message_id, None)
            return True
        return line[20:end] not in self.senders  # "**": parsed only for counted users


class _User:
    """What the replay keeps of a user with failures: their count, peaks, and timeline."""

    __slots__ = ("failures", "last_at", "peaks", "pending", "seqs", "timeline", "user")

    def __init__(self, peaks: UserPeaks, user: str = "") -> None:
        self.user = user
        #: Failures not yet handed to the policies (:meth:`Replayer._flush`).
        self.pending: list[Failure] = []
        #: The place in the log of each of those failures.
        self.seqs: list[int] = []
        #: The latest log time of the failures handed over so far (the policies' last update).
        self.last_at = -float("inf")
        #: Failure lines so far (repeats too): a block reports how many it took.
        self.failures = 0
        self.peaks = peaks
        #: Failure times, from the user's first block in any candidate on.
        self.timeline: collections.deque[float] | None = None


def _entering(state: _User, config: PolicyConfig, user: str) -> int:
    """Where in the log a policy with *config* files *user* in the slot its held failures
    leave it in: at the first of them in that slot (its last update plus its longest period,
    in whole minutes, as the policy's wheel counts)."""
    idle = max(rate.period for rate in config.limits_for(user))
    failures, seqs = state.pending, state.seqs
    updated = state.last_at
    slots = []
    for failure in failures:
        updated = max(updated, failure[3])
        slots.append(math.ceil((updated + idle) / SLOT))
    last = slots[-1]
    first = len(slots) - 1
    while first > 0 and slots[first - 1] == last:
        first -= 1
    return seqs[first]


@functools.lru_cache(maxsize=65536)
def _ip(host: str | None) -> IPAddress | None:
    """The client address for exemptions by network (cached: a client sends many failures)."""
    if host is None:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
