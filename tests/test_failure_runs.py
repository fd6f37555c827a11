"""A user's failures decided as a run (``Policy.decide_failures``, ``buckets.count_failures``)
are decided as they are one by one: the replay hands the policy runs, the daemon single
failures, and both must reach the same verdicts, effects and counters."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.config import Mode, PolicyConfig
from spamguardd.core.policy import Blocked, Decision, Effect, Failure, Policy, Warned, WouldBlock
from spamguardd.core.protocol import IPAddress, RcptRequest, Verify
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import Arrival, Completed, Delivery, Event, Rejection, UserKeys
from spamguardd.tools.replay import engine
from spamguardd.tools.replay.engine import Candidate, Replayer
from spamguardd.tools.replay.report import to_json, to_table

USERS = ("auth:a", "auth:b", "auth:c")
IPS = (None, ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("198.51.100.7"))

rate_sets = st.sampled_from(
    [
        (Rate(3, 60),),
        (Rate(5, 600),),
        (Rate(2, 10), Rate(6, 300)),
        (Rate(4, 30), Rate(9, 120), Rate(20, 3600)),
    ]
)

#: One failure: user, recipient (from a small pool, so that retries happen), verify, address,
#: and the seconds since the one before (0: the same second, as log lines often are).
failures = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.integers(0, 12).map(lambda n: f"r{n}@x.test"),
        st.sampled_from([Verify.FAIL, Verify.FAIL, Verify.FAIL, Verify.DEFER]),
        st.sampled_from(IPS),
        st.sampled_from([0.0, 0.0, 1.0, 3.0, 20.0, 200.0]),
    ),
    max_size=120,
)


@st.composite
def configs(draw: st.DrawFn) -> PolicyConfig:
    """Policies as the daemon may be configured: limits, monitor mode, deferrals counted,
    exemptions, the early warning."""
    return PolicyConfig(
        failed_recipients=draw(rate_sets),
        mode=draw(st.sampled_from(Mode)),
        count_defer=draw(st.booleans()),
        warn_at=draw(st.sampled_from([None, None, 0.5])),
        exempt_users=draw(st.sampled_from([frozenset(), frozenset({"auth:c"})])),
        exempt_networks=draw(st.sampled_from([(), (ipaddress.ip_network("198.51.100.0/24"),)])),
    )


Sequenced = list[tuple[str, Failure]]
Drawn = list[tuple[str, str, Verify, IPAddress | None, float]]


def _timed(drawn: Drawn) -> Sequenced:
    now = 1000.0
    out: Sequenced = []
    for user, rcpt, verify, ip, gap in drawn:
        now += gap
        out.append((user, (rcpt, verify, ip, now, now + 5e8)))
    return out


def _one_by_one(policy: Policy, sequence: Sequenced) -> list[tuple[int, Decision]]:
    """Each failure through ``decide``, as the daemon gets them: the decisions with effects."""
    out = []
    for n, (user, (rcpt, verify, ip, now, wall_now)) in enumerate(sequence):
        request = RcptRequest(user, rcpt, verify, ip)
        decision = policy.decide(request, now=now, wall_now=wall_now)
        if decision.effects:
            out.append((n, decision))
    return out


def _state(policy: Policy) -> tuple[object, ...]:
    """Everything the policy decides from later: counters, blocks, marks, evidence."""
    return (
        {user: bytes(state) for user in USERS if (state := policy.user_state(user)) is not None},
        policy.blocks,
        policy.generation,
        policy.statistics(),
        {user: policy.failure_samples(user, 100) for user in USERS},
    )


def _without_evidence(effect: Effect) -> Effect:
    if isinstance(effect, Blocked | WouldBlock | Warned):
        return attrs.evolve(effect, samples=())
    return effect


class TestRunsOfConsecutiveFailures:
    @settings(max_examples=300, deadline=None)
    @given(config=configs(), drawn=failures, cuts=st.lists(st.integers(1, 6), max_size=60))
    def test_same_decisions_and_state(
        self, config: PolicyConfig, drawn: Drawn, cuts: list[int]
    ) -> None:
        """Cutting the failures into runs of one user's consecutive failures changes nothing:
        the same effects (evidence included) at the same failures, the same counters after."""
        sequence = _timed(drawn)
        alone, runs = Policy(config), Policy(config)
        expected = _one_by_one(alone, sequence)
        got: list[tuple[int, Decision]] = []
        start, sizes = 0, iter(cuts)
        while start < len(sequence):
            user = sequence[start][0]
            stop = start + 1
            limit = start + next(sizes, 1_000)
            while stop < min(limit, len(sequence)) and sequence[stop][0] == user:
                stop += 1
            run = [failure for _, failure in sequence[start:stop]]
            got += [(start + i, d) for i, d in runs.decide_failures(user, run)]
            start = stop
        assert [(n, d.reply, d.effects) for n, d in got] == [
            (n, d.reply, d.effects) for n, d in expected
        ]
        assert _state(runs) == _state(alone)


class TestUsersAreIndependent:
    @settings(max_examples=300, deadline=None)
    @given(config=configs(), drawn=failures)
    def test_each_users_failures_as_one_run(self, config: PolicyConfig, drawn: Drawn) -> None:
        """Handing each user's failures over as one run, user after user (as the replay holds
        them back), makes the same effects at the same failures and leaves the same counters;
        only the evidence of a block, drawn from the ring shared by all users, may differ."""
        sequence = _timed(drawn)
        alone, runs = Policy(config), Policy(config)
        expected = _one_by_one(alone, sequence)
        got = []
        for user in USERS:
            picked = [n for n, (who, _) in enumerate(sequence) if who == user]
            decided = runs.decide_failures(user, [sequence[n][1] for n in picked])
            got += [(picked[i], d) for i, d in decided]
        got.sort(key=lambda item: item[0])
        assert [(n, d.reply, [_without_evidence(e) for e in d.effects]) for n, d in got] == [
            (n, d.reply, [_without_evidence(e) for e in d.effects]) for n, d in expected
        ]
        assert _state(runs)[:4] == _state(alone)[:4]

    def test_a_run_stops_at_the_block(self) -> None:
        """After the failure that blocks, the rest of the run is the block list's: no effects,
        nothing counted, the block made once."""
        policy = Policy(PolicyConfig(failed_recipients=(Rate(3, 3600),)))
        run: list[Failure] = [(f"r{i}", Verify.FAIL, None, 10.0 + i, 1e9 + i) for i in range(6)]
        decided = policy.decide_failures("auth:a", run)
        assert [(n, type(e).__name__) for n, d in decided for e in d.effects] == [(2, "Blocked")]
        assert policy.generation == 1
        assert policy.decide_failures("auth:a", run) == []


def _reference_count(
    state: buckets.UserState, rates: Sequence[Rate], rcpt: str, now: float, limit: int
) -> tuple[bool, Rate | None]:
    """``count_failure`` as composed from the module's helpers, one step each."""
    w = len(rates)
    mark = buckets.fingerprint(rcpt)
    buckets.refill(state, rates, now)
    with buckets._view(state) as view:
        found = buckets._probe(view, mark, w)[0]
        full = 2 * (view[2] + 1) > (len(view) - 4 - w) // (1 + w)
    if found < 0:
        if full:
            state[:] = buckets._build(
                (buckets.updated(state), buckets.layout(state), buckets.filed(state)),
                buckets.tokens_left(state, rates),
                _reference_kept(state, rates, now, limit),
                w,
                room=1 if _live_count(state, rates, now) <= limit else max(1, limit // 2),
            )
        with buckets._view(state) as view:
            found = buckets._insert(view, buckets._probe(view, mark, w)[1], mark, w)
    with buckets._view(state) as view:
        return buckets._take(view, found, rates, now)


def _reference_kept(
    state: buckets.UserState, rates: Sequence[Rate], now: float, limit: int
) -> list[list[float]]:
    with buckets._view(state) as view:
        entries = buckets._entries(view, len(rates))
    return buckets._newest(buckets._live(entries, rates, now), limit)


def _live_count(state: buckets.UserState, rates: Sequence[Rate], now: float) -> int:
    with buckets._view(state) as view:
        return len(buckets._live(buckets._entries(view, len(rates)), rates, now))


class TestBucketsRuns:
    @settings(max_examples=300, deadline=None)
    @given(
        rates=rate_sets,
        limit=st.sampled_from([1, 3, 8, 32]),
        steps=st.lists(
            st.tuples(st.integers(0, 40), st.sampled_from([0.0, 0.0, 1.0, 7.0, 100.0, -1.0])),
            max_size=200,
        ),
        cuts=st.lists(st.integers(1, 9), max_size=60),
    )
    def test_written_out_loop_counts_as_the_helpers_do(
        self,
        rates: tuple[Rate, ...],
        limit: int,
        steps: list[tuple[int, float]],
        cuts: list[int],
    ) -> None:
        """``count_failures`` over runs leaves the state byte for byte as the refill, probe,
        rebuild, insertion and taking of tokens do one failure at a time (a clock that goes
        back included), and says the same of each failure."""
        ours, theirs = buckets.new_state(rates, 0.0), buckets.new_state(rates, 0.0)
        now = 0.0
        timed = []
        for n, gap in steps:
            now += gap
            timed.append((f"r{n}", now))
        expected = [_reference_count(theirs, rates, rcpt, at, limit) for rcpt, at in timed]
        got: list[tuple[bool, Rate | None]] = []
        start, sizes = 0, iter(cuts)
        while start < len(timed):
            run = timed[start : start + next(sizes, 1_000)]
            counted, tripped = buckets.count_failures(
                ours, rates, [r for r, _ in run], [t for _, t in run], limit
            )
            got += [(hit, None) for hit in counted[:-1]] + [(counted[-1], tripped)]
            start += len(counted)
        assert got == expected
        assert bytes(ours) == bytes(theirs)


# -- the replay: held back and handed over in runs, or each failure at once -------------------

KEYS = UserKeys([ipaddress.ip_network("192.0.2.0/24")])
SENDERS = (("a@x.test", None), ("b@x.test", None), (None, "192.0.2.9"))


#: Enough senders to fill a small cap of tracked users.
CROWD = tuple((f"u{n}@x.test", None) for n in range(7))


@st.composite
def logs(
    draw: st.DrawFn,
    senders: tuple[tuple[str | None, str | None], ...] = SENDERS,
    steps: tuple[float, ...] = (0.0, 0.0, 1.0, 30.0, 700.0),
) -> list[Event]:
    """Events of a log: failed recipients of *senders*, their messages (received,
    delivered, failed at delivery, completed), in time order."""
    events: list[Event] = []
    now = 1_795_833_830.0
    messages = 0
    for _ in range(draw(st.integers(0, 150))):
        now += draw(st.sampled_from(steps))
        auth, host = draw(st.sampled_from(senders))
        kind = draw(st.sampled_from(["reject", "reject", "reject", "message"]))
        rcpt = f"r{draw(st.integers(0, 10))}@y.test"
        if kind == "reject":
            events.append(Rejection(now, rcpt, auth, host, "Unrouteable address", True, False))
            continue
        messages += 1
        mid = f"1xX8Pm-{messages:06d}-0q"
        events.append(Arrival(now, mid, auth, host, recipients=2))
        events.append(Delivery(now, mid, rcpt, False))
        events.append(Delivery(now, mid, "z@y.test", True, by_transport=True))
        events.append(Completed(now, mid))
    return events


class TestReplayRuns:
    @settings(max_examples=150, deadline=None)
    @given(events=logs(), guard=st.booleans())
    def test_held_back_failures_report_as_failures_fed_at_once(
        self, events: list[Event], guard: bool
    ) -> None:
        """The replay's report (blocks, failures before them, frozen recipients, peaks,
        timelines) is the same whether failures are held back and handed over per user or
        handed to the policies one at a time."""
        config = PolicyConfig(accepted_recipients=(Rate(6, 3600),) if guard else None, warn_at=0.5)
        candidates = [Candidate.parse("4/1m"), Candidate.parse("3/1h,8/1d")]

        def replayed() -> tuple[object, ...]:
            replayer = Replayer(config, candidates, KEYS)
            replayer.feed_all(events)
            report = replayer.report
            return to_json(report), to_table(report), dict(report.timelines)

        batched = replayed()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "MAX_PENDING", 1)
            assert replayed() == batched


