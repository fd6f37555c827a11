"""Blocks that expire and escalate: the pure rules with plain times, the files that carry them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.adminproto import (
    AdminRequestError,
    BlockInfo,
    BlockReply,
    Command,
    ListReply,
    Verb,
    reply_from_json,
    reply_to_json,
)
from spamguardd.core.config import Config, PolicyConfig
from spamguardd.core.errors import ConfigError
from spamguardd.core.expiry import (
    MAX_KEPT,
    ExpirySchedule,
    RepeatHistory,
    expiry_for,
    format_steps,
    ordinal,
    parse_steps,
)
from spamguardd.core.notice import Notice, _body
from spamguardd.core.policy import Block, Blocked, Policy, Reset, Unblocked
from spamguardd.core.protocol import RcptRequest, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.ctl.main import main as ctl_main
from spamguardd.ctl.render import render
from spamguardd.state import blockfile, repeats
from spamguardd.state.repeats import RepeatStore
from spamguardd.tools.eximlog import Arrival, Delivery, Rejection, UserKeys
from spamguardd.tools.replay.engine import Candidate, Replayer
from spamguardd.tools.replay.report import to_json, to_table
from tests.helpers import T0

HOUR = 3600.0
DAY = 86400.0


def config(expire: object = None, within: str = "30d") -> PolicyConfig:
    expire = ["24h", "7d", "forever"] if expire is None else expire
    raw = {"limits": {"failed_recipients": "3/1h"}, "block": {"expire": expire}}
    if within:
        raw["block"]["repeat_within"] = within  # type: ignore[index]
    return Config.from_dict(raw, source="t.toml").policy


def problems(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(raw, source="t.toml")
    return info.value.problems


def spray(policy: Policy, user: str, at: float, count: int = 3) -> list[object]:
    """*count* failed recipients of *user* at wall time *at*; the effects they made."""
    effects: list[object] = []
    for i in range(count):
        request = RcptRequest(user=user, rcpt=f"r{at}-{i}@x", verify=Verify.FAIL)
        effects += policy.decide(request, now=at - T0, wall_now=at).effects
    return effects


class TestSteps:
    def test_one_time_or_a_list(self) -> None:
        assert parse_steps("24h") == (DAY,)
        assert parse_steps("forever") == (None,)
        assert parse_steps(["1h", "1d", "forever"]) == (HOUR, DAY, None)
        assert format_steps((HOUR, DAY, None)) == "1h, 1d, forever"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ([], "expected at least one step"),
            ("soon", "expected an Exim time"),
            (["1d", "1h"], "[1]: a step must not be shorter than the one before (got 1h after 1d)"),
            (["forever", "1d"], '[1]: no step can follow "forever"'),
            ([3600], "[0]: expected a time"),
            (5, "expected a time"),
        ],
    )
    def test_bad_steps_name_the_key(self, value: object, message: str) -> None:
        """Every problem names block.expire (and the item), and says what was expected."""
        [problem] = problems({"block": {"expire": value}})
        key = "t.toml: block.expire"
        if message.startswith("["):
            index, _, message = message.partition(": ")
            key += index
        assert problem.startswith(f"{key}: ")
        assert message in problem

    def test_repeat_within_must_be_positive(self) -> None:
        [problem] = problems({"block": {"repeat_within": "0s"}})
        assert problem.startswith("t.toml: block.repeat_within: ")

    def test_defaults_are_todays_behaviour(self) -> None:
        """No [block] expire: blocks are forever, nothing is recorded, no field is written."""
        policy = Policy(
            Config.from_dict({"limits": {"failed_recipients": "3/1h"}}, source="t").policy
        )
        [blocked] = spray(policy, "auth:m", T0)
        assert isinstance(blocked, Blocked)
        assert (blocked.block.expires_at, blocked.block.nth) == (None, 0)
        assert len(policy.repeats) == 0
        assert b"until=" not in blockfile.encode([blocked.block])

    def test_refused_in_fleet_mode(self) -> None:
        """Expiry is not shared by the relays of a fleet, so a fleet refuses it clearly."""
        [problem] = problems(
            {"block": {"expire": "1d"}, "cluster": {"url": "redis://127.0.0.1:6379/0"}}
        )
        assert problem.startswith("t.toml: block.expire: blocks cannot expire in fleet mode")
        Config.from_dict(
            {"block": {"expire": "forever"}, "cluster": {"url": "redis://127.0.0.1:6379/0"}},
            source="t",
        )

    def test_step_past_the_end_repeats_the_last(self) -> None:
        steps = (HOUR, DAY)
        assert expiry_for(steps, 1, T0) == T0 + HOUR
        assert expiry_for(steps, 2, T0) == T0 + DAY
        assert expiry_for(steps, 9, T0) == T0 + DAY
        assert expiry_for((HOUR, None), 2, T0) is None

    def test_ordinals(self) -> None:
        assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
            "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"
        ]  # fmt: skip


class TestRepeatHistory:
    def test_counts_within_the_span(self) -> None:
        history = RepeatHistory()
        assert history.record("u", T0, within=30 * DAY) == 1
        assert history.record("u", T0 + 10 * DAY, within=30 * DAY) == 2
        # the first is out of the span by now: this is the 2nd within it
        assert history.record("u", T0 + 35 * DAY, within=30 * DAY) == 2
        assert history.count("u", now=T0 + 35 * DAY, within=30 * DAY) == 2

    def test_bounded_per_user(self) -> None:
        history = RepeatHistory()
        for i in range(MAX_KEPT + 10):
            history.record("u", T0 + i, within=30 * DAY)
        [(_, times)] = history.items()
        assert len(times) == MAX_KEPT

    def test_recent_drops_what_is_out_of_the_span(self) -> None:
        history = RepeatHistory([("old", (T0,)), ("new", (T0, T0 + 20 * DAY))])
        assert history.recent(now=T0 + 31 * DAY, within=30 * DAY) == {"new": (T0 + 20 * DAY,)}

    def test_forget(self) -> None:
        history = RepeatHistory([("u", (T0,))])
        version = history.version
        assert history.forget("u")
        assert not history.forget("u")
        assert history.version == version + 1


class TestSchedule:
    def test_due_in_time_order_and_lazy_deletion(self) -> None:
        schedule = ExpirySchedule()
        current = {"a": T0 + 2, "b": T0 + 1, "c": T0 + 5}
        for user, at in current.items():
            schedule.add(user, at)
        schedule.add("gone", T0)  # lifted by an admin since
        assert schedule.next_at() == T0
        assert schedule.take_due(T0 + 2, current.get) == ["b", "a"]
        assert schedule.next_at() == T0 + 5

    @given(
        st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 100), max_size=8),
        st.sets(st.sampled_from("abcdefgh")),
        st.integers(0, 100),
    )
    def test_takes_exactly_the_live_due_blocks(
        self, blocks: dict[str, int], lifted: set[str], now: int
    ) -> None:
        schedule = ExpirySchedule()
        for user, at in blocks.items():
            schedule.add(user, float(at))
        current = {user: float(at) for user, at in blocks.items() if user not in lifted}
        schedule.compact(current.get, len(current))
        due = schedule.take_due(float(now), current.get)
        assert sorted(due) == sorted(user for user, at in current.items() if at <= now)
        assert schedule.take_due(float(now), current.get) == []


class TestPolicy:
    def test_repeat_offender_gets_the_next_step(self) -> None:
        """24h, then 7d for a 2nd block within 30 days, then forever."""
        policy = Policy(config())
        [first] = spray(policy, "auth:m", T0)
        assert isinstance(first, Blocked)
        assert (first.block.expires_at, first.block.nth) == (T0 + DAY, 1)
        assert policy.next_expiry() == T0 + DAY
        assert policy.expire_due(T0 + DAY - 1).effects == ()
        lifted = policy.expire_due(T0 + DAY)
        assert lifted.effects == (Unblocked(first.block, "expiry", T0 + DAY),)
        assert lifted.needs_generation == policy.generation
        assert "auth:m" not in policy.blocks
        [second] = spray(policy, "auth:m", T0 + 2 * DAY)
        assert isinstance(second, Blocked)
        assert (second.block.expires_at, second.block.nth) == (T0 + 9 * DAY, 2)
        policy.expire_due(T0 + 9 * DAY)
        [third] = spray(policy, "auth:m", T0 + 10 * DAY)
        assert isinstance(third, Blocked)
        assert (third.block.expires_at, third.block.nth) == (None, 3)
        assert policy.next_expiry() is None or not policy.expire_due(T0 + 999 * DAY).effects

    def test_outside_the_span_starts_again(self) -> None:
        policy = Policy(config(within="2d"))
        spray(policy, "auth:m", T0)
        policy.expire_due(T0 + DAY)
        [again] = spray(policy, "auth:m", T0 + 3 * DAY)
        assert isinstance(again, Blocked)
        assert (again.block.nth, again.block.expires_at) == (1, T0 + 4 * DAY)

    def test_admin_unblock_keeps_history_reset_forgets_it(self) -> None:
        policy = Policy(config())
        spray(policy, "auth:m", T0)
        policy.unblock("auth:m", by="admin:0", wall_now=T0 + 1)
        [second] = spray(policy, "auth:m", T0 + 2)
        assert isinstance(second, Blocked)
        assert second.block.nth == 2
        policy.unblock("auth:m", by="admin:0", wall_now=T0 + 3)
        assert policy.reset("auth:m", by="admin:0", wall_now=T0 + 4).effects == (
            Reset("auth:m", "admin:0", T0 + 4),
        )
        [fresh] = spray(policy, "auth:m", T0 + 5)
        assert isinstance(fresh, Blocked)
        assert fresh.block.nth == 1
        # the lifted blocks' heap entries are stale: none lifts the new block early
        assert policy.expire_due(T0 + DAY).effects == ()
        assert "auth:m" in policy.blocks

    def test_admin_blocks_do_not_expire_unless_asked(self) -> None:
        policy = Policy(config())
        policy.block("auth:a", "by hand", by="admin:0", wall_now=T0)
        policy.block("auth:b", "for a while", by="admin:0", wall_now=T0, expires_at=T0 + HOUR)
        assert policy.blocks["auth:a"].expires_at is None
        assert policy.blocks["auth:a"].nth == 0
        [lift] = policy.expire_due(T0 + 365 * DAY).effects
        assert isinstance(lift, Unblocked)
        assert lift.block.user == "auth:b"
        assert set(policy.blocks) == {"auth:a"}
        assert len(policy.repeats) == 0  # admin blocks are not counted for escalation

    def test_many_expire_in_one_generation(self) -> None:
        policy = Policy(config(expire="1h"))
        for n in range(50):
            spray(policy, f"auth:u{n}", T0 + n)
        generation = policy.generation
        change = policy.expire_due(T0 + HOUR + 24.5)
        assert len(change.effects) == 25
        assert policy.generation == generation + 1
        assert len(policy.blocks) == 25

    def test_loaded_blocks_are_scheduled(self) -> None:
        block = Block("auth:m", T0, "x", "auto", expires_at=T0 + HOUR, nth=1)
        policy = Policy(config(), [block], [("auth:m", (T0,))])
        assert policy.next_expiry() == T0 + HOUR
        assert policy.expire_due(T0 + HOUR).effects == (Unblocked(block, "expiry", T0 + HOUR),)
        [again] = spray(policy, "auth:m", T0 + 2 * HOUR)
        assert isinstance(again, Blocked)
        assert again.block.nth == 2

    def test_reload_keeps_the_expiry_of_blocks_in_force(self) -> None:
        policy = Policy(config(expire="1h"))
        [blocked] = spray(policy, "auth:m", T0)
        assert isinstance(blocked, Blocked)
        policy.reconfigure(config(expire="forever"), 0.0)
        assert policy.blocks["auth:m"].expires_at == T0 + HOUR
        assert policy.expire_due(T0 + HOUR).effects
        [forever] = spray(policy, "auth:m", T0 + 2 * HOUR)
        assert isinstance(forever, Blocked)
        assert forever.block.expires_at is None

    def test_monitor_mode_records_nothing(self) -> None:
        policy = Policy(attrs.evolve(config(), mode=Config().policy.mode.MONITOR))
        spray(policy, "auth:m", T0)
        assert len(policy.repeats) == 0
        assert policy.config.verdict is Verdict.FREEZE


class TestFiles:
    def test_block_file_carries_until_and_nth(self) -> None:
        block = Block("auth:m", T0, "3 failed", "auto", expires_at=T0 + DAY, nth=2)
        data = blockfile.encode([block, Block("auth:x", T0, "hand", "admin:0")])
        assert b'"auth:m": blocked_at=2026-11-28T00:00:00Z reason="3 failed" by=auto ' in data
        assert b" until=2026-11-29T00:00:00Z nth=2\n" in data
        assert blockfile.decode(data, source="f") == [block, Block("auth:x", T0, "hand", "admin:0")]

    def test_block_file_bad_fields_name_the_line(self) -> None:
        bad = blockfile.HEADER + b'"auth:m": blocked_at=2026-11-28T00:00:00Z until=tomorrow\n'
        with pytest.raises(Exception, match=r"^f:3: expected a UTC time"):
            blockfile.decode(bad, source="f")
        bad = blockfile.HEADER + b'"auth:m": blocked_at=2026-11-28T00:00:00Z nth=two\n'
        with pytest.raises(Exception, match=r"^f:3: nth= must be a whole number"):
            blockfile.decode(bad, source="f")

    def test_history_round_trip(self, tmp_path: Path) -> None:
        store = RepeatStore(tmp_path)
        assert store.load().entries == []
        history = {"auth:m": (T0, T0 + DAY), "uid:\udcff": (T0,)}
        store.save(history)
        assert dict(store.load().entries) == history
        assert store.path.stat().st_mode & 0o777 == 0o600

    def test_history_damaged_lines_are_skipped_and_named(self) -> None:
        data = repeats.encode({"auth:a": (T0,)}) + b"not json\n" + b'{"user":"auth:b","at":[1]}\n'
        found = repeats.decode(data, source="f")
        assert found.entries == [("auth:a", (T0,))]
        assert [p.split(": ")[0] for p in found.problems] == ["f:2", "f:3"]
        assert "UTC times" in found.problems[1]


def test_rate_limits_are_those_configured() -> None:
    assert config().failed_recipients == (Rate(3, 3600),)


class TestRender:
    def test_show_and_list_say_until_when_and_which_block(self) -> None:
        info = BlockInfo(
            user="auth:m",
            since="2026-11-28T00:00:00Z",
            reason="3 failed recipients within 1h",
            by="auto",
            verdict="freeze",
            until="2026-12-03T10:00:00Z",
            nth=2,
            repeat_within="30 days",
        )
        out = io.StringIO()
        render(ListReply(blocked=(info,)), out)
        assert out.getvalue().splitlines()[0].split() == [
            "USER", "SINCE", "UNTIL", "BY", "VERDICT", "REASON"
        ]  # fmt: skip
        assert "2026-12-03T10:00:00Z" in out.getvalue()
        out = io.StringIO()
        render(BlockReply(user="auth:m", changed=True, block=info), out)
        assert "lasts until 2026-12-03 10:00:00 UTC, 2nd block in 30 days\n" in out.getvalue()

    def test_reply_round_trip_keeps_the_expiry(self) -> None:
        block = Block("auth:m", T0, "x", "auto", expires_at=T0 + DAY, nth=3)
        info = BlockInfo.from_block(block, "freeze", 30 * DAY)
        assert (info.until, info.nth, info.repeat_within) == ("2026-11-29T00:00:00Z", 3, "30 days")
        raw = reply_to_json(ListReply(blocked=(info,)))
        assert reply_from_json(raw, Verb.LIST) == ListReply(blocked=(info,))
        plain = BlockInfo.from_block(Block("auth:x", T0, "x", "admin:0"), "freeze", 30 * DAY)
        assert "until" not in reply_to_json(ListReply(blocked=(plain,)))["blocked"][0]


class TestAdminCommand:
    def test_block_for_or_until(self) -> None:
        command = Command.from_json({"command": "block", "user": "auth:m", "duration": "2h"})
        assert command.expires_at(T0 + 0.5) == T0 + 2 * HOUR
        until = {"command": "block", "user": "auth:m", "until": "2026-12-03T10:00:00Z"}
        assert Command.from_json(until).expires_at(T0) == 1796292000.0
        assert Command.from_json({"command": "block", "user": "auth:m"}).expires_at(T0) is None

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            ({"command": "unblock", "user": "u", "duration": "2h"}, "unblock takes no until"),
            ({"command": "block", "user": "u", "duration": "2h", "until": "x"}, "not both"),
            ({"command": "block", "user": "u", "duration": "soon"}, "duration must be"),
            # a block past the year 9999 crashed the daemon when its line was written
            ({"command": "block", "user": "u", "duration": "420000w"}, "duration must be"),
            ({"command": "block", "user": "u", "duration": "9" * 20 + "d"}, "duration must be"),
            ({"command": "block", "user": "u", "until": "tomorrow"}, "until must be a UTC"),
            ({"command": "block", "user": "u", "until": 5}, "until must be a UTC"),
        ],
    )
    def test_bad_expiry_fields(self, raw: dict[str, object], message: str) -> None:
        with pytest.raises(AdminRequestError, match=message):
            Command.from_json(raw)


class TestReplay:
    def test_replay_lifts_and_escalates_on_log_time(self) -> None:
        """A replay with block.expire lifts blocks as the log's time passes, and blocks a repeat
        offender again for the next step; mail sent while lifted is not frozen."""
        policy = config(expire=["1h", "1d"])
        replayer = Replayer(policy, [Candidate.parse("1/1h")], UserKeys())
        replayer.feed(Rejection(T0, "a@x", "u", None, "", True, False))  # 1st block: 1h
        replayer.feed(Arrival(T0 + 60, "id1", "u", None))  # frozen
        replayer.feed(Arrival(T0 + HOUR + 1, "id2", "u", None))  # lifted by then: not frozen
        replayer.feed(Delivery(T0 + HOUR + 2, "id1", "ok@x", failed=False))
        replayer.feed(Delivery(T0 + HOUR + 2, "id2", "ok@x", failed=False))
        replayer.feed(Rejection(T0 + 2 * HOUR, "b@x", "u", None, "", True, False))  # 2nd: 1d
        [result] = replayer.report.results
        record = result.blocked["auth:u"]
        assert (record.at, record.blocks, record.until) == (T0, 2, T0 + 2 * HOUR + DAY)
        assert record.frozen_after == 1
        limits: Any = to_json(replayer.report)["limits"]
        [entry] = limits[0]["blocked"]
        assert (entry["blocks"], entry["until"]) == (2, "2026-11-29T02:00:00")
        assert "(2 block(s), the last until 2026-11-29T02:00:00)" in to_table(replayer.report)

    def test_replay_without_expiry_is_unchanged(self) -> None:
        replayer = Replayer(PolicyConfig(), [Candidate.parse("1/1h")], UserKeys())
        replayer.feed(Rejection(T0, "a@x", "u", None, "", True, False))
        replayer.feed(Rejection(T0 + 9 * DAY, "b@x", "u", None, "", True, False))
        limits: Any = to_json(replayer.report)["limits"]
        [entry] = limits[0]["blocked"]
        assert "blocks" not in entry
        assert "until" not in entry


class TestNotice:
    def test_block_notice_says_when_it_ends_and_a_lift_how_to_release(self) -> None:
        block = Block("auth:m", T0, "3 failed recipients within 1h", "auto", T0 + DAY, 1)
        made = Notice.from_effect(Blocked(block, Rate(3, 3600)), verdict=Verdict.FREEZE, when=T0)
        assert made is not None
        assert "Lasts:      until 2026-11-29T00:00:00Z, then it lifts itself\n" in _body(made)
        lifted = Notice.from_effect(
            Unblocked(block, "expiry", T0 + DAY), verdict=Verdict.FREEZE, when=T0 + DAY
        )
        assert lifted is not None
        body = _body(lifted)
        assert "Event:      unblock (by expiry)" in body
        assert "spamguardctl unblock auth:m --release" in body
        forever = Notice.from_effect(
            Blocked(Block("auth:m", T0, "x", "auto"), Rate(3, 3600)),
            verdict=Verdict.FREEZE,
            when=T0,
        )
        assert forever is not None
        assert "Lasts:" not in _body(forever)


class TestParsersNeverCrash:
    @given(st.binary(max_size=300))
    def test_history_file_any_bytes(self, data: bytes) -> None:
        """Whatever the history file holds, decoding gives entries and FILE:LINE problems."""
        found = repeats.decode(data, source="f")
        assert all(problem.startswith("f:") for problem in found.problems)

    @given(
        st.one_of(
            st.text(max_size=12),
            st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=5),
            st.integers(),
        )
    )
    def test_steps_any_value(self, value: object) -> None:
        """block.expire either parses to steps that never get shorter, or says why not."""
        try:
            steps = parse_steps(value)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            assert message, "a refusal says why"
        else:
            finite = [step for step in steps if step is not None]
            assert finite == sorted(finite)
            assert None not in steps[:-1]

    def test_history_line_nested_too_deeply(self) -> None:
        found = repeats.decode(b"[" * 100_000 + b"\n", source="f")
        assert found.entries == []
        assert found.problems[0].startswith("f:1: not a JSON object")


class TestCtl:
    def test_block_for_and_until_are_checked_before_asking(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad --for or --until is a usage error naming the option; no daemon is asked."""
        assert ctl_main(["--socket", "/nonexistent", "block", "auth:m", "--for", "soon"]) == 2
        assert "--for: expected an Exim time" in capsys.readouterr().err
        assert ctl_main(["--socket", "/nonexistent", "block", "auth:m", "--until", "x"]) == 2
        assert "--until: expected a UTC time" in capsys.readouterr().err
        both = ["block", "auth:m", "--for", "2h", "--until", "2026-12-03T10:00:00Z"]
        assert ctl_main(["--socket", "/nonexistent", *both]) == 2
        assert "not allowed with argument" in capsys.readouterr().err
