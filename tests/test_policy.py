"""Token buckets and the policy: who is counted, when a user is blocked, what they get then."""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.buckets import fingerprint, is_empty, refilled
from spamguardd.core.config import Mode, PolicyConfig
from spamguardd.core.policy import Block, Blocked, FailureSample, Policy, WouldBlock
from spamguardd.core.protocol import (
    CheckRequest,
    PingRequest,
    RcptRequest,
    Reply,
    ReportRequest,
    Verdict,
    Verify,
)
from spamguardd.core.rate import Rate
from tests.helpers import T0

HOUR = 3600.0
FIVE_PER_HOUR = PolicyConfig(failed_recipients=(Rate(5, 3600),))


def fail(user: str, rcpt: str, ip: str | None = None) -> RcptRequest:
    return RcptRequest(
        user=user,
        rcpt=rcpt,
        verify=Verify.FAIL,
        ip=None if ip is None else ipaddress.ip_address(ip),
    )


def run(policy: Policy, request: RcptRequest | ReportRequest | CheckRequest, now: float) -> Reply:
    return policy.decide(request, now=now, wall_now=T0 + now).reply


class TestBuckets:
    def test_burst_empties_at_capacity(self) -> None:
        """A 5/1h bucket has room for 4 failures in a burst; the 5th empties it."""
        rates = [Rate(5, 3600)]
        state = buckets.new_state(rates, now=0.0)
        tripped = [buckets.count_failure(state, rates, f"r{i}", 0.0, 32)[1] for i in range(5)]
        assert tripped == [None, None, None, None, Rate(5, 3600)]

    def test_refills_continuously_up_to_capacity(self) -> None:
        """Tokens come back at count/period and never beyond capacity."""
        rate = Rate(100, 3600)
        assert refilled(50.0, 18.0, rate) == pytest.approx(50.5)  # 36 s per token at 100/h
        assert refilled(50.0, 10 * HOUR, rate) == 100.0

    def test_clock_going_back_credits_nothing(self) -> None:
        """A time earlier than the last update neither refills nor drains."""
        assert refilled(9.0, -50.0, Rate(10, 3600)) == 9.0

    @pytest.mark.parametrize(("tokens", "empty"), [(1.0, False), (0.999999, True), (0.0, True)])
    def test_empty_means_less_than_one_whole_token(self, tokens: float, empty: bool) -> None:
        """A fraction of a token does not pay for another failure."""
        assert is_empty(tokens) is empty

    @given(
        counts=st.lists(st.integers(1, 1000), min_size=1, max_size=3, unique=True),
        steps=st.lists(st.tuples(st.floats(-100, 10**5), st.integers(0, 30)), max_size=60),
    )
    def test_tokens_stay_within_bounds(
        self, counts: list[int], steps: list[tuple[float, int]]
    ) -> None:
        """0 <= tokens <= capacity in every window, whatever the times and recipients."""
        rates = [Rate(count, 3600 * (i + 1)) for i, count in enumerate(counts)]
        state = buckets.new_state(rates, now=0.0)
        now = 0.0
        for delta, rcpt in steps:
            now += delta
            buckets.count_failure(state, rates, f"r{rcpt}", now, 32)
            for tokens, rate in zip(buckets.tokens_left(state, rates), rates, strict=True):
                assert 0.0 <= tokens <= rate.count

    @given(count=st.integers(1, 500), gap=st.floats(0, 1))
    def test_nth_failure_seconds_apart_empties(self, count: int, gap: float) -> None:
        """Failures up to a second apart still trip an N/(N hours) limit at exactly the Nth."""
        rates = [Rate(count, 3600 * count)]
        state = buckets.new_state(rates, now=0.0)
        tripped = [
            buckets.count_failure(state, rates, f"r{i}", i * gap, count)[1] for i in range(count)
        ]
        assert tripped == [None] * (count - 1) + [rates[0]]

    def test_recent_failures_are_bounded(self) -> None:
        """At least the 32 most recent distinct failures are remembered, and not many more."""
        rates = [Rate(10**6, 3600)]
        state = buckets.new_state(rates, now=0.0)
        for i in range(100):
            buckets.count_failure(state, rates, f"r{i}", float(i), 32)
        assert 32 <= buckets.remembered(state, rates) <= 2 * 32 + 4
        assert len(state) <= 8 * (4 + 4 * (32 + 1) * 2)
        assert not gc.is_tracked(state)  # invisible to the collector
        assert buckets.count_failure(state, rates, "r99", 100.0, 32)[0] is False  # a retry
        assert buckets.count_failure(state, rates, "r0", 100.0, 32)[0] is True  # forgotten

    def test_large_limits_remember_a_bounded_number(self) -> None:
        """A 10000/1d limit remembers MAX_RECENT recipients (at most twice that, briefly)."""
        rates = [Rate(10_000, 86400)]
        limit = min(buckets.MAX_RECENT, 10_000)
        state = buckets.new_state(rates, now=0.0)
        for i in range(5000):
            buckets.count_failure(state, rates, f"r{i}", float(i), limit)
        assert buckets.MAX_RECENT <= buckets.remembered(state, rates) <= 2 * buckets.MAX_RECENT
        assert buckets.count_failure(state, rates, "r4999", 5000.0, limit)[0] is False

    @given(
        counts=st.lists(st.integers(1, 40), min_size=1, max_size=3),
        steps=st.lists(st.tuples(st.floats(0, 2000), st.integers(0, 40)), max_size=120),
    )
    def test_matches_a_model_that_remembers_everything(
        self, counts: list[int], steps: list[tuple[float, int]]
    ) -> None:
        """With no more distinct recipients than it remembers, the table behaves like a dict.

        The model keeps every recipient's last counted time per window in a plain dict and
        refills the buckets the same way: the verdicts and the tokens must agree exactly.
        """
        rates = [Rate(count, 600 * (i + 1)) for i, count in enumerate(counts)]
        state = buckets.new_state(rates, now=0.0)
        seen: dict[str, list[float]] = {}
        tokens = [float(rate.count) for rate in rates]
        updated = 0.0
        now = 0.0
        for delta, rcpt_number in steps:
            now += delta
            rcpt = f"r{rcpt_number}"
            got = buckets.count_failure(state, rates, rcpt, now, 64)
            if now > updated:
                tokens = [refilled(t, now - updated, r) for t, r in zip(tokens, rates, strict=True)]
                updated = now
            times = seen.setdefault(rcpt, [-math.inf] * len(rates))
            counted, tripped = False, None
            for index, rate in enumerate(rates):
                if now - times[index] < rate.period:
                    continue
                counted = True
                times[index] = now
                tokens[index] = max(0.0, tokens[index] - 1.0)
                if tripped is None and is_empty(tokens[index]):
                    tripped = rate
            assert got == (counted, tripped)
            assert buckets.tokens_left(state, rates) == pytest.approx(tuple(tokens))

    def test_fingerprint_is_stable_and_8bit_safe(self) -> None:
        """Fingerprints survive a restart (no per-process hash seed) and take any bytes."""
        assert fingerprint("a@b") == fingerprint("a@b") != fingerprint("a@c")
        assert fingerprint("\udcff@x") != fingerprint("\udcfe@x")
        assert fingerprint("a@b") == float(
            int.from_bytes(hashlib.blake2b(b"a@b", digest_size=8).digest(), "big") >> 12
        )


