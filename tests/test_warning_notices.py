"""The early warning as people get it: the mail, the hook, ``stats``, ``show``, a restart.

The fakes (a sendmail and a hook that record what they got) are those of ``tests/test_notify``.
"""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import trio

from spamguardd.core.adminproto import (
    BlockCounts,
    ErrorCounts,
    JournalNotes,
    ShowReply,
    StatsReply,
    WindowInfo,
)
from spamguardd.core.config import NotifyConfig, PolicyConfig
from spamguardd.core.policy import Warned
from spamguardd.core.protocol import Verdict
from spamguardd.core.rate import Rate
from spamguardd.ctl.render import render
from tests.helpers import T0, ask_blocking, daemon_process, wait_started
from tests.test_notify import (
    SAMPLES,
    TO,
    TestMessage,
    body_of,
    fail,
    fake_hook,
    fake_sendmail,
    hook_calls,
    mails,
    notice_of,
    parse,
    start,
)

TEN_WARN_HALF = PolicyConfig(failed_recipients=(Rate(10, 3600),), warn_at=0.5)


def test_warning_mail_says_nothing_was_blocked() -> None:
    """Subject, event header, the usage, accept as the verdict, how to block now."""
    notice = notice_of(Warned("auth:m@example.com", Rate(100, 3600), 50, T0 + 60, SAMPLES))
    message = TestMessage().build(notice)
    assert message["Subject"] == (
        "[abuse-bot] WARNING auth:m@example.com: 50 of 100 failed recipients within 1h"
    )
    assert message["X-Spamguard-Event"] == "warning"
    body = body_of(message)
    assert body.startswith("WARNING: nothing was blocked.")
    lines = body.splitlines()
    for expected in (
        "Event:      warning (by auto)",
        "Reason:     50 of 100 failed recipients within 1h",
        "Window:     100 failed recipients in 1h",
        'Verdict:    accept (at the limit it becomes "freeze")',
        "  spamguardctl block auth:m@example.com",
    ):
        assert expected in lines, expected
    assert "unblock" not in body


async def test_warning_then_block_through_the_query_socket(
    nursery: trio.Nursery, sock_dir: Path
) -> None:
    """10/1h with warn_at 0.5: the 5th failure mails a warning and runs the hook with
    ``warning``, the 10th blocks; in that order, once each."""
    program = fake_sendmail(sock_dir / "mail")
    hook = fake_hook(sock_dir / "hook")
    # four child processes to run at the stop: a loaded machine needs more than the default
    notify = NotifyConfig(to=TO, sendmail=(str(program),), hook=(str(hook),), shutdown_grace=60)
    running = await start(nursery, sock_dir, notify, TEN_WARN_HALF)
    with trio.fail_after(20):
        replies = [await running.ask(fail("auth:leak", f"r{i}@x.test")) for i in range(12)]
        await running.finish()
    assert [r.verdict for r in replies] == [Verdict.ACCEPT] * 9 + [Verdict.FREEZE] * 3
    subjects = [parse(data)["Subject"] for data in mails(sock_dir / "mail")]
    assert subjects == [
        "[spamguardd] WARNING auth:leak: 5 of 10 failed recipients within 1h",
        "[spamguardd] blocked auth:leak: 10 failed recipients within 1h",
    ]
    calls = hook_calls(sock_dir / "hook")
    assert [c["argv"][1:] for c in calls] == [["warning", "auth:leak"], ["blocked", "auth:leak"]]
    assert calls[0]["env"]["SPAMGUARD_REASON"] == "5 of 10 failed recipients within 1h"


def admin(path: Path, command: str, **fields: Any) -> dict[str, Any]:
    line = json.dumps({"command": command, **fields}).encode() + b"\n"
    reply: dict[str, Any] = json.loads(ask_blocking(path, line).split(b"\n", 1)[0])
    assert reply["ok"], reply
    return reply


