"""Changing limits under a running policy, the tracked-user cap, and the bucket snapshot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.config import PolicyConfig
from spamguardd.core.policy import Policy
from spamguardd.core.protocol import RcptRequest, Reply, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.state import snapshot
from spamguardd.state.snapshot import SnapshotStore
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
        assert len(out) == 1 + 2 + 4 * 3
        assert all(out[3 + 3 * i + 2] == -math.inf for i in range(4))  # never seen in 5/1m

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
        assert 0.0 <= out[1] <= new_count


class TestCap:
    def test_oldest_user_makes_room_at_the_cap(self) -> None:
        """At max_tracked_users the user counted first is forgotten for a new one."""
        policy = Policy(PolicyConfig(max_tracked_users=2))
        for user in ("auth:a", "auth:b", "auth:c"):
            fail(policy, user, "r", 0.0)
        assert policy.tracked_users() == ["auth:b", "auth:c"]
        assert policy.evicted_users == 1

    def test_snapshot_restore_stops_at_the_cap(self) -> None:
        """A snapshot bigger than the cap fills the table up to the cap and no further."""
        source = Policy(TEN_PER_HOUR)
        for user in ("auth:a", "auth:b", "auth:c"):
            fail(source, user, "r", 0.0)
        target = Policy(PolicyConfig(failed_recipients=(Rate(10, 3600),), max_tracked_users=2))
        restored = [target.restore_state(*entry, 0.0) for entry in source.counting_states(0.0)]
        assert restored == [True, True, False]


class TestSnapshot:
    def test_round_trip_credits_the_time_away(self, tmp_path: Path) -> None:
        """Saved at mono 100 (wall T0+100), loaded in a new boot: times map to the new clock."""
        policy = Policy(TEN_PER_HOUR)
        for i in range(5):
            fail(policy, "auth:a", f"r{i}", 100.0)
        store = SnapshotStore(tmp_path)
        store.save(policy.counting_states(100.0), offset=T0)
        # new boot: the monotonic clock reads 5 where the wall clock reads T0 + 460
        entries = store.load(offset=T0 + 455)
        restored = Policy(TEN_PER_HOUR)
        for user, rates, saved in entries:
            restored.restore_state(user, rates, saved, 5.0)
        state = restored.user_state("auth:a")
        assert state is not None
        assert state[0] == pytest.approx(100.0 - 455)
        buckets.refill(state, TEN_PER_HOUR.failed_recipients, 5.0)
        assert state[1] == pytest.approx(5.0 + 360 / 360)  # 6 minutes of 10/1h refill: 1 token

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
        data = snapshot.encode(old.counting_states(0.0), offset=T0)
        loaded = snapshot.decode(data, source="s", offset=T0)
        new = Policy(FOUR_PER_HOUR)
        for user, rates, state in loaded.entries:
            new.restore_state(user, rates, state, 0.0)
        assert fail(new, "auth:a", "r3", 0.0).verdict is Verdict.FREEZE

    def test_damaged_lines_are_reported_and_the_file_kept(self, tmp_path: Path) -> None:
        """Good lines load; each bad one is logged with FILE:LINE; the file is kept aside."""
        policy = Policy(TEN_PER_HOUR)
        fail(policy, "auth:a", "r", 0.0)
        good = snapshot.encode(policy.counting_states(0.0), offset=T0)
        path = tmp_path / "buckets"
        path.write_bytes(
            good + b"{not json\n" + b'{"user": "x", "limits": ["1/1h"], "state": []}\n'
        )
        with structlog.testing.capture_logs() as logs:
            entries = SnapshotStore(tmp_path).load(offset=T0)
        assert [user for user, _, _ in entries] == ["auth:a"]
        problems = [entry["problem"] for entry in logs if entry["event"] == "snapshot_damaged"]
        assert [problem.split(": ")[0] for problem in problems] == [f"{path}:3", f"{path}:4"]
        assert not path.exists()
        assert (tmp_path / "buckets.damaged").read_bytes().startswith(good)

    def test_missing_snapshot_is_empty(self, tmp_path: Path) -> None:
        """No snapshot yet: nothing to load, nothing logged."""
        assert SnapshotStore(tmp_path).load(offset=0.0) == []
