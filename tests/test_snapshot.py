"""The counter snapshot: the v2 record codec, any bytes as a file, the v1 upgrade, the keeper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.config import Mode, PolicyConfig
from spamguardd.core.policy import Policy, WouldBlock
from spamguardd.core.protocol import ENCODING, ERRORS, MAX_USER_SIZE, RcptRequest, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.daemon.counters import CounterKeeper
from spamguardd.state import legacy_snapshot, snapshot_format
from spamguardd.state.snapshot import SnapshotStore
from spamguardd.state.snapshot_format import Kind, Problem, Record
from tests.helpers import T0

TEN_PER_HOUR = PolicyConfig(failed_recipients=(Rate(10, 3600),))

key_bytes = st.binary(min_size=1, max_size=MAX_USER_SIZE).filter(lambda raw: b"\x00" not in raw)
rate_lists = st.lists(
    st.builds(Rate, count=st.integers(1, 50), period=st.integers(1, 86400 * 7)),
    min_size=1,
    max_size=3,
    unique_by=lambda rate: rate.period,
).map(tuple)


def canonical(
    values: list[float], rates: tuple[Rate, ...]
) -> tuple[list[float], list[list[float]]]:
    """A portable state with its remembered failures in a fixed order (tables may differ)."""
    width = 1 + len(rates)
    head = values[:width]
    entries = sorted(values[at : at + width] for at in range(width, len(values), width))
    return head, entries


def fail(policy: Policy, user: str, rcpt: str, now: float) -> Verdict:
    request = RcptRequest(user=user, rcpt=rcpt, verify=Verify.FAIL)
    return policy.decide(request, now=now, wall_now=T0 + now).reply.verdict


class TestCodec:
    @given(
        raw=key_bytes,
        rates=rate_lists,
        steps=st.lists(st.tuples(st.floats(0, 5000), st.integers(0, 60)), max_size=40),
    )
    def test_any_key_and_state_round_trip(
        self, raw: bytes, rates: tuple[Rate, ...], steps: list[tuple[float, int]]
    ) -> None:
        """Any key bytes and any state reached by counting come back as they were saved."""
        user = raw.decode(ENCODING, ERRORS)
        limit = buckets.recent_limit(rates)
        state = buckets.new_state(rates, 0.0)
        now = 0.0
        for delta, rcpt in steps:
            now += delta
            buckets.count_failure(state, rates, f"r{rcpt}", now, limit)
        values = buckets.export(state, rates, now, T0)
        data = snapshot_format.header(base=False) + snapshot_format.encode_record(
            Kind.STATE, user, rates, values
        )
        (record,) = snapshot_format.decode(data, source="f", shift=-T0, latest=now)
        assert isinstance(record, Record)
        assert record.user.encode(ENCODING, ERRORS) == raw
        assert record.rates == rates
        assert record.state is not None
        assert canonical(buckets.export(record.state, rates, now, T0), rates) == canonical(
            values, rates
        )
        assert buckets.tokens_left(record.state, rates) == buckets.tokens_left(state, rates)
        assert buckets.window_counts(record.state, rates, now) == buckets.window_counts(
            state, rates, now
        )

    @given(raw=key_bytes)
    def test_forget_records_round_trip(self, raw: bytes) -> None:
        user = raw.decode(ENCODING, ERRORS)
        data = snapshot_format.encode_record(Kind.FORGET, user)
        # a file without its header line: reported, and the record still read
        assert list(snapshot_format.decode(data, source="f", shift=0.0, latest=0.0)) == [
            Problem("f:1: not a v2 counter snapshot header"),
            Record(Kind.FORGET, user),
        ]
        (record,) = snapshot_format.decode(
            snapshot_format.header(base=True) + data, source="f", shift=0.0, latest=0.0
        )
        assert record == Record(Kind.FORGET, user)

    @settings(max_examples=300)
    @given(data=st.binary(max_size=600), prefix=st.booleans())
    def test_any_bytes_decode_without_an_exception(self, data: bytes, prefix: bool) -> None:
        """Any bytes as a file: records and FILE:RECORD problems, never an exception."""
        if prefix:
            data = snapshot_format.header(base=True) + data
        for item in snapshot_format.decode(data, source="f", shift=0.0, latest=0.0):
            assert isinstance(item, Record | Problem)
            if isinstance(item, Problem):
                assert item.text.startswith("f:")

    @given(data=st.binary(max_size=300))
    def test_damage_to_a_good_file_never_raises(self, data: bytes) -> None:
        """Good records with arbitrary bytes spliced in: whatever is intact still loads."""
        rates = (Rate(10, 3600),)
        state = buckets.new_state(rates, 0.0)
        buckets.count_failure(state, rates, "x", 0.0, 32)
        record = snapshot_format.encode_record(
            Kind.STATE, "auth:a", rates, buckets.export(state, rates, 0.0, 0.0)
        )
        file = snapshot_format.header(base=True) + record + data + record
        items = list(snapshot_format.decode(file, source="f", shift=0.0, latest=0.0))
        assert sum(isinstance(item, Record) for item in items) >= 2 - (b"\xc5\x4b" in data)

    @given(data=st.binary(max_size=400))
    def test_any_bytes_as_a_v1_file(self, data: bytes) -> None:
        for item in legacy_snapshot.decode(data, source="b", shift=0.0, latest=0.0):
            assert isinstance(item, Record | Problem)

    def test_v1_deep_nesting_and_odd_keys_are_problems(self) -> None:
        """Lines that stopped every start of the v1 reader are reported and skipped."""
        good = json.dumps({"user": "auth:a", "limits": ["10/1h"], "state": [T0, 9.0]})
        data = "\n".join(
            [
                "[" * 100_000 + "]" * 100_000,
                '{"user": "\\ud800x", "limits": ["10/1h"], "state": [1e400, 9.0]}',
                '{"user": "a", "limits": [1], "state": []}',
                good,
            ]
        ).encode()
        items = list(legacy_snapshot.decode(data, source="b", shift=-T0, latest=0.0))
        assert [type(item) for item in items] == [Problem, Problem, Problem, Record]
        assert items[0] == Problem("b:1: nested too deeply")

    def test_a_key_with_no_byte_form_is_refused_not_fatal(self) -> None:
        with pytest.raises(snapshot_format.KeyNotWritableError):
            snapshot_format.encode_record(Kind.FORGET, "auth:\ud800")


#: A snapshot or a load that runs longer than a slice of real time rests, and the mock clock
#: moves through the rest, refilling a little: at 10/h a whole second of rests refills 0.003
#: of a token. A count lost or added twice is a whole token, so this tolerance still tells them.
REFILL_WHILE_RESTING = 0.01


def keeper_for(tmp_path: Path, policy: Policy) -> CounterKeeper:
    return CounterKeeper(
        policy,
        SnapshotStore(tmp_path),
        wall_clock=lambda: T0 + trio.current_time(),
        interval=lambda: 30.0,
    )


class TestKeeper:
    async def test_an_8bit_key_survives_a_snapshot_and_a_restart(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A login that is not UTF-8 is saved and loaded byte for byte."""
        user = b"auth:m\xfcller@example.com".decode(ENCODING, ERRORS)
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        for i in range(4):
            fail(policy, user, f"r{i}", trio.current_time())
        assert await keeper.snapshot() == 1
        again = Policy(TEN_PER_HOUR)
        await keeper_for(tmp_path, again).load()
        assert again.tracked_users() == [user]
        for i in range(4, 9):
            assert fail(again, user, f"r{i}", trio.current_time()) is Verdict.ACCEPT
        assert fail(again, user, "r9", trio.current_time()) is Verdict.FREEZE

    async def test_an_unwritable_key_is_skipped_and_logged(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        fail(policy, "auth:\ud800", "r", 0.0)
        fail(policy, "auth:ok", "r", 0.0)
        with structlog.testing.capture_logs() as logs:
            assert await keeper.snapshot() == 1
        assert [entry["event"] for entry in logs] == ["snapshot_user_skipped", "snapshot_written"]

    async def test_snapshots_write_only_what_changed(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """1000 users counted, then one: the second snapshot writes one record."""
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        for i in range(1000):
            fail(policy, f"auth:u{i}", "r", 0.0)
        assert await keeper.snapshot() == 1000
        before = keeper.store.log_bytes
        fail(policy, "auth:u7", "s", 1.0)
        assert await keeper.snapshot() == 1
        assert keeper.store.log_bytes - before < 100
        assert await keeper.snapshot() == 0

    async def test_blocked_users_are_forgotten_in_the_snapshot(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        fail(policy, "auth:a", "r", 0.0)
        await keeper.snapshot()
        policy.block("auth:a", "spam", by="admin", wall_now=T0)
        policy.unblock("auth:a", by="admin", wall_now=T0)
        await keeper.snapshot()
        again = Policy(TEN_PER_HOUR)
        await keeper_for(tmp_path, again).load()
        assert again.tracked_users() == []

    async def test_v1_snapshot_is_read_once_and_replaced(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """An upgrade keeps the counters of the v1 file, then removes it; damage is kept."""
        wall = T0  # trio's clock reads 0
        fp = buckets.fingerprint("r")
        lines = [
            b"# spamguardd bucket snapshot v1: one counted user per line, JSON; times are UTC",
            json.dumps(
                {"user": "auth:a", "limits": ["10/1h"], "state": [wall, 2.0, fp, wall]}
            ).encode(),
            b"{damaged",
        ]
        (tmp_path / "buckets").write_bytes(b"\n".join(lines) + b"\n")
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        assert keeper.store.wants_compaction()  # run() compacts at once after such a load
        await keeper.compact()
        assert not (tmp_path / "buckets").exists()
        assert (tmp_path / "buckets.damaged").exists()
        state = policy.user_state("auth:a")
        assert state is not None
        assert buckets.tokens_left(state, TEN_PER_HOUR.failed_recipients)[0] == pytest.approx(
            2.0, abs=REFILL_WHILE_RESTING
        )
        again = Policy(TEN_PER_HOUR)
        await keeper_for(tmp_path, again).load()
        assert fail(again, "auth:a", "r", 1.0) is Verdict.ACCEPT  # a retry: not counted
        assert fail(again, "auth:a", "s", 1.0) is Verdict.ACCEPT
        assert fail(again, "auth:a", "t", 1.0) is Verdict.FREEZE

    async def test_a_would_block_is_told_once_across_a_restart(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Monitor mode: the user who emptied a bucket before the stop gets no second
        would-block (and no second WOULD BLOCK notice) after the start; another still does."""
        monitor = attrs.evolve(TEN_PER_HOUR, mode=Mode.MONITOR)

        def would_blocks(policy: Policy, user: str, rcpt: str) -> int:
            request = RcptRequest(user=user, rcpt=rcpt, verify=Verify.FAIL)
            effects = policy.decide(request, now=1.0, wall_now=T0 + 1.0).effects
            return sum(isinstance(effect, WouldBlock) for effect in effects)

        first = Policy(monitor)
        keeper = keeper_for(tmp_path, first)
        await keeper.load()
        told = sum(would_blocks(first, "auth:a", f"r{i}") for i in range(10))
        assert told == 1
        await keeper.save_final()
        second = Policy(monitor)
        await keeper_for(tmp_path, second).load()
        assert would_blocks(second, "auth:a", "again") == 0
        assert sum(would_blocks(second, "auth:b", f"r{i}") for i in range(10)) == 1

    async def test_stop_while_loading_adds_up_at_the_next_start(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Counted before the snapshot was read, saved at a stop: both counts survive."""
        first = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, first)
        await keeper.load()
        for i in range(6):
            fail(first, "auth:a", f"r{i}", 0.0)
        await keeper.snapshot()
        second = Policy(TEN_PER_HOUR)
        stopped = keeper_for(tmp_path, second)  # never loads: stopped at once
        for i in range(3):
            fail(second, "auth:a", f"s{i}", 0.0)
        await stopped.save_final()
        third = Policy(TEN_PER_HOUR)
        await keeper_for(tmp_path, third).load()
        assert fail(third, "auth:a", "t", 0.0) is Verdict.FREEZE  # 6 + 3 + 1

    async def test_snapshots_while_loading_are_not_counted_twice(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Two snapshots during a load, then a crash: the saved and the new counts add once."""
        first = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, first)
        await keeper.load()
        for i in range(6):
            fail(first, "auth:a", f"r{i}", 0.0)
        await keeper.snapshot()
        second = Policy(TEN_PER_HOUR)
        loading = keeper_for(tmp_path, second)  # its load has not read anything yet
        for i in range(2):
            fail(second, "auth:a", f"s{i}", 0.0)
        await loading.snapshot()
        fail(second, "auth:a", "s2", 0.0)
        await loading.snapshot()
        third = Policy(TEN_PER_HOUR)  # the second was killed
        await keeper_for(tmp_path, third).load()
        state = third.user_state("auth:a")
        assert state is not None
        (tokens,) = buckets.tokens_left(state, TEN_PER_HOUR.failed_recipients)
        assert tokens == pytest.approx(1.0, abs=REFILL_WHILE_RESTING)  # 10 - 6 - 3

    async def test_compaction_keeps_everyone_and_drops_old_files(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        for round_number in range(3):
            for i in range(100):
                fail(policy, f"auth:u{i}", f"r{round_number}", float(round_number))
            await keeper.snapshot()
        await keeper.compact()
        files = keeper.store.numbered()
        assert len(files) == 2  # the base and the log after it
        unfinished = tmp_path / "counters" / "0000000009.tmp"  # a crash in a compaction
        unfinished.write_bytes(b"half a base")
        again = Policy(TEN_PER_HOUR)
        await keeper_for(tmp_path, again).load()
        assert sorted(again.tracked_users()) == sorted(policy.tracked_users())
        assert not unfinished.exists()

    async def test_a_damaged_file_is_set_aside_once_and_the_files_do_not_pile_up(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """After damage, the next start's compaction keeps the damaged file as NAME.damaged and
        removes what its base replaces, however many files earlier runs left: later starts read
        one base and one log, and report nothing again. The base is private (0600)."""
        for run in range(3):  # three runs, three logs
            policy = Policy(TEN_PER_HOUR)
            keeper = keeper_for(tmp_path, policy)
            await keeper.load()
            fail(policy, f"auth:run{run}", "r", 0.0)
            await keeper.snapshot()
        counters = tmp_path / "counters"
        damaged = keeper.store.numbered()[1][1]
        data = bytearray(damaged.read_bytes())
        data[-3] ^= 0xFF  # a flipped byte in the last record
        damaged.write_bytes(bytes(data))
        restarted = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, restarted)
        with structlog.testing.capture_logs() as logs:
            await keeper.load()
        assert [e["event"] for e in logs].count("snapshot_damaged") == 1
        await keeper.compact()
        assert (counters / (damaged.name + ".damaged")).exists()
        assert len(keeper.store.numbered()) == 2  # the base and the log after it
        base = keeper.store.numbered()[0][1]
        assert base.stat().st_mode & 0o777 == 0o600
        for _ in range(2):
            again = Policy(TEN_PER_HOUR)
            with structlog.testing.capture_logs() as logs:
                await keeper_for(tmp_path, again).load()
            assert "snapshot_damaged" not in [e["event"] for e in logs]
            assert {"auth:run0", "auth:run2"} <= set(again.tracked_users())

    async def test_idle_users_are_swept(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Once idle past their longest period, users are forgotten by the sweep."""
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(tmp_path, policy)
        await keeper.load()
        for i in range(50):
            fail(policy, f"auth:u{i}", "r", 0.0)
        await trio.sleep(1800)
        fail(policy, "auth:late", "r", trio.current_time())
        await trio.sleep(1800 + 120)
        assert await keeper.sweep() == 50
        assert policy.tracked_users() == ["auth:late"]
        assert math.isfinite(buckets.filed(policy.user_state("auth:late") or bytearray(64)))


class TestUnwritable:
    async def test_a_snapshot_that_cannot_be_written_is_logged_and_retried(
        self, tmp_path: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """The disk refuses a snapshot: ``snapshot_failed``, the daemon counts on, and the
        users it could not save are written by the next snapshot that can."""
        directory = tmp_path / "counters"
        policy = Policy(TEN_PER_HOUR)
        keeper = keeper_for(directory, policy)
        await keeper.load()
        fail(policy, "auth:a", "r", 0.0)
        assert await keeper.snapshot() == 1
        fail(policy, "auth:b", "r", 0.0)
        aside = tmp_path / "aside"
        directory.rename(aside)
        directory.write_text("not a directory\n")
        with structlog.testing.capture_logs() as logs:
            assert await keeper.snapshot() == 0
        assert [entry["event"] for entry in logs] == ["snapshot_failed"]
        directory.unlink()
        aside.rename(directory)
        assert await keeper.snapshot() == 1
