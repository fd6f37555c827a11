"""The policy: per-user token buckets of failed recipients, and the blocked set. Pure code.

Nothing here reads a clock, touches a file or knows about trio: :meth:`Policy.decide` takes the
request and the time, updates the in-memory state and returns a :class:`Decision` naming the reply
and the effects (persist a block, log a "would block") that the server carries out. A day of
traffic therefore runs in a test in milliseconds.

Invariants:

1. A user key is in at most one of ``blocks`` (blocked) and ``_users`` (counting): a block forgets
   the counters, which nothing needs any more, so a blocked spammer costs one record.
2. ``generation`` grows by one on every change to ``blocks``; the server persists the block list
   and answers a block verdict only once the store holds at least the generation it answered from.
3. ``0 <= tokens <= rate.count`` in every bucket, for any sequence of times.
"""

from __future__ import annotations

import bisect
import collections
import enum
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

import attrs

from spamguardd.core import buckets
from spamguardd.core.buckets import UserState
from spamguardd.core.config import ACCEPTED_SUFFIX, NO_VOLUME_GUARD, Mode, PolicyConfig
from spamguardd.core.counters import CountedUsers
from spamguardd.core.expiry import ExpirySchedule, RepeatHistory, expires, expiry_for
from spamguardd.core.protocol import (
    CheckRequest,
    IPAddress,
    PingRequest,
    RcptRequest,
    Reply,
    ReportRequest,
    Request,
    Verdict,
    Verify,
)
from spamguardd.core.rate import Rate, format_duration

#: Counted failures kept, across all users, as samples for people (most recent first out).
#: A global ring keeps this bounded whatever the number of users: ~200 bytes an entry.
SAMPLE_CAPACITY: Final = 10_000
#: Samples attached to a block as its evidence.
EVIDENCE_SAMPLES: Final = 10

ACCEPT: Final = Reply(Verdict.ACCEPT)
PONG: Final = Reply(Verdict.PONG)
#: What the volume guard counts, as its reasons and notices say.
_VOLUME: Final = "accepted recipients"


@attrs.frozen
class Block:
    """One entry of the block list, as persisted in the block file."""

    user: str
    #: Wall-clock time of the block, seconds since the epoch (persisted, so not monotonic).
    blocked_at: float
    reason: str
    #: ``auto`` for the policy's own blocks, ``admin`` (or ``admin:UID``) for an admin's.
    by: str = "auto"
    #: Wall-clock time at which the block lifts itself (``block.expire``); None: never.
    expires_at: float | None = None
    #: Which automatic block of the user this is within ``block.repeat_within`` (1 for the
    #: first); 0 for blocks that are not counted (an admin's, another relay's).
    nth: int = 0


@attrs.frozen
class FailureSample:
    """One counted failed recipient, kept for people: notices, ``show``, the journal."""

    user: str
    rcpt: str
    ip: IPAddress | None
    #: Wall-clock time, seconds since the epoch.
    at: float


@attrs.frozen
class Blocked:
    """Effect: *block* was just made. Persist it before answering, log it, tell the abuse desk.

    *rate* is the window whose bucket emptied (None for a block an admin made); *samples* are
    the user's most recent counted failures (at most :data:`EVIDENCE_SAMPLES`, oldest first),
    the evidence a notice shows.
    """

    block: Block
    rate: Rate | None = None
    samples: tuple[FailureSample, ...] = ()
    #: What *rate* counts: failed recipients, or accepted ones (the volume guard).
    counted: str = "failed recipients"


@attrs.frozen
class WouldBlock:
    """Effect (monitor mode): *user* would have been blocked now by *rate*."""

    user: str
    rate: Rate
    samples: tuple[FailureSample, ...] = ()
    counted: str = "failed recipients"


@attrs.frozen
class Warned:
    """Effect: *user* has used ``warn_at`` of *rate*'s bucket (*used* of its tokens) at wall-clock
    time *at*; nothing is blocked. Once per user and window (:func:`buckets.check_warning`)."""

    user: str
    rate: Rate
    used: int
    at: float
    samples: tuple[FailureSample, ...] = ()
    counted: str = "failed recipients"


@attrs.frozen
class Unblocked:
    """Effect: *block* was lifted by *by* at wall-clock time *at*; the user counts afresh."""

    block: Block
    by: str
    at: float


@attrs.frozen
class Reset:
    """Effect: *user*'s counters were forgotten by *by* at wall-clock time *at*."""

    user: str
    by: str
    at: float


Effect = Blocked | WouldBlock | Warned | Unblocked | Reset

#: Who lifts a block whose time is up, in logs, the journal and notices.
EXPIRY_ACTOR: Final = "expiry"


@attrs.frozen
class Change:
    """What an admin's change did: the effects to carry out, as a :class:`Decision` has them.

    No effects means nothing changed (the user was already blocked, not blocked, or had no
    counters).
    """

    effects: tuple[Effect, ...] = ()
    #: The block-list generation to persist before the change is reported done.
    needs_generation: int | None = None


