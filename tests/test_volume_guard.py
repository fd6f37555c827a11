"""The volume guard (``limits.accepted_recipients``): accepted recipients counted too. Pure."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from spamguardd.core import buckets
from spamguardd.core.adminproto import JournalNotes, ShowReply, WindowInfo
from spamguardd.core.config import (
    ACCEPTED_SUFFIX,
    AdminConfig,
    Config,
    Mode,
    NotifyConfig,
    PolicyConfig,
    ServerConfig,
    StateConfig,
)
from spamguardd.core.errors import ConfigError
from spamguardd.core.policy import Blocked, Decision, Policy, Reset, Warned, WouldBlock
from spamguardd.core.protocol import RcptRequest, Verdict, Verify, quote
from spamguardd.core.rate import Rate
from spamguardd.ctl.render import render
from spamguardd.daemon.app import Daemon
from spamguardd.state import snapshot_format
from spamguardd.tools.eximlog import Arrival, parse_line
from tests.helpers import T0, ask_blocking, daemon_process, readsocket, wait_started
from tests.test_notify import TO, body_of, fake_sendmail, mails, parse

FIVE = Rate(5, 3600)
GUARDED = PolicyConfig(failed_recipients=(Rate(100, 3600),), accepted_recipients=(FIVE,))


def ask(
    policy: Policy, rcpt: str, now: float, *, user: str = "auth:a", ok: bool = True
) -> Decision:
    verify = Verify.OK if ok else Verify.FAIL
    request = RcptRequest(user=user, rcpt=rcpt, verify=verify)
    return policy.decide(request, now=now, wall_now=T0 + now)


def test_off_by_default_nothing_is_counted() -> None:
    """Without the option an accepted recipient is answered and forgotten, as before."""
    policy = Policy(PolicyConfig())
    assert {ask(policy, f"r{i}", 0.0).reply.verdict for i in range(500)} == {Verdict.ACCEPT}
    assert policy.statistics().tracked_users == 0


def test_the_limit_blocks_and_says_which_limit() -> None:
    """5/1h: the 5th accepted recipient in a burst blocks; the reason names accepted ones."""
    policy = Policy(GUARDED)
    decisions = [ask(policy, f"r{i}@ok.test", 0.0) for i in range(7)]
    assert [d.reply.verdict for d in decisions] == [Verdict.ACCEPT] * 4 + [Verdict.FREEZE] * 3
    (effect,) = decisions[4].effects
    assert isinstance(effect, Blocked)
    assert effect.rate == FIVE
    assert effect.counted == "accepted recipients"
    assert effect.block.reason == "5 accepted recipients within 1h"
    assert decisions[4].needs_generation == policy.generation
    assert policy.user_state("auth:a" + ACCEPTED_SUFFIX) is None  # a block drops its counters


def test_every_accepted_recipient_counts_even_the_same_one() -> None:
    """Delivered mail is volume: no de-duplication (five messages to one address are five)."""
    policy = Policy(GUARDED)
    verdicts = [ask(policy, "same@ok.test", 0.0).reply.verdict for _ in range(5)]
    assert verdicts[-1] is Verdict.FREEZE


def test_failures_and_accepted_count_apart() -> None:
    """Failures do not use the volume guard's tokens, nor accepted recipients the failures'."""
    policy = Policy(GUARDED)
    for i in range(4):
        ask(policy, f"f{i}", 0.0, ok=False)
        ask(policy, f"r{i}", 0.0)
    view = policy.inspect("auth:a", now=0.0, wall_now=T0)
    assert view.windows[0].tokens_left == 96.0
    assert not policy.blocks
    assert ask(policy, "r4", 0.0).reply.verdict is Verdict.FREEZE


def test_refills_like_the_failed_recipient_buckets() -> None:
    """5/1h refills one token every 12 minutes: four an hour apart never block."""
    policy = Policy(GUARDED)
    for hour in range(20):
        for i in range(4):
            assert ask(policy, f"r{hour}-{i}", hour * 3600.0).reply.verdict is Verdict.ACCEPT


def test_an_override_sets_a_users_volume_limit_alone() -> None:
    """``[[override]]`` with only ``accepted_recipients``: that user's volume limit, the
    default failure limits."""
    config = Config.from_dict(
        {
            "limits": {"accepted_recipients": "1000/1h"},
            "override": [{"user": "auth:list", "accepted_recipients": ["3/1h"]}],
        },
        source="t.toml",
    ).policy
    assert config.limits_for("auth:list") == config.failed_recipients
    policy = Policy(config)
    assert [ask(policy, f"r{i}", 0.0, user="auth:list").reply.verdict for i in range(3)][-1] is (
        Verdict.FREEZE
    )
    assert all(
        ask(policy, f"r{i}", 0.0, user="auth:b").reply.verdict is Verdict.ACCEPT for i in range(50)
    )


def test_an_override_alone_turns_the_guard_on_for_that_user() -> None:
    """With no default, only the overridden user is counted."""
    config = Config.from_dict(
        {"override": [{"user": "auth:list", "accepted_recipients": "2/1h"}]}, source="t.toml"
    ).policy
    policy = Policy(config)
    assert ask(policy, "a", 0.0, user="auth:list").reply.verdict is Verdict.ACCEPT
    assert ask(policy, "b", 0.0, user="auth:list").reply.verdict is Verdict.FREEZE
    for i in range(20):
        ask(policy, f"r{i}", 0.0, user="auth:other")
    assert policy.statistics().tracked_users == 0


def test_monitor_mode_would_block_once() -> None:
    policy = Policy(attrs.evolve(GUARDED, mode=Mode.MONITOR))
    decisions = [ask(policy, f"r{i}", 0.0) for i in range(9)]
    assert {d.reply.verdict for d in decisions} == {Verdict.ACCEPT}
    effects = [e for d in decisions for e in d.effects]
    assert effects == [WouldBlock("auth:a", FIVE, (), "accepted recipients")]


def test_exempt_users_are_not_counted() -> None:
    policy = Policy(attrs.evolve(GUARDED, exempt_users=frozenset({"auth:a"})))
    assert {ask(policy, f"r{i}", 0.0).reply.verdict for i in range(10)} == {Verdict.ACCEPT}


def test_warn_at_warns_on_the_volume_guard_too() -> None:
    """warn_at 0.6 of 5/1h: the 3rd accepted recipient warns, naming accepted recipients."""
    policy = Policy(attrs.evolve(GUARDED, warn_at=0.6))
    decisions = [ask(policy, f"r{i}", 0.0) for i in range(4)]
    effects = [e for d in decisions for e in d.effects]
    assert effects == [Warned("auth:a", FIVE, 3, T0, (), "accepted recipients")]


def test_reset_forgets_both_counters() -> None:
    policy = Policy(GUARDED)
    for i in range(4):
        ask(policy, f"r{i}", 0.0)
    change = policy.reset("auth:a", by="admin", wall_now=T0)
    assert [type(e) for e in change.effects] == [Reset]
    assert ask(policy, "r9", 0.0).reply.verdict is Verdict.ACCEPT


def test_the_counters_go_through_the_snapshot() -> None:
    """The volume state is saved and restored like any user's (under its own key)."""
    policy = Policy(GUARDED)
    for i in range(4):
        ask(policy, f"r{i}", 0.0)
    key = "auth:a" + ACCEPTED_SUFFIX
    assert key in policy.take_changed()
    saved = policy.saved_form(key)
    assert saved is not None
    rates, state = saved
    assert rates == (FIVE,)
    values = buckets.export(state, rates, 1.0, shift=T0)
    fresh = Policy(GUARDED)
    restored = buckets.import_state(values, rates, 32, shift=-T0, latest=1.0)
    assert fresh.restore_state(key, rates, restored, now=1.0)
    assert ask(fresh, "r5", 1.0).reply.verdict is Verdict.FREEZE


