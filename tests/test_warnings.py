"""The early warning (``limits.warn_at``): once per user and window, nothing blocked. Pure."""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.config import Config, PolicyConfig
from spamguardd.core.errors import ConfigError
from spamguardd.core.policy import Blocked, Decision, Policy, Warned
from spamguardd.core.protocol import RcptRequest, Verdict, Verify
from spamguardd.core.rate import Rate
from tests.helpers import T0

HOUR = 3600.0
HUNDRED = Rate(100, 3600)
WARN_HALF = PolicyConfig(failed_recipients=(HUNDRED,), warn_at=0.5)


def fail(policy: Policy, rcpt: str, now: float, user: str = "auth:a") -> Decision:
    request = RcptRequest(user=user, rcpt=rcpt, verify=Verify.FAIL)
    return policy.decide(request, now=now, wall_now=T0 + now)


def warnings(decisions: list[Decision]) -> list[tuple[int, Warned]]:
    return [
        (index, effect)
        for index, decision in enumerate(decisions)
        for effect in decision.effects
        if isinstance(effect, Warned)
    ]


def burst(policy: Policy, count: int, now: float, prefix: str = "r") -> list[Decision]:
    return [fail(policy, f"{prefix}{i}@x.test", now) for i in range(count)]


def test_warns_once_when_half_the_bucket_is_used() -> None:
    """With 100/1h and warn_at 0.5 the 50th failure warns; the next 40 do not; none blocks."""
    policy = Policy(WARN_HALF)
    decisions = burst(policy, 90, now=0.0)
    ((index, effect),) = warnings(decisions)
    assert index == 49
    assert effect == Warned("auth:a", HUNDRED, 50, T0, effect.samples)
    assert len(effect.samples) == 10
    assert effect.samples[-1].rcpt == "r49@x.test"
    assert all(d.reply.verdict is Verdict.ACCEPT for d in decisions)
    assert not policy.blocks


def test_no_warning_without_warn_at() -> None:
    """Off by default: the same traffic makes no effect until the block."""
    policy = Policy(PolicyConfig(failed_recipients=(HUNDRED,)))
    decisions = burst(policy, 100, now=0.0)
    assert [type(e) for d in decisions for e in d.effects] == [Blocked]


def test_not_again_until_refilled_to_half_the_mark() -> None:
    """Refilling just above the mark and crossing it again does not warn; refilling to a
    quarter used (half the mark) does, on the next crossing."""
    policy = Policy(WARN_HALF)
    burst(policy, 50, now=0.0)
    # 36 s a token: after 10 tokens back (40 used) and 10 more failures, still quiet
    assert warnings(burst(policy, 12, now=360.0, prefix="s")) == []
    # 52 used; 40 tokens later 12 are: under half the mark, so the 38th failure warns again
    later = 360.0 + 36.0 * 40
    assert policy.inspect("auth:a", now=later, wall_now=T0).warned == (HUNDRED,)
    again = burst(policy, 40, now=later, prefix="t")
    assert [index for index, _ in warnings(again)] == [37]


def test_steady_failures_at_the_refill_rate_warn_once() -> None:
    """A user hovering at the mark (about one failure per refilled token) is warned once."""
    policy = Policy(WARN_HALF)
    decisions = burst(policy, 50, now=0.0)
    now = 0.0
    for i in range(200):  # 36 s a token: 34 s and 38 s gaps cross the mark again and again
        now += 34.0 if i % 2 else 38.0
        decisions.append(fail(policy, f"slow{i}@x.test", now))
    assert [index for index, _ in warnings(decisions)] == [49]


def test_each_window_warns_on_its_own() -> None:
    """10/1h warns at its 5th failure; 12/1d at its 6th used, in a later burst."""
    hourly, daily = Rate(10, 3600), Rate(12, 86400)
    policy = Policy(PolicyConfig(failed_recipients=(hourly, daily), warn_at=0.5))
    decisions = burst(policy, 5, now=0.0)
    # two hours on: the hourly bucket is full again, the daily one has 4 used
    decisions += burst(policy, 3, now=2 * HOUR, prefix="b")
    assert [(index, effect.rate) for index, effect in warnings(decisions)] == [
        (4, hourly),
        (6, daily),
    ]
    assert policy.inspect("auth:a", now=2 * HOUR, wall_now=T0).warned == (daily,)


def test_a_failure_that_blocks_does_not_warn() -> None:
    """When the mark and the limit fall on the same failure the block alone goes out."""
    policy = Policy(PolicyConfig(failed_recipients=(Rate(2, 3600),), warn_at=0.9))
    decisions = burst(policy, 2, now=0.0)
    assert [type(e) for d in decisions for e in d.effects] == [Blocked]