class TestThreshold:
    def test_blocked_at_exactly_the_limit(self) -> None:
        """With 5/1h, failures 1-4 are accepted and the 5th gets the freeze verdict."""
        policy = Policy(FIVE_PER_HOUR)
        replies = [run(policy, fail("auth:m", f"r{i}@x"), now=i * 10.0) for i in range(5)]
        assert [r.verdict for r in replies] == [Verdict.ACCEPT] * 4 + [Verdict.FREEZE]
        assert replies[4].reason == "5 failed recipients within 1h"

    def test_block_effect_is_returned_once(self) -> None:
        """The policy reports the block once, for the server to persist and announce."""
        policy = Policy(FIVE_PER_HOUR)
        decisions = [
            policy.decide(fail("auth:m", f"r{i}"), now=1.0, wall_now=T0 + 1) for i in range(8)
        ]
        effects = [e for d in decisions for e in d.effects]
        block = Block("auth:m", T0 + 1, "5 failed recipients within 1h", "auto")
        evidence = tuple(FailureSample("auth:m", f"r{i}", None, T0 + 1) for i in range(5))
        assert effects == [Blocked(block, Rate(5, 3600), evidence)]
        assert decisions[4].needs_generation == 1
        assert policy.blocks["auth:m"].blocked_at == T0 + 1

    @pytest.mark.parametrize("verify", list(Verify))
    def test_blocked_user_gets_the_verdict_whatever_the_verify_result(self, verify: Verify) -> None:
        """Once blocked, every recipient and every check of that user gets the block verdict."""
        policy = Policy(FIVE_PER_HOUR, [Block("auth:m", T0, "manual", "admin")])
        request = RcptRequest("auth:m", "friend@example.org", verify)
        assert run(policy, request, 0.0) == Reply(Verdict.FREEZE, "manual")
        assert run(policy, CheckRequest("auth:m"), 0.0) == Reply(Verdict.FREEZE, "manual")
        assert run(policy, CheckRequest("auth:other"), 0.0) == Reply(Verdict.ACCEPT)

    @pytest.mark.parametrize("verdict", [Verdict.REJECT, Verdict.DEFER])
    def test_block_verdict_is_configurable(self, verdict: Verdict) -> None:
        """block.verdict = reject|defer answers that word instead of freeze."""
        policy = Policy(attrs.evolve(FIVE_PER_HOUR, verdict=verdict))
        replies = [run(policy, fail("auth:m", f"r{i}"), 0.0) for i in range(6)]
        assert replies[4].verdict is verdict
        assert replies[5].verdict is verdict

    def test_refill_forgives_slow_failures(self) -> None:
        """4 failures, an hour of quiet, 4 more: a full bucket again, no block."""
        policy = Policy(FIVE_PER_HOUR)
        replies = [run(policy, fail("auth:m", f"a{i}"), 0.0) for i in range(4)]
        replies += [run(policy, fail("auth:m", f"b{i}"), HOUR) for i in range(4)]
        assert {r.verdict for r in replies} == {Verdict.ACCEPT}

    def test_users_are_counted_apart(self) -> None:
        """One user's failures never count against another."""
        policy = Policy(FIVE_PER_HOUR)
        for i in range(4):
            run(policy, fail("auth:a", f"r{i}"), 0.0)
            run(policy, fail("auth:b", f"r{i}"), 0.0)
        assert run(policy, fail("auth:a", "last"), 0.0).verdict is Verdict.FREEZE
        assert run(policy, CheckRequest("auth:b"), 0.0).verdict is Verdict.ACCEPT

    def test_second_window_trips_on_its_own(self) -> None:
        """With 10/1h and 15/1d, 8 failures an hour pass the hour but trip the day at the 15th."""
        policy = Policy(PolicyConfig(failed_recipients=(Rate(10, 3600), Rate(15, 86400))))
        verdicts = []
        for i in range(16):
            hour, n = divmod(i, 8)
            verdicts.append(run(policy, fail("auth:m", f"r{i}"), hour * HOUR + n).verdict)
        assert verdicts.index(Verdict.FREEZE) == 14
        assert policy.blocks["auth:m"].reason == "15 failed recipients within 1d"

    @given(st.integers(1, 300))
    def test_never_blocked_below_the_limit(self, count: int) -> None:
        """Fewer than N failures never block, and the Nth in a burst always does."""
        policy = Policy(PolicyConfig(failed_recipients=(Rate(count, 3600),)))
        verdicts = [run(policy, fail("u", f"r{i}"), 0.0).verdict for i in range(count)]
        assert verdicts[:-1] == [Verdict.ACCEPT] * (count - 1)
        assert verdicts[-1] is Verdict.FREEZE