def test_real_process_warns_once_across_a_restart(sock_dir: Path) -> None:
    """``python -m spamguardd`` with warn_at: one warning mail and hook call; ``show`` marks the
    window, ``stats`` counts it; after a restart (the snapshot) further failures warn no more."""
    program = fake_sendmail(sock_dir / "mail")
    hook = fake_hook(sock_dir / "hook")
    config = sock_dir / "spamguardd.toml"
    config.write_text(
        '[limits]\nfailed_recipients = "10/1h"\nwarn_at = 0.5\n'
        f"[notify]\nto = {json.dumps(list(TO))}\nsendmail = {json.dumps([str(program), '-t'])}\n"
        f'hook = {json.dumps([str(hook)])}\nshutdown_grace = "60s"\n'
    )
    query = sock_dir / "run" / "spamguardd.sock"
    admin_socket = sock_dir / "run" / "admin.sock"

    def run(rcpts: range, *, loaded: bool) -> tuple[dict[str, Any], dict[str, Any], str, str]:
        process = daemon_process(config, cwd=sock_dir)
        try:
            assert process.stdout is not None
            wait_started(process.stdout, loaded=loaded)
            for i in rcpts:
                assert ask_blocking(query, fail("auth:leak", f"r{i}")) == b"accept\n"
            shown = admin(admin_socket, "show", user="auth:leak")
            stats = admin(admin_socket, "stats")
            metrics = admin(admin_socket, "metrics")["text"]
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        return shown, stats, metrics, out

    shown, stats, metrics, out = run(range(6), loaded=False)
    assert shown["windows"][0]["warned"] is True
    assert stats["warnings"] == 1
    assert "spamguardd_warnings_total 1.0" in metrics
    assert '"event": "user_warned"' in out
    shown, stats, _, _ = run(range(6, 8), loaded=True)  # 8 used after the restart
    assert shown["windows"][0]["warned"] is True
    assert shown["windows"][0]["counted"] == 8
    assert stats["warnings"] == 0
    subjects = [parse(data)["Subject"] for data in mails(sock_dir / "mail")]
    assert subjects == ["[spamguardd] WARNING auth:leak: 5 of 10 failed recipients within 1h"]
    assert [c["argv"][1:] for c in hook_calls(sock_dir / "hook")] == [["warning", "auth:leak"]]


def test_show_and_stats_render_the_warning() -> None:
    """``spamguardctl show`` names the warned window; ``stats`` counts warnings."""
    window = WindowInfo(limit="10/1h", counted=6, tokens_left=4.0, clears_at=None, warned=True)
    show = ShowReply(
        user="auth:leak",
        blocked=False,
        block=None,
        exempt=False,
        mode="enforce",
        windows=(window,),
        recent_failures=(),
        history=(),
        journal=JournalNotes(truncated_line=None, damaged_lines=()),
    )
    out = io.StringIO()
    render(show, out)
    assert "warned:   10/1h (limits.warn_at reached; nothing blocked)\n" in out.getvalue()
    stats = StatsReply(
        version="1.0",
        started_at="2026-11-28T00:00:00Z",
        uptime_seconds=60,
        mode="enforce",
        queries={},
        queries_total=0,
        blocks=BlockCounts(auto=0, admin=0),
        unblocks=0,
        warnings=2,
        tracked_users=1,
        blocked_users=0,
        would_block_users=0,
        open_connections=0,
        errors=ErrorCounts(protocol=0, internal=0, busy=0, store=0, admin=0),
        latency_ms={},
    )
    out = io.StringIO()
    render(stats, out)
    assert "warnings:       2 (limits.warn_at)\n" in out.getvalue()


def test_real_process_keeps_the_mark_and_takes_the_guard_at_sighup(sock_dir: Path) -> None:
    """A SIGHUP to 12/1h (same period) does not warn again a user warned under 10/1h; a
    second one turns the volume guard on, which then blocks."""
    program = fake_sendmail(sock_dir / "mail")
    config = sock_dir / "spamguardd.toml"
    notify = (
        f"[notify]\nto = {json.dumps(list(TO))}\nsendmail = {json.dumps([str(program)])}\n"
        'shutdown_grace = "60s"\n'
    )
    config.write_text('[limits]\nfailed_recipients = "10/1h"\nwarn_at = 0.5\n' + notify)
    query = sock_dir / "run" / "spamguardd.sock"
    process = daemon_process(config, cwd=sock_dir)

    def reload(text: str) -> None:
        config.write_text(text + notify)
        process.send_signal(signal.SIGHUP)
        assert process.stdout is not None
        while '"event": "reloaded"' not in process.stdout.readline():
            pass

    try:
        assert process.stdout is not None
        wait_started(process.stdout)
        for i in range(6):
            assert ask_blocking(query, fail("auth:leak", f"r{i}")) == b"accept\n"
        reload('[limits]\nfailed_recipients = "12/1h"\nwarn_at = 0.5\n')
        for i in range(6, 9):
            assert ask_blocking(query, fail("auth:leak", f"r{i}")) == b"accept\n"
        reload(
            '[limits]\nfailed_recipients = "12/1h"\nwarn_at = 0.5\naccepted_recipients = "2/1h"\n'
        )
        ok = b"rcpt user=auth:vol rcpt=a@x.test verify=ok ip=192.0.2.7\n"
        replies = [ask_blocking(query, ok) for _ in range(2)]
        stats = admin(sock_dir / "run" / "admin.sock", "stats")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert replies == [b"accept\n", b'freeze reason="2 accepted recipients within 1h"\n']
    assert stats["warnings"] == 2  # auth:leak once, auth:vol at its first accepted recipient
    subjects = sorted(parse(data)["Subject"] for data in mails(sock_dir / "mail"))
    assert subjects == [
        "[spamguardd] WARNING auth:leak: 5 of 10 failed recipients within 1h",
        "[spamguardd] WARNING auth:vol: 1 of 2 accepted recipients within 1h",
        "[spamguardd] blocked auth:vol: 2 accepted recipients within 1h",
    ]