def test_a_reload_keeps_what_was_used_and_can_turn_the_guard_off() -> None:
    """Lowering the limit blocks at the next accepted recipient; turning the guard off stops
    the counting, and the sweep forgets the counters."""
    policy = Policy(attrs.evolve(GUARDED, accepted_recipients=(Rate(10, 3600),)))
    for i in range(4):
        ask(policy, f"r{i}", 0.0)
    policy.reconfigure(GUARDED, 1.0)
    assert ask(policy, "r4", 1.0).reply.verdict is Verdict.FREEZE
    other = Policy(GUARDED)
    for i in range(3):
        ask(other, f"r{i}", 0.0)
    other.reconfigure(attrs.evolve(GUARDED, accepted_recipients=None), 1.0)
    assert {ask(other, f"x{i}", 1.0).reply.verdict for i in range(10)} == {Verdict.ACCEPT}
    assert other.forget_idle(10.0, other.tracked_users()) == 1
    assert other.statistics().tracked_users == 0


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            {"limits": {"accepted_recipients": "lots"}},
            "t.toml: limits.accepted_recipients: expected a rate such as 100/1h (got 'lots')",
        ),
        (
            {"override": [{"user": "auth:x", "accepted_recipients": ["5/1h", "x"]}]},
            "t.toml: override[0].accepted_recipients[1]: expected a rate such as 100/1h (got 'x')",
        ),
        (
            {"limits": {"accepted_recipients": "5/1h"}, "cluster": {"url": "redis://h:6379/0"}},
            (
                "t.toml: limits.accepted_recipients: not available in fleet mode (cluster.url "
                "is set): each relay would count alone and its blocks would not reach the store"
            ),
        ),
    ],
)
def test_bad_settings_are_named(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(raw, source="t.toml")
    assert problem in caught.value.problems


# -- through the daemon -----------------------------------------------------------------------


def ok(user: str, rcpt: str) -> bytes:
    return b"rcpt user=" + quote(user) + b" rcpt=" + quote(rcpt) + b" verify=ok ip=192.0.2.7"


async def test_the_daemon_blocks_mails_shows_and_counts(sock_dir: Path) -> None:
    """Through the sockets: the 3rd accepted recipient under 3/1h is frozen, the notice names
    the accepted recipients, ``show`` lists the guard's window, ``stats`` counts the block."""
    program = fake_sendmail(sock_dir / "mail")
    config = Config(
        policy=PolicyConfig(accepted_recipients=(Rate(3, 3600),), warn_at=0.5),
        server=ServerConfig(query_socket=sock_dir / "q.sock"),
        state=StateConfig(dir=sock_dir / "state"),
        admin=AdminConfig(socket=sock_dir / "admin.sock"),
        notify=NotifyConfig(to=TO, sendmail=(str(program),), shutdown_grace=60),
    )
    daemon = Daemon(config)

    async def admin(command: str, **fields: str) -> dict[str, Any]:
        line = json.dumps({"command": command, **fields}).encode() + b"\n"
        answer = await trio.to_thread.run_sync(ask_blocking, sock_dir / "admin.sock", line)
        reply: dict[str, Any] = json.loads(answer.split(b"\n", 1)[0])
        assert reply["ok"], reply
        return reply

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
            )
            first = [
                await readsocket(sock_dir / "q.sock", ok("auth:vol", f"r{i}")) for i in range(2)
            ]
            shown = await admin("show", user="auth:vol")
            third = await readsocket(sock_dir / "q.sock", ok("auth:vol", "r2"))
            stats = await admin("stats")
            daemon.stop()
    assert first == [b"accept\n"] * 2
    assert third == b'freeze reason="3 accepted recipients within 1h"\n'
    assert shown["accepted_windows"] == [
        {
            "limit": "3/1h",
            "counted": 2,
            "tokens_left": 1.0,
            "clears_at": shown["accepted_windows"][0]["clears_at"],
            "warned": True,
        }
    ]
    assert stats["blocks"] == {"auto": 1, "admin": 0, "volume": 1}
    assert stats["warnings"] == 1
    subjects = [parse(data)["Subject"] for data in mails(sock_dir / "mail")]
    assert subjects == [
        "[spamguardd] WARNING auth:vol: 2 of 3 accepted recipients within 1h",
        "[spamguardd] blocked auth:vol: 3 accepted recipients within 1h",
    ]
    assert "Window:     3 accepted recipients in 1h" in body_of(parse(mails(sock_dir / "mail")[1]))