class TestWhatCounts:
    def test_verified_recipients_are_not_counted(self) -> None:
        """verify=ok never takes a token."""
        policy = Policy(FIVE_PER_HOUR)
        for i in range(50):
            assert (
                run(policy, RcptRequest("auth:m", f"r{i}", Verify.OK), 0.0).verdict
                is Verdict.ACCEPT
            )
        assert policy.user_state("auth:m") is None

    def test_defer_not_counted_by_default(self) -> None:
        """A temporary verification problem is not evidence against the sender."""
        policy = Policy(FIVE_PER_HOUR)
        for i in range(10):
            run(policy, RcptRequest("auth:m", f"r{i}", Verify.DEFER), 0.0)
        assert "auth:m" not in policy.blocks

    def test_defer_counted_when_configured(self) -> None:
        """limits.count_defer = true counts deferrals like failures."""
        policy = Policy(attrs.evolve(FIVE_PER_HOUR, count_defer=True))
        replies = [run(policy, RcptRequest("auth:m", f"r{i}", Verify.DEFER), 0.0) for i in range(5)]
        assert replies[-1].verdict is Verdict.FREEZE

    def test_same_recipient_counts_once_per_window(self) -> None:
        """Callout-cache retries of one bad address count once within the window, again after."""
        policy = Policy(FIVE_PER_HOUR)
        for minute in range(0, 59, 5):
            decision = policy.decide(fail("auth:m", "same@x"), now=minute * 60.0, wall_now=T0)
            assert decision.counted is (minute == 0)
        assert policy.decide(fail("auth:m", "same@x"), now=HOUR, wall_now=T0).counted
        assert "auth:m" not in policy.blocks

    def test_dedupe_is_per_window(self) -> None:
        """A repeat after 2h counts in the hour window but not again in the day window."""
        policy = Policy(PolicyConfig(failed_recipients=(Rate(10, 3600), Rate(20, 86400))))
        policy.decide(fail("u", "same"), now=0.0, wall_now=T0)
        decision = policy.decide(fail("u", "same"), now=2 * HOUR, wall_now=T0)
        assert decision.counted
        # hour: a fresh token taken from a refilled bucket; day: not taken again, refilled to 20
        assert decision.tokens_left == pytest.approx((9.0, 20.0))

    def test_dedupe_is_per_user(self) -> None:
        """Two users failing on the same address are both counted."""
        policy = Policy(FIVE_PER_HOUR)
        assert policy.decide(fail("a", "same"), now=0.0, wall_now=T0).counted
        assert policy.decide(fail("b", "same"), now=0.0, wall_now=T0).counted

    def test_exempt_users_are_never_counted(self) -> None:
        """exempt.users: any number of failures, always accept."""
        policy = Policy(attrs.evolve(FIVE_PER_HOUR, exempt_users=frozenset({"auth:mon"})))
        assert {run(policy, fail("auth:mon", f"r{i}"), 0.0).verdict for i in range(20)} == {
            Verdict.ACCEPT
        }

    def test_exempt_networks_match_ip(self) -> None:
        """exempt.networks match the client address given as ip=, v4 and v6."""
        config = attrs.evolve(
            FIVE_PER_HOUR,
            exempt_networks=(
                ipaddress.ip_network("192.0.2.0/24"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
        )
        policy = Policy(config)
        for i in range(10):
            run(policy, fail("ip:192.0.2.9", f"r{i}", ip="192.0.2.9"), 0.0)
            run(policy, fail("ip:2001:db8::/64", f"r{i}", ip="2001:db8::5"), 0.0)
        assert not policy.blocks
        for i in range(5):
            run(policy, fail("ip:198.51.100.1", f"r{i}", ip="198.51.100.1"), 0.0)
        assert list(policy.blocks) == ["ip:198.51.100.1"]

    def test_override_changes_the_limit_for_one_user(self) -> None:
        """[[override]] gives one user its own windows; others keep the defaults."""
        config = attrs.evolve(FIVE_PER_HOUR, overrides={"auth:news": (Rate(8, 3600),)})
        policy = Policy(config)
        news = [run(policy, fail("auth:news", f"r{i}"), 0.0).verdict for i in range(8)]
        other = [run(policy, fail("auth:x", f"r{i}"), 0.0).verdict for i in range(5)]
        assert news.index(Verdict.FREEZE) == 7
        assert other.index(Verdict.FREEZE) == 4


class TestMonitorMode:
    def test_counts_and_reports_but_accepts(self) -> None:
        """mode = monitor: the would-be block is reported once, and everything is accepted."""
        policy = Policy(attrs.evolve(FIVE_PER_HOUR, mode=Mode.MONITOR))
        decisions = [policy.decide(fail("auth:m", f"r{i}"), now=0.0, wall_now=T0) for i in range(9)]
        assert {d.reply.verdict for d in decisions} == {Verdict.ACCEPT}
        [effect] = [e for d in decisions for e in d.effects]
        assert isinstance(effect, WouldBlock)
        assert (effect.user, effect.rate) == ("auth:m", Rate(5, 3600))
        assert not policy.blocks
        assert policy.statistics().would_block_users == 1

    def test_existing_blocks_stay_in_force(self) -> None:
        """Switching to monitor mode does not release a known spammer already on the list."""
        policy = Policy(
            attrs.evolve(FIVE_PER_HOUR, mode=Mode.MONITOR), [Block("auth:m", T0, "earlier")]
        )
        assert run(policy, CheckRequest("auth:m"), 0.0).verdict is Verdict.FREEZE


class TestSamples:
    def test_evidence_is_the_latest_ten_counted_failures(self) -> None:
        """A block carries the user's last 10 counted failures, oldest first, with time and IP."""
        policy = Policy(PolicyConfig(failed_recipients=(Rate(15, 3600),)))
        decisions = [
            policy.decide(fail("auth:m", f"r{i}@x", ip="192.0.2.9"), now=i, wall_now=T0 + i)
            for i in range(15)
        ]
        policy.decide(fail("auth:m", "r14@x"), now=15, wall_now=T0 + 15)  # blocked: not counted
        [blocked] = decisions[-1].effects
        assert isinstance(blocked, Blocked)
        assert [s.rcpt for s in blocked.samples] == [f"r{i}@x" for i in range(5, 15)]
        assert blocked.samples[-1].at == T0 + 14
        assert str(blocked.samples[0].ip) == "192.0.2.9"

    def test_samples_are_per_user_and_skip_retries(self) -> None:
        """Another user's failures and uncounted retries are not anyone's evidence."""
        policy = Policy(FIVE_PER_HOUR)
        policy.decide(fail("auth:a", "x"), now=0, wall_now=T0)
        policy.decide(fail("auth:a", "x"), now=1, wall_now=T0 + 1)
        policy.decide(fail("auth:b", "y"), now=2, wall_now=T0 + 2)
        assert [(s.rcpt, s.at) for s in policy.failure_samples("auth:a")] == [("x", T0)]
        assert [s.rcpt for s in policy.failure_samples("auth:b")] == ["y"]


class TestHousekeeping:
    def test_blocked_users_hold_no_counters(self) -> None:
        """A block drops the user's buckets: a blocked spammer costs one record."""
        policy = Policy(FIVE_PER_HOUR)
        for i in range(5):
            run(policy, fail("auth:m", f"r{i}"), 0.0)
        assert policy.user_state("auth:m") is None
        assert policy.statistics().tracked_users == 0
        assert policy.statistics().blocked_users == 1

    def test_idle_users_are_forgotten(self) -> None:
        """Users whose buckets are full again and whose failures are out of window are dropped."""
        policy = Policy(FIVE_PER_HOUR)
        run(policy, fail("auth:a", "r"), 0.0)
        run(policy, fail("auth:b", "r"), 1800.0)
        assert policy.forget_idle(HOUR) == 1
        assert policy.user_state("auth:a") is None
        assert policy.user_state("auth:b") is not None

    def test_ping(self) -> None:
        """ping answers pong."""
        assert (
            Policy(FIVE_PER_HOUR).decide(PingRequest(), now=0, wall_now=0).reply.verdict
            is Verdict.PONG
        )

    def test_day_of_mixed_traffic(self) -> None:
        """A day: a busy sender with typos is never blocked; a spammer is, when predicted."""
        policy = Policy(PolicyConfig())
        blocked_at = None
        for minute in range(24 * 60):
            now = minute * 60.0
            # the legitimate user mistypes an address every 2 minutes: 30 per hour < 100
            if minute % 2 == 0:
                run(policy, fail("auth:sales", f"typo{minute}@x"), now)
            # the spammer starts at 14:00 and tries 5 harvested addresses a minute
            if minute >= 14 * 60 and blocked_at is None:
                for i in range(5):
                    reply = run(policy, fail("auth:spam", f"h{minute}-{i}@x"), now)
                    if reply.verdict is Verdict.FREEZE:
                        blocked_at = (minute - 14 * 60) * 5 + i + 1
        assert "auth:sales" not in policy.blocks
        assert blocked_at is not None
        # 300 failures/h against a refill of 100/h drains the 100 tokens in half an hour, during
        # which 50 more were earned: the 150th failure (give or take rounding) is the block
        assert 149 <= blocked_at <= 151


class TestReport:
    """``report`` (a delivery-time failure from event_action) counts through the rcpt path."""

    def test_reports_count_up_to_a_block(self) -> None:
        """Delivery-time failures alone can block a user."""
        policy = Policy(FIVE_PER_HOUR)
        replies = [
            run(policy, ReportRequest("auth:m", f"r{i}@x", "msg:fail:delivery"), now=i)
            for i in range(5)
        ]
        assert [r.verdict for r in replies] == [Verdict.ACCEPT] * 4 + [Verdict.FREEZE]

    def test_recipient_counted_at_rcpt_time_is_not_counted_again(self) -> None:
        """A recipient that failed verification and then fails delivery counts once."""
        policy = Policy(FIVE_PER_HOUR)
        run(policy, fail("auth:m", "gone@x"), now=1.0)
        decision = policy.decide(
            ReportRequest("auth:m", "gone@x", "msg:fail:delivery"), now=2.0, wall_now=T0
        )
        assert not decision.counted
        assert decision.tokens_left is not None
        assert decision.tokens_left[0] < 4.01  # only the refill of one second came back

    def test_deferral_counts_only_with_count_defer(self) -> None:
        """``msg:rcpt:defer`` is a temporary problem, like ``verify=defer``."""
        report = ReportRequest("auth:m", "slow@x", "msg:rcpt:defer")
        assert not Policy(FIVE_PER_HOUR).decide(report, now=1.0, wall_now=T0).counted
        counting = Policy(attrs.evolve(FIVE_PER_HOUR, count_defer=True))
        assert counting.decide(report, now=1.0, wall_now=T0).counted

    def test_blocked_user_report_gets_the_verdict(self) -> None:
        """A report for a blocked user changes nothing and answers the block verdict."""
        policy = Policy(FIVE_PER_HOUR, [Block("auth:m", T0, "by hand", "admin")])
        reply = run(policy, ReportRequest("auth:m", "x@y", "msg:fail:delivery"), now=1.0)
        assert reply == Reply(Verdict.FREEZE, "by hand")
