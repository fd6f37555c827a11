"""Changing limits under a running policy, the tracked-user cap, and the bucket snapshot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.config import PolicyConfig
from spamguardd.core.policy import Policy
from spamguardd.core.protocol import RcptRequest, Reply, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.state import snapshot_format
from tests.helpers import T0

HOUR = 3600.0
TEN_PER_HOUR = PolicyConfig(failed_recipients=(Rate(10, 3600),))
FOUR_PER_HOUR = PolicyConfig(failed_recipients=(Rate(4, 3600),))


def fail(policy: Policy, user: str, rcpt: str, now: float) -> Reply:
    request = RcptRequest(user=user, rcpt=rcpt, verify=Verify.FAIL)
    return policy.decide(request, now=now, wall_now=T0 + now).reply


class TestRemap:
    def test_used_tokens_stay_used(self) -> None:
        """After 3 failures under 10/1h, a reload to 4/1h blocks at the 4th failure."""
        policy = Policy(TEN_PER_HOUR)
        for i in range(3):
            assert fail(policy, "auth:a", f"r{i}", 0.0).verdict is Verdict.ACCEPT
        assert policy.reconfigure(FOUR_PER_HOUR, 0.0) == 1
        assert fail(policy, "auth:a", "r3", 0.0).verdict is Verdict.FREEZE

    def test_raising_the_limit_keeps_the_count(self) -> None:
        """3 used under 4/1h, then 10/1h: 7 more failures are needed, not 10."""
        policy = Policy(FOUR_PER_HOUR)
        for i in range(3):
            fail(policy, "auth:a", f"r{i}", 0.0)
        policy.reconfigure(TEN_PER_HOUR, 0.0)
        replies = [fail(policy, "auth:a", f"s{i}", 0.0).verdict for i in range(7)]
        assert replies == [Verdict.ACCEPT] * 6 + [Verdict.FREEZE]

    def test_new_window_starts_full_and_dropped_window_vanishes(self) -> None:
        """Windows are matched by period: a new period is fresh, a removed one is gone."""
        old = (Rate(10, 3600), Rate(50, 86400))
        new = (Rate(20, 86400), Rate(5, 60))
        state = buckets.new_state(old, 0.0)
        for i in range(4):
            buckets.count_failure(state, old, f"r{i}", 0.0, 32)
        out = buckets.remap(state, old, new, 0.0, 32)
        assert buckets.tokens_left(out, new) == (16.0, 5.0)
        assert buckets.remembered(out, new) == 4
        assert buckets.window_counts(out, new, 0.0) == (4, 0)  # never seen in 5/1m

    def test_limit_below_what_was_used_leaves_an_empty_bucket(self) -> None:
        """Used more than the new capacity: zero tokens, and the next failure blocks."""
        policy = Policy(TEN_PER_HOUR)
        for i in range(6):
            fail(policy, "auth:a", f"r{i}", 0.0)
        policy.reconfigure(FOUR_PER_HOUR, 0.0)
        state = policy.user_state("auth:a")
        assert state is not None
        assert buckets.tokens_left(state, FOUR_PER_HOUR.failed_recipients) == (0.0,)
        assert fail(policy, "auth:a", "x", 1.0).verdict is Verdict.FREEZE

    def test_blocks_survive_a_reload(self) -> None:
        """A block is not a counter: a higher limit does not lift it."""
        policy = Policy(FOUR_PER_HOUR)
        for i in range(4):
            fail(policy, "auth:a", f"r{i}", 0.0)
        policy.reconfigure(TEN_PER_HOUR, 0.0)
        assert "auth:a" in policy.blocks

    @given(
        used=st.integers(0, 20),
        old_count=st.integers(1, 20),
        new_count=st.integers(1, 20),
        later=st.floats(0, 7200),
    )
    def test_tokens_stay_within_bounds(
        self, used: int, old_count: int, new_count: int, later: float
    ) -> None:
        """0 <= tokens <= capacity after any remap."""
        old, new = (Rate(old_count, 3600),), (Rate(new_count, 3600),)
        state = buckets.new_state(old, 0.0)
        for i in range(used):
            buckets.count_failure(state, old, f"r{i}", 0.0, 32)
        out = buckets.remap(state, old, new, later, 32)
        assert 0.0 <= buckets.tokens_left(out, new)[0] <= new_count


class TestCap:
    def test_oldest_user_makes_room_at_the_cap(self) -> None:
        """At max_tracked_users the user counted first is forgotten for a new one."""
        policy = Policy(PolicyConfig(max_tracked_users=2))
        for user in ("auth:a", "auth:b", "auth:c"):
            fail(policy, user, "r", 0.0)
        assert sorted(policy.tracked_users()) == ["auth:b", "auth:c"]
        assert policy.evicted_users == 1

    def test_the_user_counted_least_recently_makes_room(self) -> None:
        """At the cap the one closest to going idle goes, not the most active."""
        policy = Policy(PolicyConfig(max_tracked_users=3))
        fail(policy, "auth:busy", "r0", 0.0)
        fail(policy, "auth:quiet", "r0", 600.0)
        fail(policy, "auth:busy", "r1", 1200.0)  # counted again: later in the sweep's order
        fail(policy, "auth:other", "r0", 1300.0)
        fail(policy, "auth:new", "r0", 1400.0)
        assert sorted(policy.tracked_users()) == ["auth:busy", "auth:new", "auth:other"]

    def test_snapshot_restore_stops_at_the_cap(self) -> None:
        """A snapshot bigger than the cap fills the table up to the cap and no further."""
        source = Policy(TEN_PER_HOUR)
        for user in ("auth:a", "auth:b", "auth:c"):
            fail(source, user, "r", 0.0)
        target = Policy(PolicyConfig(failed_recipients=(Rate(10, 3600),), max_tracked_users=2))
        restored = [target.restore_state(*entry, 0.0) for entry in source.counting_states(0.0)]
        assert restored == [True, True, False]


def encode_all(policy: Policy, now: float, *, offset: float) -> bytes:
    """A base file with every counted user of *policy*, as a compaction writes it."""
    records = [
        snapshot_format.encode_record(
            snapshot_format.Kind.STATE, user, rates, buckets.export(state, rates, now, offset)
        )
        for user, rates, state in sorted(policy.counting_states(now), key=lambda entry: entry[0])
    ]
    return snapshot_format.header(base=True) + b"".join(records)


def decode_all(data: bytes, *, shift: float, latest: float) -> list[snapshot_format.Record]:
    items = list(snapshot_format.decode(data, source="s", shift=shift, latest=latest))
    assert all(isinstance(item, snapshot_format.Record) for item in items), items
    return [item for item in items if isinstance(item, snapshot_format.Record)]


class TestSnapshot:
    def test_round_trip_credits_the_time_away(self) -> None:
        """Saved at mono 100 (wall T0+100), loaded in a new boot: times map to the new clock."""
        policy = Policy(TEN_PER_HOUR)
        for i in range(5):
            fail(policy, "auth:a", f"r{i}", 100.0)
        data = encode_all(policy, 100.0, offset=T0)
        # new boot: the monotonic clock reads 5 where the wall clock reads T0 + 460
        (record,) = decode_all(data, shift=-(T0 + 455), latest=5.0)
        restored = Policy(TEN_PER_HOUR)
        assert record.state is not None
        restored.restore_state(record.user, record.rates, record.state, 5.0)
        state = restored.user_state("auth:a")
        assert state is not None
        assert buckets.updated(state) == pytest.approx(100.0 - 455)
        buckets.refill(state, TEN_PER_HOUR.failed_recipients, 5.0)
        (tokens,) = buckets.tokens_left(state, TEN_PER_HOUR.failed_recipients)
        assert tokens == pytest.approx(5.0 + 360 / 360)  # 6 minutes of 10/1h refill: 1 token

    def test_times_from_the_future_are_clamped(self) -> None:
        """Saved while the wall clock was a day ahead: loaded, the buckets refill from now."""
        policy = Policy(TEN_PER_HOUR)
        for i in range(10):
            fail(policy, "auth:a", f"r{i}", 0.0)
        assert "auth:a" in policy.blocks
        policy = Policy(TEN_PER_HOUR)
        for i in range(9):
            fail(policy, "auth:a", f"r{i}", 0.0)
        data = encode_all(policy, 0.0, offset=T0 + 86400)  # the clock was a day ahead
        (record,) = decode_all(data, shift=-T0, latest=0.0)
        assert record.state is not None
        assert buckets.updated(record.state) == 0.0
        restored = Policy(TEN_PER_HOUR)
        restored.restore_state(record.user, record.rates, record.state, 0.0)
        # an hour later (not a day) the bucket is full again and the user idle
        assert restored.forget_idle(HOUR, ["auth:a"]) == 1

    def test_full_buckets_are_not_saved(self) -> None:
        """Idle users are left out of the snapshot."""
        policy = Policy(TEN_PER_HOUR)
        fail(policy, "auth:a", "r", 0.0)
        assert [user for user, _, _ in policy.counting_states(0.0)] == ["auth:a"]
        assert policy.counting_states(10 * HOUR) == []

    def test_saved_under_other_limits_is_carried_over(self) -> None:
        """A snapshot from 10/1h loaded under 4/1h keeps the 3 used tokens."""
        old = Policy(TEN_PER_HOUR)
        for i in range(3):
            fail(old, "auth:a", f"r{i}", 0.0)
        new = Policy(FOUR_PER_HOUR)
        for record in decode_all(encode_all(old, 0.0, offset=T0), shift=-T0, latest=0.0):
            assert record.state is not None
            new.restore_state(record.user, record.rates, record.state, 0.0)
        assert fail(new, "auth:a", "r3", 0.0).verdict is Verdict.FREEZE

    def test_counted_while_loading_adds_up(self) -> None:
        """A user counted from full buckets before its record loads keeps both counts."""
        old = Policy(TEN_PER_HOUR)
        for i in range(6):
            fail(old, "auth:a", f"r{i}", 0.0)
        new = Policy(TEN_PER_HOUR)
        for i in range(3):
            fail(new, "auth:a", f"s{i}", 0.0)
        (record,) = decode_all(encode_all(old, 0.0, offset=T0), shift=-T0, latest=0.0)
        assert record.state is not None
        assert new.restore_state(record.user, record.rates, record.state, 0.0)
        assert fail(new, "auth:a", "t", 0.0).verdict is Verdict.FREEZE  # 6 + 3 + 1

    def test_damaged_records_are_reported_and_skipped(self) -> None:
        """Good records load; each bad one is a FILE:RECORD problem; none raises."""
        policy = Policy(TEN_PER_HOUR)
        fail(policy, "auth:a", "r", 0.0)
        fail(policy, "auth:b", "r", 0.0)
        good = encode_all(policy, 0.0, offset=T0)
        header = snapshot_format.header(base=True)
        first, second = good[len(header) :].split(b"\xc5\x4b")[1:]
        flipped = bytearray(b"\xc5\x4b" + first)
        flipped[20] ^= 0xFF
        for data, want_users, want_problems in (
            (
                header + bytes(flipped) + b"junk" + b"\xc5\x4b" + second,
                ["auth:b"],
                ["f:1: checksum mismatch"],
            ),
            (
                good + b"junk" + b"\xc5\x4b" + second,
                ["auth:a", "auth:b", "auth:b"],
                ["f:3: no record starts here"],
            ),
            (good[:-3], ["auth:a"], ["f:2: truncated record"]),
        ):
            items = list(snapshot_format.decode(data, source="f", shift=-T0, latest=0.0))
            problems = [item.text for item in items if isinstance(item, snapshot_format.Problem)]
            users = [item.user for item in items if isinstance(item, snapshot_format.Record)]
            assert (users, problems) == (want_users, want_problems)