def test_retries_do_not_warn() -> None:
    """A repeated failed recipient takes no token and so never crosses the mark."""
    policy = Policy(WARN_HALF)
    burst(policy, 49, now=0.0)
    assert warnings([fail(policy, "r0@x.test", 1.0) for _ in range(5)]) == []


def test_the_mark_survives_the_snapshot() -> None:
    """A user warned before a restart is not warned again after it (the mark is in the state
    the snapshot saves)."""
    policy = Policy(WARN_HALF)
    burst(policy, 60, now=0.0)
    state = policy.user_state("auth:a")
    assert state is not None
    values = buckets.export(state, (HUNDRED,), 10.0, shift=T0)
    restored = buckets.import_state(
        values, (HUNDRED,), buckets.recent_limit((HUNDRED,)), shift=-T0, latest=10.0
    )
    fresh = Policy(WARN_HALF)
    assert fresh.restore_state("auth:a", (HUNDRED,), restored, now=10.0)
    assert fresh.inspect("auth:a", now=10.0, wall_now=T0).warned == (HUNDRED,)
    assert warnings(burst(fresh, 20, now=10.0, prefix="n")) == []


def test_the_mark_survives_a_reload() -> None:
    """A reload that keeps the window (even with a new count or warn_at) keeps the mark."""
    policy = Policy(WARN_HALF)
    burst(policy, 60, now=0.0)
    policy.reconfigure(
        PolicyConfig(failed_recipients=(Rate(120, 3600), Rate(500, 86400)), warn_at=0.4), 5.0
    )
    decisions = burst(policy, 30, now=6.0, prefix="n")
    assert [effect.rate for _, effect in warnings(decisions)] == []
    assert policy.inspect("auth:a", now=6.0, wall_now=T0).warned == (Rate(120, 3600),)


def test_show_counts_no_mark_as_a_failure() -> None:
    """``show`` counts recipients, not the mark it keeps beside them."""
    policy = Policy(WARN_HALF)
    burst(policy, 50, now=0.0)
    view = policy.inspect("auth:a", now=0.0, wall_now=T0)
    assert view.windows[0].counted == 50
    assert view.warned == (HUNDRED,)
    assert Policy(WARN_HALF).inspect("auth:b", now=0.0, wall_now=T0).warned == ()


@given(
    warn_at=st.floats(0.05, 0.95),
    steps=st.lists(st.tuples(st.floats(0, 2000), st.integers(0, 40)), max_size=80),
)
def test_warnings_change_no_verdict_and_no_level(
    warn_at: float, steps: list[tuple[float, int]]
) -> None:
    """With or without warn_at, the same replies, tokens and blocks, whatever the traffic."""
    rates = (Rate(20, 3600), Rate(50, 86400))
    plain = Policy(PolicyConfig(failed_recipients=rates))
    warned = Policy(PolicyConfig(failed_recipients=rates, warn_at=warn_at))
    now = 0.0
    for gap, rcpt in steps:
        now += gap
        a, b = fail(plain, f"r{rcpt}", now), fail(warned, f"r{rcpt}", now)
        assert a.reply == b.reply
        assert a.counted == b.counted
        assert a.tokens_left == b.tokens_left
        assert [e for e in b.effects if not isinstance(e, Warned)] == list(a.effects) or (
            a.effects and isinstance(a.effects[0], Blocked)
        )
        assert all(not isinstance(e, Warned) for e in a.effects)
        assert sum(isinstance(e, Warned) for e in b.effects) <= 1
    if warned.blocks:
        assert warned.user_state("auth:a") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "limits.warn_at: must be a fraction between 0 and 1, both excluded (got 0.0)"),
        (1, "limits.warn_at: must be a fraction between 0 and 1, both excluded (got 1.0)"),
        (math.inf, "limits.warn_at: must be a fraction between 0 and 1"),
        ("half", "limits.warn_at: expected a fraction such as 0.5 (got a string)"),
        (True, "limits.warn_at: expected a fraction such as 0.5 (got a boolean)"),
    ],
)
def test_bad_warn_at_is_named(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"limits": {"warn_at": value}}, source="t.toml")
    assert any(problem.startswith(f"t.toml: {message}") for problem in caught.value.problems)


def test_warn_at_is_read_and_off_by_default() -> None:
    assert Config().policy.warn_at is None
    config = Config.from_dict({"limits": {"warn_at": 0.8}}, source="t.toml")
    assert config.policy.warn_at == 0.8
    assert attrs.evolve(config.policy, warn_at=None).warn_at is None


def test_warn_at_is_refused_in_fleet_mode() -> None:
    raw = {"limits": {"warn_at": 0.5}, "cluster": {"url": "redis://127.0.0.1:6379/0"}}
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(raw, source="t.toml")
    assert caught.value.problems == [
        (
            "t.toml: limits.warn_at: not available in fleet mode (cluster.url is set): "
            "the store does the counting"
        )
    ]