@settings(max_examples=300, deadline=None)
@given(events=logs(CROWD, (0.0, 0.0, 1.0, 20.0, 61.0)), cap=st.integers(2, 5))
def test_the_same_users_make_room_at_the_cap(events: list[Event], cap: int) -> None:
    """At a small cap of tracked users, the user who makes room is the first filed in the
    earliest minute of the policies' wheel: held back and handed over in runs, every candidate
    files users in the order one by one would (interleaved users, messages, minutes), so the
    same users are dropped and the same ones blocked."""
    config = PolicyConfig(max_tracked_users=cap)
    candidates = [Candidate.parse("3/1h"), Candidate.parse("2/10m,4/1d")]

    def replayed() -> object:
        replayer = Replayer(config, candidates, KEYS)
        replayer.feed_all(events)
        return to_json(replayer.report)

    batched = replayed()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "MAX_PENDING", 1)
        assert replayed() == batched


def test_no_cap_reached_while_holding_back() -> None:
    """Near ``limits.max_tracked_users`` (where which user makes room depends on the order of
    all users' failures) the replay hands each failure over at once, and reports the same."""
    events: list[Event] = [
        Rejection(1000.0 + n, f"r{n}@y.test", f"u{n % 7}@x.test", None, "Unrouteable", True, False)
        for n in range(200)
    ]
    config = PolicyConfig(max_tracked_users=3)
    reports = []
    for pending in (1, engine.MAX_PENDING):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "MAX_PENDING", pending)
            replayer = Replayer(config, [Candidate.parse("5/1h")], KEYS)
            replayer.feed_all(events)
            reports.append(to_json(replayer.report))
            assert all(
                result.policy.statistics().tracked_users <= 3 for result in replayer.report.results
            )
    assert reports[0] == reports[1]