class StoreCountStatus(enum.StrEnum):
    """What the shared store did with one failed recipient (fleet mode)."""

    #: Counted (or a retry, not counted); no bucket emptied, or monitor mode and marked already.
    COUNTED = "counted"
    #: This call emptied a bucket and made the block, fleet-wide: this relay announces it.
    BLOCK = "block"
    #: The user was blocked in the store already (made elsewhere); nothing was counted.
    BLOCKED = "blocked"
    #: Monitor mode: this call emptied a bucket, the first in the fleet to see it.
    WOULD = "would"


@attrs.frozen
class StoreCount:
    """The shared store's answer for one failed recipient it counted (fleet mode)."""

    status: StoreCountStatus
    counted: bool
    #: The window whose bucket emptied, if one did.
    tripped: Rate | None = None
    tokens_left: tuple[float, ...] | None = None
    #: The block, for ``BLOCK`` and ``BLOCKED``.
    block: Block | None = None
    #: Which daemon made the block (its fleet origin), for ``BLOCKED``: a daemon whose own
    #: block comes back to it before the answer that made it is told so by this.
    made_by: str = ""
    #: The relay that made the block, for ``BLOCKED`` (logs and journal).
    made_on: str = ""


#: One failed recipient of a run (:meth:`Policy.decide_failures`): ``(rcpt, verify, ip, now,
#: wall_now)``, what an ``rcpt`` request of the run's user carries, and its times.
Failure = tuple[str, Verify, IPAddress | None, float, float]


@attrs.frozen
class Decision:
    """What the policy decided for one request."""

    reply: Reply
    effects: tuple[Effect, ...] = ()
    #: Whether this request counted a failure (False for accepts, duplicates, exemptions).
    counted: bool = False
    #: Tokens left per window after this request, when the user is being counted.
    tokens_left: tuple[float, ...] | None = None
    #: The block-list generation the reply depends on: the server answers only once the store
    #: has persisted at least this generation. None when the reply does not depend on blocks.
    needs_generation: int | None = None


#: The decision for a recipient that verified, when the volume guard has nothing to say.
ACCEPTED: Final = Decision(ACCEPT)


@attrs.frozen
class WindowView:
    """One window of one user, as ``show`` presents it."""

    rate: Rate
    #: Distinct failures counted in this window within its period.
    counted: int
    tokens_left: float
    #: Wall-clock time at which the bucket is full again; None when it is full now.
    clears_at: float | None

    @classmethod
    def at(cls, rate: Rate, counted: int, tokens_left: float, wall_now: float) -> WindowView:
        """The window with *tokens_left* at wall-clock *wall_now* (when it clears follows)."""
        clears_at = (
            None
            if tokens_left >= rate.count
            else wall_now + (rate.count - tokens_left) / rate.per_second
        )
        return cls(rate=rate, counted=counted, tokens_left=tokens_left, clears_at=clears_at)


@attrs.frozen
class UserView:
    """Everything the policy knows about one user, for ``show``."""

    user: str
    block: Block | None
    exempt: bool
    windows: tuple[WindowView, ...]
    #: The user's most recent counted failures still in the sample ring, newest first.
    samples: tuple[FailureSample, ...]
    #: The windows in which the user has been warned (``limits.warn_at``) and not re-armed.
    warned: tuple[Rate, ...] = ()
    #: The volume guard's windows (accepted recipients), when it is on for the user.
    accepted: UserView | None = None


@attrs.frozen
class PolicyStatistics:
    """Counts for ``stats`` and metrics."""

    tracked_users: int
    blocked_users: int
    would_block_users: int
    generation: int