def test_show_renders_the_guard_window() -> None:
    window = WindowInfo(limit="3/1h", counted=2, tokens_left=1.0, clears_at="2026-11-28T01:00:00Z")
    reply = ShowReply(
        user="auth:vol",
        blocked=False,
        block=None,
        exempt=False,
        mode="enforce",
        windows=(),
        accepted_windows=(window,),
        recent_failures=(),
        history=(),
        journal=JournalNotes(truncated_line=None, damaged_lines=()),
    )
    out = io.StringIO()
    render(reply, out)
    head = "ACCEPTED LIMIT  TOKENS LEFT  CLEARS AT\n"
    table = head + "3/1h            1.00         2026-11-28T01:00:00Z\n"
    assert table in out.getvalue()


@pytest.mark.parametrize(
    ("tail", "recipients"),
    [("", 0), (" for a@x.test", 1), (" for a@x.test b@y.test c@z.test", 3)],
)
def test_the_arrival_line_gives_the_accepted_recipients(tail: str, recipients: int) -> None:
    """The ``for`` list of ``+received_recipients`` is what the replay's guard counts."""
    line = (
        "2026-11-28 02:43:50 1xX810-000000-0q <= s@example.com H=(c) [203.0.113.9] P=esmtpa "
        "A=plain_server:u@example.com S=3234" + tail
    )
    event = parse_line(line)
    assert isinstance(event, Arrival)
    assert event.recipients == recipients