class Policy:
    """Counts failed recipients per user and decides verdicts. See the module docstring."""

    def __init__(
        self,
        config: PolicyConfig,
        blocks: Iterable[Block] = (),
        history: Iterable[tuple[str, Sequence[float]]] = (),
    ) -> None:
        self.config = config
        self._volume_guard = config.volume_guard
        self.blocks: dict[str, Block] = {block.user: block for block in blocks}
        #: Automatic blocks per user within ``repeat_within`` (escalation), and the blocks
        #: that lift themselves by time (core/expiry).
        self.repeats = RepeatHistory(history)
        self.expiries = ExpirySchedule()
        for block in self.blocks.values():
            if block.expires_at is not None:
                self.expiries.add(block.user, block.expires_at)
        self.generation = 0
        self._users = CountedUsers()
        #: The rate tuples states are laid out for, by tag (buckets.layout), and the tag of
        #: each tuple the configuration hands out, by identity (the tuple is kept alive here).
        self._layouts: list[tuple[Rate, ...]] = []
        self._layout_tags: dict[tuple[Rate, ...], float] = {}
        self._tag_by_id: dict[int, tuple[tuple[Rate, ...], float, float, int]] = {}
        #: Monotonic times of the reloads that changed limits, oldest first.
        self._reloads: list[float] = []
        #: ``(user, rcpt, ip, wall_now)`` of each :class:`FailureSample`, made when asked for:
        #: every counted failure passes through here, few are ever looked at.
        self._samples: collections.deque[tuple[str, str, IPAddress | None, float]] = (
            collections.deque(maxlen=SAMPLE_CAPACITY)
        )
        self._would_block: set[str] = set()
        #: Users dropped at ``max_tracked_users``.
        self.evicted_users = 0

    # -- queries --------------------------------------------------------------------------

    def decide(self, request: Request, *, now: float, wall_now: float) -> Decision:
        """Decide the reply to *request* at monotonic time *now* (wall clock *wall_now*)."""
        if isinstance(request, RcptRequest):
            return self._rcpt(request, now=now, wall_now=wall_now)
        if isinstance(request, ReportRequest):
            return self._rcpt(request.as_rcpt(), now=now, wall_now=wall_now)
        if isinstance(request, CheckRequest):
            return self._blocked_decision(request.user) or Decision(ACCEPT)
        if isinstance(request, PingRequest):
            return Decision(PONG)
        raise TypeError(f"not a request: {request!r}")  # pragma: no cover - exhaustive above

    def _blocked_decision(self, user: str) -> Decision | None:
        block = self.blocks.get(user)
        if block is None:
            return None
        return Decision(Reply(self.config.verdict, block.reason), needs_generation=self.generation)

    def _is_exempt(self, request: RcptRequest) -> bool:
        config = self.config
        return request.user in config.exempt_users or config.exempt_address(request.ip)

    def _rcpt(self, request: RcptRequest, *, now: float, wall_now: float) -> Decision:
        blocked = self._blocked_decision(request.user)
        if blocked is not None:
            return blocked
        if request.verify is Verify.OK:
            if not self._volume_guard:
                return ACCEPTED
            return self._count_accepted(request, now=now, wall_now=wall_now)
        failure = (request.rcpt, request.verify, request.ip, now, wall_now)
        return self._count_failures(request.user, (failure,))[1]

    def _count_accepted(self, request: RcptRequest, *, now: float, wall_now: float) -> Decision:
        """The volume guard: count an accepted recipient, under the user's key with
        :data:`ACCEPTED_SUFFIX` (so the snapshot, the sweep and a reload carry it like any)."""
        if self._is_exempt(request):
            return ACCEPTED
        key = request.user + ACCEPTED_SUFFIX
        rates = self.config.limits_for(key)
        if rates == NO_VOLUME_GUARD:  # this user's guard is off (an override elsewhere)
            return ACCEPTED
        state = self._counted_state(key, rates, now)
        warn_at = self.config.warn_at
        before: tuple[float, ...] = ()
        if warn_at is not None:
            buckets.refill(state, rates, now)
            before = buckets.tokens_left(state, rates)
        tripped = buckets.take(state, rates, now)
        self._users.file(key, state, buckets.updated(state) + self._idle_after(rates))
        if tripped is not None:
            return self._volume_block(request.user, tripped, wall_now=wall_now)
        if warn_at is None:
            return ACCEPTED
        warned = buckets.check_warning(
            state, rates, before, now, warn_at=warn_at, limit=_recent_limit(rates)
        )
        if warned is None:
            return ACCEPTED
        level = buckets.tokens_left(state, rates)[rates.index(warned)]
        used = math.ceil(warned.count - level - 1e-9)
        return Decision(ACCEPT, (Warned(request.user, warned, used, wall_now, (), _VOLUME),))

    def _auto_block(self, user: str, reason: str, *, wall_now: float) -> Block:
        """An automatic block of *user* at *wall_now*: with its expiry and its place among the
        user's repeats when blocks expire, as blocks always were when they do not."""
        at = float(int(wall_now))
        nth, expires_at = 0, None
        if expires(self.config.expire):
            nth = self.repeats.record(user, at, within=self.config.repeat_within)
            expires_at = expiry_for(self.config.expire, nth, at)
        return Block(user, at, reason, "auto", expires_at=expires_at, nth=nth)

    def _volume_block(self, user: str, tripped: Rate, *, wall_now: float) -> Decision:
        """The block (or, in monitor mode, the would-block) for a volume guard's empty bucket."""
        if self.config.mode is Mode.MONITOR:
            if user in self._would_block:
                return ACCEPTED
            self._would_block.add(user)
            return Decision(ACCEPT, (WouldBlock(user, tripped, (), _VOLUME),))
        reason = f"{tripped.count} {_VOLUME} within {format_duration(tripped.period)}"
        block = self._auto_block(user, reason, wall_now=wall_now)
        self._add_block(block)
        return Decision(
            Reply(self.config.verdict, reason),
            (Blocked(block, tripped, (), _VOLUME),),
            needs_generation=self.generation,
        )

    def _counted_state(self, key: str, rates: tuple[Rate, ...], now: float) -> UserState:
        """The counting state of *key*, made (room made at the cap) or carried to *rates*."""
        users = self._users
        state = users.get(key)
        if state is None:
            if len(users) >= self.config.max_tracked_users:
                # At the cap the user closest to going idle makes room: what is failing now
                # keeps being counted, and memory stays bounded whatever floods the table.
                oldest = users.first()
                if oldest is not None:
                    users.pop(oldest)
                    self.evicted_users += 1
            state = buckets.new_state(rates, now, self._tag(rates))
            users.put(key, state)
        else:
            self._fit(state, rates)
            users.mark(key)
        return state

    def decide_failures(self, user: str, failures: Sequence[Failure]) -> list[tuple[int, Decision]]:
        """Decide a run of *user*'s recipients that did not verify, in order, as one call.

        Each failure is decided as :meth:`decide` decides an ``rcpt`` request of *user* with its
        ``(rcpt, verify, ip)`` at its ``(now, wall_now)``, by the same code: the query path is a
        run of one. Users are counted apart, so a caller holding several users' failures (a log
        replay) may hand each user's over as one run, saving the per-call work of looking the
        user up. A run stops at a failure that blocks the user: the rest would be answered from
        the block list and change nothing.

        Returns:
            The decisions that carry effects, with their index in *failures*.
        """
        if user in self.blocks or not failures:
            return []
        return self._count_failures(user, failures, answer=False)[0]

    def _count_failures(  # noqa: C901, PLR0911, PLR0912, PLR0915 - the hot path, in one piece
        self, user: str, failures: Sequence[Failure], *, answer: bool = True
    ) -> tuple[list[tuple[int, Decision]], Decision]:
        """Count *failures* of *user* (not blocked): the decisions with effects, by index, and
        the decision of the last failure decided (with *answer*; else a placeholder)."""
        config = self.config
        rates = config.limits_for(user)
        if config.warn_at is not None:
            return self._count_warned(user, rates, config.warn_at, failures)
        if user in config.exempt_users:
            return [], ACCEPTED
        networks = config.exempt_networks
        count_defer = config.count_defer
        picked: Sequence[Failure] = failures
        at: Sequence[int] = range(len(failures))  # the index in *failures* of each in *picked*
        if len(failures) == 1:  # the query path
            ((rcpt, verify, ip, now, _),) = failures
            if (verify is Verify.DEFER and not count_defer) or (
                networks and config.exempt_address(ip)
            ):
                return [], ACCEPTED
            rcpts: Sequence[str] = (rcpt,)
            times: Sequence[float] = (now,)
        else:
            if networks:
                kept = [
                    index
                    for index, (_, verify, ip, _, _) in enumerate(failures)
                    if (count_defer or verify is not Verify.DEFER) and not config.exempt_address(ip)
                ]
            elif count_defer or Verify.DEFER not in [failure[1] for failure in failures]:
                kept = None  # every one counts (the common case)
            else:
                kept = [i for i, failure in enumerate(failures) if failure[1] is not Verify.DEFER]
            if kept is not None and len(kept) < len(failures):
                at = kept
                picked = [failures[index] for index in kept]
                if not picked:
                    return [], ACCEPTED
            rcpts = [failure[0] for failure in picked]
            times = [failure[3] for failure in picked]
        limit = self._recent_limit(rates)
        state = self._counted_state(user, rates, times[0])
        notable: list[tuple[int, Decision]] = []
        last: Decision | None = None
        start = 0
        counted = False
        while start < len(picked):
            flags, tripped = buckets.count_failures(
                state,
                rates,
                rcpts[start:] if start else rcpts,
                times[start:] if start else times,
                limit,
            )
            run = picked[start:] if start else picked
            self._samples.extend(
                [
                    (user, rcpt, ip, wall)
                    for (rcpt, _, ip, _, wall), hit in zip(run, flags, strict=False)
                    if hit
                ]
            )
            start += len(flags)
            counted = flags[-1]
            if tripped is None:
                last = None
                break
            self._users.file(user, state, buckets.updated(state) + self._idle_after(rates))
            last = self._tripped(
                user, state, rates, tripped, counted=counted, wall_now=picked[start - 1][4]
            )
            if last.effects:
                notable.append((at[start - 1], last))
            if user in self.blocks:
                return notable, last
        self._users.file(user, state, buckets.updated(state) + self._idle_after(rates))
        if at[-1] != len(failures) - 1 or not answer:
            return notable, ACCEPTED  # the last was not counted, or no one asks
        if last is None:
            last = Decision(ACCEPT, counted=counted, tokens_left=buckets.tokens_left(state, rates))
        return notable, last

    def _count_warned(
        self, user: str, rates: tuple[Rate, ...], warn_at: float, failures: Sequence[Failure]
    ) -> tuple[list[tuple[int, Decision]], Decision]:
        """:meth:`_count_failures` with the early warning on: one failure at a time, each with
        the levels before it for the warning mark."""
        config = self.config
        limit = _recent_limit(rates)
        count_defer = config.count_defer
        exempt = user in config.exempt_users
        notable: list[tuple[int, Decision]] = []
        state: UserState | None = None
        last = ACCEPTED
        for index, (rcpt, verify, ip, now, wall_now) in enumerate(failures):
            if (verify is Verify.DEFER and not count_defer) or exempt or config.exempt_address(ip):
                last = ACCEPTED
                continue
            if state is None:
                state = self._counted_state(user, rates, now)
            buckets.refill(state, rates, now)  # the levels before this failure, for the mark
            before = buckets.tokens_left(state, rates)
            counted, tripped = buckets.count_failure(state, rates, rcpt, now, limit)
            if counted:
                self._samples.append((user, rcpt, ip, wall_now))
            self._users.file(user, state, buckets.updated(state) + self._idle_after(rates))
            if tripped is not None:
                last = self._tripped(
                    user, state, rates, tripped, counted=counted, wall_now=wall_now
                )
            elif counted:
                last = self._warning(
                    user, state, rates, before, warn_at=warn_at, now=now, wall_now=wall_now
                )
            else:
                last = Decision(
                    ACCEPT, counted=False, tokens_left=buckets.tokens_left(state, rates)
                )
            if last.effects:
                notable.append((index, last))
            if user in self.blocks:
                break
        return notable, last

    def _tripped(  # noqa: PLR0913 - the user, its state and limits, what tripped, the time
        self,
        user: str,
        state: UserState,
        rates: tuple[Rate, ...],
        tripped: Rate,
        *,
        counted: bool,
        wall_now: float,
    ) -> Decision:
        """The block (or, in monitor mode, the would-block) for a failure that emptied a bucket."""
        tokens_left = buckets.tokens_left(state, rates)
        reason = f"{tripped.count} failed recipients within {format_duration(tripped.period)}"
        evidence = tuple(reversed(self.failure_samples(user, EVIDENCE_SAMPLES)))
        if self.config.mode is Mode.MONITOR:
            if user in self._would_block:
                return Decision(ACCEPT, counted=counted, tokens_left=tokens_left)
            self._would_block.add(user)
            return Decision(
                ACCEPT,
                (WouldBlock(user, tripped, evidence),),
                counted=counted,
                tokens_left=tokens_left,
            )
        block = self._auto_block(user, reason, wall_now=wall_now)
        self._add_block(block)
        return Decision(
            Reply(self.config.verdict, reason),
            (Blocked(block, tripped, evidence),),
            counted=counted,
            tokens_left=tokens_left,
            needs_generation=self.generation,
        )

    def _warning(  # noqa: PLR0913 - the user, its state, limits and levels, the mark, the times
        self,
        user: str,
        state: UserState,
        rates: tuple[Rate, ...],
        before: tuple[float, ...],
        *,
        warn_at: float,
        now: float,
        wall_now: float,
    ) -> Decision:
        """The accept for a counted failure that emptied no bucket, with a warning if it took
        a window past ``limits.warn_at`` for the first time (since its bucket refilled)."""
        warned = buckets.check_warning(
            state, rates, before, now, warn_at=warn_at, limit=_recent_limit(rates)
        )
        tokens_left = buckets.tokens_left(state, rates)
        if warned is None:
            return Decision(ACCEPT, counted=True, tokens_left=tokens_left)
        level = tokens_left[rates.index(warned)]
        evidence = tuple(reversed(self.failure_samples(user, EVIDENCE_SAMPLES)))
        # tokens used, counting the one just taken whole (a fraction earned back meanwhile
        # does not make "5 of 10" read "4 of 10")
        used = math.ceil(warned.count - level - 1e-9)
        effect = Warned(user, warned, used, wall_now, evidence)
        return Decision(ACCEPT, (effect,), counted=True, tokens_left=tokens_left)

    def _add_block(self, block: Block) -> None:
        self.blocks[block.user] = block
        self._users.pop(block.user, None)
        self._users.pop(block.user + ACCEPTED_SUFFIX, None)
        self.generation += 1
        if block.expires_at is not None:
            self.expiries.add(block.user, block.expires_at)

    # -- fleet mode: the shared store counts, the policy decides -----------------------------

    def to_count(self, request: Request) -> RcptRequest | None:
        """The failed recipient *request* would count, or None when no counting is needed.

        None for a blocked user, a recipient that verified (or deferred, unless counted), an
        exemption, and requests that are not recipients: :meth:`decide` answers those from this
        relay's own view, without the store.
        """
        if isinstance(request, ReportRequest):
            request = request.as_rcpt()
        elif not isinstance(request, RcptRequest):
            return None
        if request.user in self.blocks:
            return None
        if request.verify is Verify.OK or (
            request.verify is Verify.DEFER and not self.config.count_defer
        ):
            return None
        if self._is_exempt(request):
            return None
        return request

    def settle(self, request: RcptRequest, count: StoreCount, *, wall_now: float) -> Decision:
        """Decide *request* (from :meth:`to_count`) from what the store counted.

        ``BLOCKED`` is not settled here: the caller adopts the fleet's block
        (:meth:`adopt_block`) and asks :meth:`decide` again.
        """
        user = request.user
        if count.counted:
            self._samples.append((user, request.rcpt, request.ip, wall_now))
        tokens = count.tokens_left
        if count.status is StoreCountStatus.BLOCK and count.block is not None:
            if user in self.blocks:  # blocked here meanwhile: that block answers
                return self.decide(request, now=0.0, wall_now=wall_now)
            block = count.block
            evidence = tuple(reversed(self.failure_samples(user, EVIDENCE_SAMPLES)))
            self._add_block(block)
            return Decision(
                Reply(self.config.verdict, block.reason),
                (Blocked(block, count.tripped, evidence),),
                counted=count.counted,
                tokens_left=tokens,
                needs_generation=self.generation,
            )
        if count.status is StoreCountStatus.WOULD and count.tripped is not None:
            self._would_block.add(user)
            evidence = tuple(reversed(self.failure_samples(user, EVIDENCE_SAMPLES)))
            return Decision(
                ACCEPT,
                (WouldBlock(user, count.tripped, evidence),),
                counted=count.counted,
                tokens_left=tokens,
            )
        return Decision(ACCEPT, counted=count.counted, tokens_left=tokens)

    def own_block(self, block: Block, rate: Rate | None) -> Change:
        """Take *block*, made in the store by one of this relay's counts whose answer never
        came back (it gave up waiting), with the evidence and notice of a block made here."""
        if block.user in self.blocks:
            return Change()
        evidence = tuple(reversed(self.failure_samples(block.user, EVIDENCE_SAMPLES)))
        self._add_block(block)
        return Change((Blocked(block, rate, evidence),), needs_generation=self.generation)

    def adopt_block(self, block: Block) -> Change:
        """Take over *block*, made on another relay; a user blocked here already keeps its block.

        The change carries the block for the log, the journal and the block file, not for a
        notice: the relay that made it sends that.
        """
        if block.user in self.blocks:
            return Change()
        self._add_block(block)
        return Change((Blocked(block),), needs_generation=self.generation)

    # -- admin changes --------------------------------------------------------------------

    def block(
        self,
        user: str,
        reason: str,
        *,
        by: str,
        wall_now: float,
        expires_at: float | None = None,
    ) -> Change:
        """Block *user* on an admin's word, until *expires_at* (wall clock) or for good.

        A user already blocked keeps the block it has (its time and reason are the evidence) and
        nothing changes. A new block bumps :attr:`generation`: the change is done once that is
        durable. An admin's block does not count towards escalation.
        """
        if user in self.blocks:
            return Change()
        block = Block(user, float(int(wall_now)), reason, by, expires_at=expires_at)
        evidence = tuple(reversed(self.failure_samples(user, EVIDENCE_SAMPLES)))
        self._add_block(block)
        return Change((Blocked(block, None, evidence),), needs_generation=self.generation)

    def unblock(self, user: str, *, by: str, wall_now: float) -> Change:
        """Lift *user*'s block; nothing changes when the user was not blocked.

        The user starts counting again from full buckets. Bumps :attr:`generation`.
        """
        block = self.blocks.pop(user, None)
        if block is None:
            return Change()
        self._would_block.discard(user)
        self.generation += 1
        self.expiries.compact(self._expiry_of, len(self.blocks))
        return Change((Unblocked(block, by, wall_now),), needs_generation=self.generation)

    def expire_due(self, wall_now: float) -> Change:
        """Lift every block whose time is up at *wall_now*, as unblocks by ``expiry``.

        O(log n) a lifted block: the schedule's heap gives the due ones, nothing walks the block
        list. The history of the users lifted is kept (escalation counts it). One generation
        covers all of them.
        """
        effects = []
        for user in self.expiries.take_due(wall_now, self._expiry_of):
            block = self.blocks.pop(user)
            self._would_block.discard(user)
            effects.append(Unblocked(block, EXPIRY_ACTOR, wall_now))
        if not effects:
            return Change()
        self.generation += 1
        return Change(tuple(effects), needs_generation=self.generation)

    def next_expiry(self) -> float | None:
        """The wall-clock time of the next expiry to look at (maybe of a block lifted since,
        which :meth:`expire_due` then drops); None when no block expires."""
        return self.expiries.next_at()

    def _expiry_of(self, user: str) -> float | None:
        block = self.blocks.get(user)
        return None if block is None else block.expires_at

    def reset(self, user: str, *, by: str, wall_now: float) -> Change:
        """Forget *user*'s counters, monitor mode's "would block" mark and its history of
        automatic blocks (the next one is a first again).

        A block is not lifted: that is :meth:`unblock`. Nothing changes when there was nothing
        to forget.
        """
        had_counters = self._users.pop(user, None) is not None
        had_counters |= self._users.pop(user + ACCEPTED_SUFFIX, None) is not None
        was_marked = user in self._would_block
        self._would_block.discard(user)
        had_history = self.repeats.forget(user)
        if not (had_counters or was_marked or had_history):
            return Change()
        return Change((Reset(user, by, wall_now),))

    def inspect(self, user: str, *, now: float, wall_now: float) -> UserView:
        """Where *user* stands at monotonic *now*: block, windows, recent failures.

        Pure reading: the stored state is not brought forward or changed.
        """
        view = self._inspect(user, now=now, wall_now=wall_now)
        key = user + ACCEPTED_SUFFIX
        if not self._volume_guard or self.config.limits_for(key) == NO_VOLUME_GUARD:
            return view
        accepted = self._inspect(key, now=now, wall_now=wall_now)
        return attrs.evolve(view, accepted=attrs.evolve(accepted, user=user, samples=()))

    def _inspect(self, user: str, *, now: float, wall_now: float) -> UserView:
        rates = self.config.limits_for(user)
        state = self.user_state(user)
        if state is None:
            levels = tuple(float(rate.count) for rate in rates)
            counted = (0,) * len(rates)
            marks = (False,) * len(rates)
        else:
            elapsed = now - buckets.updated(state)
            levels = tuple(
                buckets.refilled(tokens, elapsed, rate)
                for tokens, rate in zip(buckets.tokens_left(state, rates), rates, strict=True)
            )
            counted = buckets.window_counts(state, rates, now)
            marks = buckets.warned_windows(state, rates, now)
        windows = tuple(
            WindowView.at(rate, count, tokens, wall_now)
            for rate, count, tokens in zip(rates, counted, levels, strict=True)
        )
        return UserView(
            user=user,
            block=self.blocks.get(user),
            exempt=user in self.config.exempt_users,
            windows=windows,
            samples=tuple(self.failure_samples(user)),
            warned=tuple(rate for rate, mark in zip(rates, marks, strict=True) if mark),
        )

    # -- housekeeping ---------------------------------------------------------------------

    def forget_idle(self, now: float, users: Iterable[str] | None = None) -> int:
        """Drop users whose buckets are full again and whose failures are all out of window.

        Args:
            now: the current time.
            users: the users to look at; by default those whose sweep slot is due
                (:meth:`take_due`), which is every user idle for longer than its longest period.

        Returns:
            How many users were forgotten.
        """
        if users is None:
            return sum(self.sweep(now, slot, due) for slot, due in self.take_due(now))
        limits_for = self.config.limits_for
        tracked = self._users
        idle = []
        for user in users:
            state = tracked.get(user)
            if state is None:
                continue
            rates = limits_for(user)
            self._fit(state, rates)
            if buckets.is_idle(state, rates, now):
                idle.append(user)
        for user in idle:
            tracked.forget(user)
        return len(idle)

    def take_due(self, now: float) -> list[tuple[int, list[str]]]:
        """The idle sweep's slots due at *now*, taken out: ``(slot, users)``, for :meth:`sweep`.

        The daemon sweeps them in small slices between queries; the work is in proportion to
        the users that may have gone idle, not to the users counted.
        """
        return self._users.take_due(now)

    def sweep(self, now: float, slot: int, users: Iterable[str]) -> int:
        """Forget the idle ones among *users*, taken from *slot*; file the others again.

        Returns:
            How many users were forgotten.
        """
        limits_for = self.config.limits_for
        tracked = self._users
        forgotten = 0
        for user in users:
            state = tracked.get(user)
            if state is None or not tracked.is_filed(state, slot):
                continue  # gone, or filed again elsewhere since
            rates = limits_for(user)
            self._fit(state, rates)
            if buckets.is_idle(state, rates, now):
                tracked.forget(user)
                forgotten += 1
            else:
                idle_by = buckets.updated(state) + self._idle_after(rates)
                tracked.refile(user, state, idle_by, slot)
        return forgotten

    def reconfigure(self, config: PolicyConfig, now: float) -> int:
        """Switch to *config* (a reload) without forgiving anything, at a cost that does not
        grow with the users counted.

        Blocks stay. Each counted user keeps what it has used up in every window whose period
        is still configured (:func:`buckets.remap`), so lowering a limit takes effect on the
        next failure. The carrying over is done when a user is next looked at (counted, swept,
        snapshotted): its buckets refill at the old rates up to the reload, at the new ones
        after. Users whose limits did not change are not touched.

        Returns:
            How many counted users' limits changed (their counters are carried over).
        """
        old = self.config
        self.config = config
        self._volume_guard = config.volume_guard
        tracked = self._users
        special = set(old.overrides) | set(config.overrides)
        changed = 0
        if old.failed_recipients != config.failed_recipients:
            changed = len(tracked) - sum(1 for user in special if user in tracked)
        changed += sum(
            1
            for user in special
            if user in tracked and old.limits_for(user) != config.limits_for(user)
        )
        # the volume guard's states are carried over too: record the reload for them as well
        if changed or old.accepted_recipients != config.accepted_recipients:
            self._reloads.append(now)
        return changed

    def _tag(self, rates: tuple[Rate, ...]) -> float:
        """The layout tag of *rates* (equal tuples share one)."""
        known = self._tag_by_id.get(id(rates))
        if known is not None:
            return known[1]
        tag = self._layout_tags.get(rates)
        if tag is None:
            tag = float(len(self._layouts))
            self._layouts.append(rates)
            self._layout_tags[rates] = tag
        self._tag_by_id[id(rates)] = (
            rates,
            tag,
            float(max(rate.period for rate in rates)),
            _recent_limit(rates),
        )
        return tag

    def _idle_after(self, rates: tuple[Rate, ...]) -> float:
        """Seconds after its last update by which a user with *rates* is idle (the longest
        period: every bucket refills fully and every failure leaves its window by then)."""
        known = self._tag_by_id.get(id(rates))
        if known is None:
            self._tag(rates)
            known = self._tag_by_id[id(rates)]
        return known[2]

    def _recent_limit(self, rates: tuple[Rate, ...]) -> int:
        """:func:`buckets.recent_limit` of *rates*, worked out once per tuple."""
        known = self._tag_by_id.get(id(rates))
        if known is None:
            self._tag(rates)
            known = self._tag_by_id[id(rates)]
        return known[3]

    def _fitted(self, state: buckets.UserState, rates: tuple[Rate, ...]) -> buckets.UserState:
        """*state* (laid out for other rates) carried over to *rates*, as a new state."""
        old = self._layouts[int(buckets.layout(state))]
        # the old rates applied until the first reload after the state was last brought forward
        at = bisect.bisect_right(self._reloads, buckets.updated(state))
        reloaded = self._reloads[at] if at < len(self._reloads) else buckets.updated(state)
        fitted = buckets.remap(state, old, rates, reloaded, _recent_limit(rates))
        buckets.set_layout(fitted, self._tag(rates))
        return fitted

    def _fit(self, state: buckets.UserState, rates: tuple[Rate, ...]) -> None:
        """Carry *state* over to *rates* in place, when it is laid out for others."""
        if buckets.layout(state) != self._tag(rates):
            state[:] = self._fitted(state, rates)

    def counting_states(
        self, now: float, users: Iterable[str] | None = None
    ) -> list[tuple[str, tuple[Rate, ...], UserState]]:
        """Users still being counted at *now*, with their limits and state (for a snapshot).

        Idle users (buckets full, failures out of window) are left out: forgetting them loses
        nothing. *users* restricts the walk to a slice of :meth:`tracked_users`, as for
        :meth:`forget_idle`.
        """
        limits_for = self.config.limits_for
        tracked = self._users
        out = []
        for user in list(tracked) if users is None else users:
            state = tracked.get(user)
            if state is None:
                continue
            rates = limits_for(user)
            self._fit(state, rates)
            if not buckets.is_idle(state, rates, now):
                out.append((user, rates, state))
        return out

    def saved_form(self, user: str) -> tuple[tuple[Rate, ...], UserState] | None:
        """*user*'s limits and state for the snapshot, or None when it is no longer counted."""
        state = self._users.get(user)
        if state is None:
            return None
        rates = self.config.limits_for(user)
        self._fit(state, rates)
        return rates, state

    def compaction_batches(self, size: int) -> Iterator[list[str]]:
        """Every counted user once, in lists of at most *size*, for a full snapshot.

        Walks the sweep's wheel slot by slice, so no step copies a million keys. Users counted
        meanwhile are in :meth:`take_changed`; do not sweep while walking.
        """
        tracked = self._users
        for slot, users in tracked.slots():
            for start in range(0, len(users), size):
                batch = []
                for user in users[start : start + size]:
                    state = tracked.get(user)
                    if state is not None and tracked.is_filed(state, slot):
                        batch.append(user)
                yield batch

    def take_changed(self) -> set[str]:
        """The users whose counters changed since the last call (for an incremental snapshot).

        A user in the set that is no longer counted was taken out (blocked, reset, evicted).
        """
        return self._users.take_changed()

    def mark_changed(self, users: Iterable[str]) -> None:
        """Take *users* as changed again (their snapshot could not be written)."""
        for user in users:
            self._users.mark(user)

    def changed_count(self) -> int:
        """How many users changed since :meth:`take_changed`."""
        return self._users.changed_count()

    def restore_state(self, user: str, rates: Sequence[Rate], state: UserState, now: float) -> bool:
        """Take over a counted user from a snapshot made under *rates* (maybe other limits).

        A blocked user stays blocked and is not counted. A user counted already (since a start
        while the snapshot was loading) keeps what it counted and adds what the snapshot held
        (:func:`buckets.merge`). Past ``max_tracked_users`` the rest of the snapshot is not
        taken over.

        Returns:
            Whether the user is now counted with the snapshot's state.
        """
        if user in self.blocks or user.removesuffix(ACCEPTED_SUFFIX) in self.blocks:
            return False
        current = self.config.limits_for(user)
        tag = self._tag(current)
        if self._tag(tuple(rates)) != tag:  # equal rates share a tag: no tuple comparison
            state = buckets.remap(state, rates, current, now, _recent_limit(current))
        buckets.set_layout(state, tag)
        counted = self._users.get(user)
        if counted is not None:
            self._fit(counted, current)
            buckets.merge(counted, state, current, now, _recent_limit(current))
            self._users.mark(user)
            state = counted
        elif len(self._users) >= self.config.max_tracked_users:
            return False
        else:
            self._users.put(user, state, changed=False)
        self._users.file(user, state, buckets.updated(state) + self._idle_after(current))
        if self.config.mode is Mode.MONITOR and any(
            buckets.is_empty(level) for level in buckets.tokens_left(state, current)
        ):
            # it emptied a bucket before the snapshot, so its would-block was told: once per
            # user, across a restart as within a run
            self._would_block.add(user.removesuffix(ACCEPTED_SUFFIX))
        return True

    def failure_samples(self, user: str, limit: int = EVIDENCE_SAMPLES) -> list[FailureSample]:
        """The most recent counted failures of *user* still in the sample ring, newest first."""
        found: list[FailureSample] = []
        for sample in reversed(self._samples):
            if sample[0] == user:
                found.append(FailureSample(*sample))
                if len(found) == limit:
                    break
        return found

    def tracked_users(self) -> list[str]:
        """The users being counted now (a copy, safe to walk while the policy changes)."""
        return list(self._users)

    def user_state(self, user: str) -> UserState | None:
        """The counting state of *user*, if it is being counted (for inspection and tests)."""
        found = self.saved_form(user)
        return None if found is None else found[1]

    def statistics(self) -> PolicyStatistics:
        """Current counts, for ``stats`` and metrics."""
        return PolicyStatistics(
            tracked_users=len(self._users),
            blocked_users=len(self.blocks),
            would_block_users=len(self._would_block),
            generation=self.generation,
        )

    def snapshot_blocks(self) -> tuple[int, Mapping[str, Block]]:
        """The current generation and a copy of the block list, for the store to persist."""
        return self.generation, dict(self.blocks)


_recent_limit = buckets.recent_limit