def test_a_reload_of_the_guard_alone_refills_at_the_old_rate_until_then() -> None:
    """Only accepted_recipients changes: until the reload its bucket refilled at the old rate
    (2/1h: none in 10 minutes), after it at the new one."""
    policy = Policy(attrs.evolve(GUARDED, accepted_recipients=(Rate(2, 3600),)))
    ask(policy, "a", 0.0)  # 1 of 2 used
    policy.reconfigure(attrs.evolve(GUARDED, accepted_recipients=(Rate(2000, 3600),)), 600.0)
    state = policy.saved_form("auth:a" + ACCEPTED_SUFFIX)
    assert state is not None
    ask(policy, "b", 600.0)
    view = policy.inspect("auth:a", now=600.0, wall_now=T0)
    assert view.accepted is not None
    # 1 used at the old rate, 1/3 of a token back in 10 minutes at 2/1h, then the new count
    assert view.accepted.windows[0].tokens_left == pytest.approx(2000 - 2 + 1 / 3, abs=1e-6)


def test_the_snapshot_format_takes_the_guard_key_and_only_it() -> None:
    """``USER NUL accepted`` is written and read back; any other key with a NUL is damage."""
    key = "auth:a" + ACCEPTED_SUFFIX
    header = snapshot_format.header(base=False)
    data = header + snapshot_format.encode_record(
        snapshot_format.Kind.STATE, key, (FIVE,), [0.0, 3.0]
    )
    (record,) = snapshot_format.decode(data, source="f", shift=0.0, latest=1.0)
    assert isinstance(record, snapshot_format.Record)
    assert record.user == key
    forged = data.replace(b"auth:a\x00accepted", b"auth:a\x00acceptex")
    assert all(
        isinstance(found, snapshot_format.Problem)
        for found in snapshot_format.decode(forged, source="f", shift=0.0, latest=1.0)
    )


def test_real_process_keeps_the_guard_counters_across_a_restart(sock_dir: Path) -> None:
    """Two of three accepted recipients before a restart, the third after it: blocked."""
    config = sock_dir / "spamguardd.toml"
    config.write_text('[limits]\naccepted_recipients = "3/1h"\n')
    query = sock_dir / "run" / "spamguardd.sock"
    request = b"rcpt user=auth:vol rcpt=a@x.test verify=ok ip=192.0.2.7\n"

    def run(count: int, *, loaded: bool) -> list[bytes]:
        process = daemon_process(config, cwd=sock_dir)
        try:
            assert process.stdout is not None
            wait_started(process.stdout, loaded=loaded)
            return [ask_blocking(query, request) for _ in range(count)]
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, err
            assert "snapshot_damaged" not in out

    assert run(2, loaded=False) == [b"accept\n"] * 2
    assert run(1, loaded=True) == [b'freeze reason="3 accepted recipients within 1h"\n']
