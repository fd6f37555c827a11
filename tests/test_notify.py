"""Abuse notices and hooks: the message, the transports, retries, and the query path around them.

Rules for these tests:

* the mail system is faked by real programs (a script that stores its argv and stdin, one that
  blocks on a FIFO) and a real SMTP receiver on 127.0.0.1; delivery logic that needs time
  (backoff, budgets, grace periods) uses in-process transports under ``autojump_clock``, because
  a child process in flight would let the mock clock jump past its timeouts;
* sockets live in a short directory under /tmp (``sock_dir``), and every test that could hang
  runs under ``trio.fail_after``;
* no sleeps: a test waits for the notices by closing it (:meth:`NoticeQueue.aclose`
  returns once the queue is delivered) or on an event.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import email.utils
import functools
import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.testing

from spamguardd.core.config import (
    AdminConfig,
    Config,
    Mode,
    NotifyConfig,
    PolicyConfig,
    ServerConfig,
    StateConfig,
)
from spamguardd.core.errors import NotifyError
from spamguardd.core.notice import Notice, NoticeEvent, build_message, printable, shell_word
from spamguardd.core.policy import (
    Block,
    Blocked,
    Effect,
    FailureSample,
    Policy,
    Unblocked,
    WouldBlock,
)
from spamguardd.core.protocol import Reply, Verdict, parse_reply, quote
from spamguardd.core.rate import Rate
from spamguardd.daemon.app import Daemon
from spamguardd.daemon.listeners import bind_unix_listener
from spamguardd.daemon.notices import NoticeQueue
from spamguardd.daemon.query_server import QueryServer
from spamguardd.daemon.transports import HookCommand, SendmailTransport, SmtpTransport
from spamguardd.state.blockfile import BlockStore
from tests.helpers import T0, ask_blocking, daemon_process, readsocket, wait_started, wire

FIVE = PolicyConfig(failed_recipients=(Rate(5, 3600),))
ONE = PolicyConfig(failed_recipients=(Rate(1, 3600),))
TO = ("abuse@example.com", "postmaster@example.com")
HOSTILE = "auth:x;id >>/tmp/pwned;#\"$(touch /tmp/p)`'\\ \nsecond line\t\udcff é"


def parse(data: bytes) -> EmailMessage:
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def body_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def sample(rcpt: str, ip: str | None, at: float, user: str = "auth:m@example.com") -> FailureSample:
    return FailureSample(user, rcpt, None if ip is None else ipaddress.ip_address(ip), at)


BLOCK = Block(
    user="auth:m@example.com",
    blocked_at=T0 + 60,
    reason="5 failed recipients within 1h",
)
SAMPLES = (
    sample("a@nowhere.test", "192.0.2.7", T0 + 1),
    sample("b@nowhere.test", "198.51.100.9", T0 + 2),
    sample("c@nowhere.test", "192.0.2.7", T0 + 60),
)


def notice_of(effect: Effect, verdict: Verdict = Verdict.FREEZE, when: float = T0 + 99) -> Notice:
    notice = Notice.from_effect(effect, verdict=verdict, when=when)
    assert notice is not None
    return notice


BLOCKED = notice_of(Blocked(BLOCK, Rate(5, 3600), SAMPLES))
UNBLOCKED = notice_of(Unblocked(BLOCK, "admin:0", T0 + 600))


# -- fakes ------------------------------------------------------------------------------------


def write_script(path: Path, code: str) -> Path:
    """A Python program at *path*, run directly (argv, no shell) like the real thing."""
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(code))
    path.chmod(0o755)
    return path


def fake_sendmail(directory: Path, *, fail_times: int = 0, fifo: Path | None = None) -> Path:
    """A sendmail that stores argv and stdin as ``argv-N.json`` / ``mail-N.eml`` in *directory*.

    It fails (exit 75, a message on stderr) the first *fail_times* times; given a *fifo*, its
    next run blocks after reading its input until someone opens the FIFO for writing and closes
    it.
    """
    directory.mkdir(exist_ok=True)
    return write_script(
        directory / "sendmail",
        f"""
        import json, pathlib, sys
        out = pathlib.Path({str(directory)!r})
        data = sys.stdin.buffer.read()
        tries = out / "tries"
        count = int(tries.read_text()) if tries.exists() else 0
        tries.write_text(str(count + 1))
        if count < {fail_times}:
            print("451 4.3.0 mail system busy", file=sys.stderr)
            sys.exit(75)
        fifo = {str(fifo) if fifo else ""!r}
        if fifo and count == {fail_times}:
            with open(fifo, "rb") as f:
                f.read()
        n = len(list(out.glob("argv-*.json")))
        (out / f"mail-{{n}}.eml").write_bytes(data)
        (out / f"argv-{{n}}.json").write_text(json.dumps(sys.argv))
        """,
    )


def mails(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(directory.glob("mail-*.eml"))]


def fake_hook(directory: Path, *, status: int = 0) -> Path:
    """A hook that appends its argv and SPAMGUARD_* environment as one JSON line to calls.jsonl."""
    directory.mkdir(exist_ok=True)
    return write_script(
        directory / "hook",
        f"""
        import json, os, sys
        record = {{
            "argv": sys.argv,
            "env": {{k: v for k, v in os.environ.items() if k.startswith("SPAMGUARD_")}},
        }}
        with open({str(directory / "calls.jsonl")!r}, "a") as f:
            f.write(json.dumps(record) + "\\n")
        print("suspended" if {status} == 0 else "panel API down", file=sys.stderr)
        sys.exit({status})
        """,
    )


def hook_calls(directory: Path) -> list[dict[str, Any]]:
    path = directory / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@attrs.define
class RecordingTransport:
    """In-process transport: fails *fail_times* times, optionally hangs, records what it got."""

    fail_times: int = 0
    hang: bool = False
    attempts: int = 0
    sent: list[EmailMessage] = attrs.field(factory=list)
    attempted_at: list[float] = attrs.field(factory=list)
    started: trio.Event = attrs.field(factory=trio.Event)

    async def send(self, message: EmailMessage) -> None:
        self.attempts += 1
        self.attempted_at.append(trio.current_time())
        self.started.set()
        if self.hang:
            await trio.sleep_forever()
        if self.attempts <= self.fail_times:
            raise NotifyError("relay said 451 try later")
        self.sent.append(message)


@attrs.define
class SmtpReceiver:
    """A minimal SMTP server, enough for smtplib: stores (MAIL FROM, RCPT TOs, data)."""

    reject_mail: bool = False
    received: list[tuple[str, list[str], bytes]] = attrs.field(factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        lines = _LineReader(stream)
        sender, rcpts = "", []
        async with stream:
            await stream.send_all(b"220 receiver.test ESMTP\r\n")
            while command := await lines.next():
                verb = command[:4].upper()
                reply = b"250 ok"
                if verb == b"MAIL" and self.reject_mail:
                    reply = b"451 4.3.0 try again later"
                elif verb == b"MAIL":
                    sender = command.decode().split(":", 1)[1].strip()
                elif verb == b"RCPT":
                    rcpts.append(command.decode().split(":", 1)[1].strip())
                elif verb == b"DATA":
                    await stream.send_all(b"354 go ahead\r\n")
                    data = bytearray()
                    while (text := await lines.next()) not in {b".\r\n", b""}:
                        data += text[1:] if text.startswith(b"..") else text
                    self.received.append((sender, rcpts, bytes(data)))
                elif verb == b"QUIT":
                    await stream.send_all(b"221 bye\r\n")
                    return
                await stream.send_all(reply + b"\r\n")


@attrs.define
class _LineReader:
    stream: trio.SocketStream
    buffer: bytearray = attrs.field(factory=bytearray)

    async def next(self) -> bytes:
        """The next CRLF-terminated line, or b"" at EOF."""
        while b"\r\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                return b""
            self.buffer.extend(chunk)
        end = self.buffer.index(b"\r\n") + 2
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line


@attrs.define
class Running:
    server: QueryServer
    notices: NoticeQueue
    path: Path

    async def ask(self, request: bytes) -> Reply:
        return parse_reply(await readsocket(self.path, request))

    async def finish(self) -> None:
        self.server.stop()
        await self.notices.aclose()


async def start(
    nursery: trio.Nursery,
    sock_dir: Path,
    notify: NotifyConfig,
    policy_config: PolicyConfig = FIVE,
) -> Running:
    """A query server on a real socket with its notice worker, wired as the daemon wires it."""
    store = BlockStore(sock_dir / "state")
    store.prepare()
    policy = Policy(policy_config, store.load())
    config = ServerConfig(query_socket=sock_dir / "q.sock")
    wired = wire(config, policy, store, notify=notify)
    sock = bind_unix_listener(config.query_socket, mode=0o660, group=None, backlog=1024)
    await nursery.start(wired.serve, [sock])
    return Running(wired.server, wired.notices, config.query_socket)


def fail(user: str, rcpt: str) -> bytes:
    return b"rcpt user=" + quote(user) + b" rcpt=" + quote(rcpt) + b" verify=fail ip=192.0.2.7"


# -- the message ------------------------------------------------------------------------------


class TestMessage:
    CONFIG = NotifyConfig(to=TO, sender="spamguardd@relay.example.com", subject="[abuse-bot]")

    def build(self, notice: Notice) -> EmailMessage:
        return parse(build_message(notice, self.CONFIG, sender=self.CONFIG.sender or "").as_bytes())

    def test_block_notice_is_a_valid_mail_with_the_evidence(self) -> None:
        """Headers, UTF-8 body, the window, every sample with its time, IPs, verdict, undo."""
        message = self.build(BLOCKED)
        assert message["From"] == "spamguardd@relay.example.com"
        assert [a.addr_spec for a in message["To"].addresses] == list(TO)
        assert message["Subject"] == (
            "[abuse-bot] blocked auth:m@example.com: 5 failed recipients within 1h"
        )
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["X-Spamguard-Event"] == "blocked"
        # a long Message-ID is folded onto its own line, which the parser keeps as a space
        assert message["Message-ID"].strip().startswith("<")
        assert message["Message-ID"].strip().endswith("@relay.example.com>")
        assert message["Date"].datetime == dt.datetime.fromtimestamp(T0 + 60, dt.UTC)
        assert message.get_content_type() == "text/plain"
        assert message.get_content_charset() == "utf-8"
        body = body_of(message)
        for expected in (
            "User:       auth:m@example.com",
            "When:       2026-11-28T00:01:00Z",
            "Event:      blocked (by auto)",
            "Reason:     5 failed recipients within 1h",
            "Window:     5 failed recipients in 1h",
            'Verdict:    freeze (every further recipient of this user is answered "freeze")',
            "Client IPs: 192.0.2.7, 198.51.100.9",
            "Last 3 failed recipients (oldest first):",
            "  2026-11-28T00:00:01Z  192.0.2.7        a@nowhere.test",
            "  2026-11-28T00:00:02Z  198.51.100.9     b@nowhere.test",
            "  2026-11-28T00:01:00Z  192.0.2.7        c@nowhere.test",
            "  spamguardctl show auth:m@example.com",
            "  spamguardctl unblock auth:m@example.com --release",
        ):
            assert expected in body.splitlines(), expected

    def test_monitor_mode_is_marked_would_block(self) -> None:
        """A would-block notice says plainly that nothing was blocked, and offers no undo."""
        effect = WouldBlock("auth:m@example.com", Rate(5, 3600), SAMPLES)
        message = self.build(notice_of(effect, when=T0 + 61))
        assert message["Subject"] == (
            "[abuse-bot] WOULD BLOCK auth:m@example.com (monitor mode): "
            "5 failed recipients within 1h"
        )
        assert message["Date"].datetime == dt.datetime.fromtimestamp(T0 + 61, dt.UTC)
        body = body_of(message)
        assert body.startswith("MONITOR MODE: nothing was blocked.")
        assert 'Verdict:    accept (in enforce mode it would be "freeze")' in body
        assert "unblock" not in body

    def test_admin_block_and_unblock(self) -> None:
        """Admin blocks name who acted; unblock notices say mail flows again."""
        block = Block("auth:m@example.com", T0, "phished account", by="admin:0")
        admin = self.build(notice_of(Blocked(block), Verdict.REJECT))
        assert admin["Subject"] == "[abuse-bot] admin blocked auth:m@example.com: phished account"
        assert "Event:      admin_block (by admin:0)" in body_of(admin)
        assert "spamguardctl unblock auth:m@example.com --release" in body_of(admin)
        unblock = self.build(notice_of(Unblocked(block, "admin:0", T0)))
        assert unblock["Subject"] == "[abuse-bot] unblocked auth:m@example.com"
        assert "Verdict:    accept (counting starts afresh)" in body_of(unblock)
        assert "--release" not in body_of(unblock)

    def test_hostile_user_key_cannot_inject_headers_or_lines(self) -> None:
        """Newlines, quotes and raw bytes in a user key stay inside one escaped line."""
        notice = attrs.evolve(BLOCKED, user=HOSTILE, samples=())
        raw = build_message(notice, self.CONFIG, sender="s@example.com").as_bytes()
        message = parse(raw)
        assert len(message.get_all("Subject") or []) == 1
        assert "\\nsecond line\\t\\xff é" in message["Subject"]
        assert [line for line in body_of(message).splitlines() if "second line" in line] == [
            f"User:       {printable(HOSTILE)}",
            f"  spamguardctl show {shell_word(HOSTILE)}",
            f"  spamguardctl unblock {shell_word(HOSTILE)} --release",
        ]

    def test_non_ascii_is_quoted_printable_and_round_trips(self) -> None:
        """A non-ASCII user key travels as quoted-printable UTF-8 and reads back unchanged."""
        notice = attrs.evolve(BLOCKED, user="auth:josé@exämple.com")
        raw = build_message(notice, self.CONFIG, sender="s@example.com").as_bytes()
        assert raw.isascii()
        message = parse(raw)
        assert message["Content-Transfer-Encoding"] == "quoted-printable"
        assert "User:       auth:josé@exämple.com" in body_of(message)
        assert message["Subject"] == (
            "[abuse-bot] blocked auth:josé@exämple.com: 5 failed recipients within 1h"
        )

    @pytest.mark.parametrize("user", ["auth:m@example.com", "auth:o'neil", HOSTILE, "ip:::1"])
    def test_shell_word_round_trips_through_bash(self, user: str) -> None:
        """The undo command in a notice, pasted into bash, passes the user key unchanged."""
        word = shell_word(user)
        out = subprocess.run(
            ["bash", "-c", f"printf %s {word}"], capture_output=True, check=True
        ).stdout
        assert out == user.encode("utf-8", "surrogateescape")


# -- transports and the hook ------------------------------------------------------------------


class TestSendmail:
    async def test_message_on_stdin_argv_as_configured(self, sock_dir: Path) -> None:
        """sendmail gets exactly the configured argv and the whole message on stdin."""
        program = fake_sendmail(sock_dir / "mail")
        transport = SendmailTransport((str(program), "-t", "-oi"), timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10):
            await transport.send(message)
        assert json.loads((sock_dir / "mail" / "argv-0.json").read_text()) == [
            str(program),
            "-t",
            "-oi",
        ]
        [data] = mails(sock_dir / "mail")
        assert parse(data)["Subject"] == message["Subject"]
        assert "c@nowhere.test" in body_of(parse(data))

    async def test_failure_names_status_and_stderr(self, sock_dir: Path) -> None:
        """A non-zero exit is a NotifyError carrying the status and what the program said."""
        program = fake_sendmail(sock_dir / "mail", fail_times=1)
        transport = SendmailTransport((str(program),), timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10), pytest.raises(NotifyError, match=r"status 75: 451 4\.3\.0"):
            await transport.send(message)

    async def test_missing_program(self, sock_dir: Path) -> None:
        """A sendmail that does not exist is a NotifyError naming it."""
        transport = SendmailTransport((str(sock_dir / "nope"),), timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with pytest.raises(NotifyError, match=r"cannot run .*nope"):
            await transport.send(message)

    async def test_hung_program_is_killed_at_the_timeout(self, sock_dir: Path) -> None:
        """A sendmail that never finishes is given up after send_timeout."""
        fifo = sock_dir / "fifo"
        os.mkfifo(fifo)
        program = fake_sendmail(sock_dir / "mail", fifo=fifo)
        transport = SendmailTransport((str(program),), timeout=0.3)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10), pytest.raises(NotifyError, match=r"within 0\.3s"):
            await transport.send(message)
        assert mails(sock_dir / "mail") == []


class TestSmtp:
    async def test_delivers_to_a_real_receiver(self, nursery: trio.Nursery) -> None:
        """smtplib, in a thread, hands the notice to an SMTP server on 127.0.0.1."""
        receiver = SmtpReceiver()
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, receiver.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        transport = SmtpTransport("127.0.0.1", port, timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10):
            await transport.send(message)
        [(sender, rcpts, data)] = receiver.received
        assert sender == "<s@example.com>"
        assert rcpts == [f"<{a}>" for a in TO]
        received = parse(data)
        assert received["Message-ID"] == message["Message-ID"]
        assert "Client IPs: 192.0.2.7, 198.51.100.9" in body_of(received)

    async def test_refusal_is_a_notify_error(self, nursery: trio.Nursery) -> None:
        """A 4xx from the relay is a NotifyError with the relay's words."""
        receiver = SmtpReceiver(reject_mail=True)
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, receiver.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        transport = SmtpTransport("127.0.0.1", port, timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10), pytest.raises(NotifyError, match="try again later"):
            await transport.send(message)
        assert receiver.received == []

    async def test_nothing_listening(self) -> None:
        """A relay that is not there is a NotifyError, not a crash."""
        with trio.socket.socket() as probe:
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        transport = SmtpTransport("127.0.0.1", port, timeout=10)
        message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
        with trio.fail_after(10), pytest.raises(NotifyError, match=f"127.0.0.1:{port}"):
            await transport.send(message)


class TestHook:
    async def test_hostile_user_is_one_argv_entry_unmodified(self, sock_dir: Path) -> None:
        """Shell metacharacters, quotes, newlines and raw bytes reach the hook as they are."""
        program = fake_hook(sock_dir / "hook")
        notice = attrs.evolve(BLOCKED, user=HOSTILE)
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            await HookCommand((str(program), "--panel", "x y"), timeout=10).run(notice)
        [call] = hook_calls(sock_dir / "hook")
        assert call["argv"] == [str(program), "--panel", "x y", "blocked", HOSTILE]
        assert call["env"] == {
            "SPAMGUARD_EVENT": "blocked",
            "SPAMGUARD_USER": HOSTILE,
            "SPAMGUARD_REASON": "5 failed recipients within 1h",
        }
        assert not Path("/tmp/pwned").exists()  # noqa: ASYNC240 - a stat, once
        [finished] = [e for e in logs if e["event"] == "hook_finished"]
        assert finished["status"] == 0
        assert finished["stderr"] == "suspended"

    async def test_failure_and_timeout(self, sock_dir: Path) -> None:
        """A non-zero exit (stderr logged) and a hook past its timeout are NotifyErrors."""
        failing = fake_hook(sock_dir / "bad", status=3)
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(10),
            pytest.raises(NotifyError, match="exited with status 3"),
        ):
            await HookCommand((str(failing),), timeout=10).run(BLOCKED)
        assert [e["stderr"] for e in logs if e["event"] == "hook_finished"] == ["panel API down"]
        with trio.fail_after(10), pytest.raises(NotifyError, match=r"within 0\.2s"):
            await HookCommand(("sh", "-c", "exec sleep 30", "hook"), timeout=0.2).run(BLOCKED)


# -- delivery discipline ----------------------------------------------------------------------


def queue_with(
    transport: RecordingTransport, journal: list[Any] | None = None, **options: Any
) -> NoticeQueue:
    config = attrs.evolve(NotifyConfig(to=TO), **options)
    record = None if journal is None else journal.append
    return NoticeQueue(config, record=record, transport=transport, wall_clock=lambda: T0)


class TestDelivery:
    def test_warnings_leave_half_the_queue_to_blocks(self) -> None:
        """A wave of warnings fills half the queue at most: the blocks' notices still get in."""
        notices = queue_with(RecordingTransport(), queue_size=4)
        warning = attrs.evolve(BLOCKED, event=NoticeEvent.WARNING)
        with structlog.testing.capture_logs() as logs:
            assert [notices.submit(warning) for _ in range(3)] == [True, True, False]
            assert [notices.submit(BLOCKED) for _ in range(3)] == [True, True, False]
        dropped = [e for e in logs if e["event"] == "notice_dropped"]
        assert [e["reason"] for e in dropped] == [
            "queue half full: the rest is kept for blocks",
            "queue full",
        ]
        assert notices.statistics().dropped == 2

    async def test_fails_twice_then_succeeds_delivers_once(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Two failures are retried after 1 s and 2 s; the third attempt delivers, once."""
        transport = RecordingTransport(fail_times=2)
        notices = queue_with(transport)
        await nursery.start(notices.run)
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            assert notices.submit(BLOCKED)
            await notices.aclose()
        assert len(transport.sent) == 1
        assert [t - start for t in transport.attempted_at] == [0.0, 1.0, 3.0]
        stats = notices.statistics()
        assert (stats.queued, stats.sent, stats.failed, stats.retries) == (1, 1, 0, 2)
        assert [e["error"] for e in logs if e["event"] == "notice_retry"] == [
            "relay said 451 try later"
        ] * 2
        assert [e["user"] for e in logs if e["event"] == "notice_sent"] == ["auth:m@example.com"]

    async def test_gives_up_after_the_retry_budget(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A transport that always fails is retried with backoff for retry_for, then logged."""
        transport = RecordingTransport(fail_times=1000)
        notices = queue_with(transport, retry_for=300.0, shutdown_grace=10_000.0)
        await nursery.start(notices.run)
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            notices.submit(BLOCKED)
            notices.submit(attrs.evolve(BLOCKED, user="auth:second"))
            await notices.aclose()
        offsets = [t - start for t in transport.attempted_at]
        # waits of 1, 2, 4, ... s capped at 60 s, while the next attempt fits in 300 s; then the
        # second notice gets a budget of its own
        one = [0, 1, 3, 7, 15, 31, 63, 123, 183, 243]
        assert offsets == one + [243 + o for o in one]
        failed = [e for e in logs if e["event"] == "notice_failed"]
        assert [e["user"] for e in failed] == ["auth:m@example.com", "auth:second"]
        assert failed[0]["error"] == "relay said 451 try later"
        assert failed[0]["attempts"] == len(one)
        assert notices.statistics().failed == 2
        assert notices.statistics().sent == 0

    async def test_a_bug_in_a_transport_fails_one_notice_not_the_worker(
        self, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
    ) -> None:
        """An unexpected exception is logged with its traceback; the next notice still goes."""

        @attrs.define
        class Buggy(RecordingTransport):
            async def send(self, message: EmailMessage) -> None:
                if "auth:bug" in str(message["Subject"]):
                    raise RuntimeError("boom")
                await super().send(message)

        transport = Buggy()
        notices = queue_with(transport)
        await nursery.start(notices.run)
        with structlog.testing.capture_logs() as logs:
            notices.submit(attrs.evolve(BLOCKED, user="auth:bug"))
            notices.submit(BLOCKED)
            await notices.aclose()
        assert [m["Subject"] for m in transport.sent] == [
            "[spamguardd] blocked auth:m@example.com: 5 failed recipients within 1h"
        ]
        [failed] = [e for e in logs if e["event"] == "notice_failed"]
        assert failed["error"] == "internal error: RuntimeError('boom')"
        assert [e["log_level"] for e in logs if e["event"] == "notice_error"] == ["error"]

    async def test_full_queue_drops_without_waiting(self) -> None:
        """Past queue_size a notice is dropped at once, logged, counted and journaled."""
        journal: list[Any] = []
        notices = queue_with(RecordingTransport(), journal, queue_size=1)
        with structlog.testing.capture_logs() as logs:
            assert notices.submit(BLOCKED)
            assert not notices.submit(attrs.evolve(BLOCKED, user="auth:late"))
        assert [(e["event"], e["user"], e["reason"]) for e in logs] == [
            ("notice_dropped", "auth:late", "queue full")
        ]
        assert notices.statistics().dropped == 1
        assert [(r["event"], r["user"], r["dropped_because"], r["parts"]) for r in journal] == [
            ("notice_dropped", "auth:late", "queue full", ["mail"])
        ]

    async def test_off_without_recipients_or_hook(self) -> None:
        """No ``to`` and no hook: notices are ignored, nothing is queued or counted as dropped."""
        notices = NoticeQueue(NotifyConfig())
        assert not notices.enabled
        assert not notices.submit(BLOCKED)
        assert notices.statistics() == queue_with(RecordingTransport()).statistics()

    async def test_unblock_mail_is_optional_the_hook_always_runs(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """notify_unblock = false mails no unblock; the hook still hears of it."""
        program = fake_hook(sock_dir / "hook")
        transport = RecordingTransport()
        notices = queue_with(transport, notify_unblock=False, hook=(str(program),))
        await nursery.start(notices.run)
        with trio.fail_after(10):
            notices.submit(BLOCKED)
            notices.submit(UNBLOCKED)
            await notices.aclose()
        assert [m["X-Spamguard-Event"] for m in transport.sent] == ["blocked"]
        assert [c["argv"][1:] for c in hook_calls(sock_dir / "hook")] == [
            ["blocked", BLOCK.user],
            ["unblock", BLOCK.user],
        ]
        assert notices.statistics().hooks_ok == 2

    async def test_shutdown_grace_then_unsent_goes_to_the_journal(
        self, nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A hung transport at shutdown: after the grace period the rest is logged and journaled."""
        transport = RecordingTransport(hang=True)
        records: list[Any] = []
        config = NotifyConfig(to=TO, shutdown_grace=5.0)
        notices = NoticeQueue(
            config,
            record=records.append,
            transport=transport,
            wall_clock=lambda: T0 + trio.current_time(),
        )
        await nursery.start(notices.run)
        notices.submit(BLOCKED)
        notices.submit(UNBLOCKED)
        await transport.started.wait()
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            await notices.aclose()
        assert trio.current_time() - start == pytest.approx(5.0)
        assert not notices.submit(BLOCKED)  # closed: dropped, not queued
        unsent = [e["notice_event"] for e in logs if e["event"] == "notice_unsent"]
        assert unsent == ["blocked", "unblock"]
        assert [(r["event"], r["notice_event"], r["user"], r["parts"]) for r in records] == [
            ("notice_unsent", "blocked", BLOCK.user, ["mail"]),
            ("notice_unsent", "unblock", BLOCK.user, ["mail"]),
            ("notice_dropped", "blocked", BLOCK.user, ["mail"]),
        ]
        assert records[0]["reason"] == "5 failed recipients within 1h"
        assert notices.statistics().unsent == 2

    async def test_unsent_names_only_what_was_still_due(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """Mail sent, hook still running at the end of the grace period: only the hook is due."""
        transport = RecordingTransport()
        records: list[Any] = []
        notices = queue_with(
            transport,
            records,
            hook=("sh", "-c", "exec sleep 60", "hook"),
            hook_timeout=120.0,
            shutdown_grace=0.3,
        )
        await nursery.start(notices.run)
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            notices.submit(BLOCKED)
            await transport.started.wait()
            await notices.aclose()
        assert len(transport.sent) == 1
        assert [e["parts"] for e in logs if e["event"] == "notice_unsent"] == [["hook"]]
        [record] = records
        assert record["parts"] == ["hook"]


# -- through the query socket -----------------------------------------------------------------


class TestQueryPath:
    async def test_fifty_concurrent_failures_at_the_limit_give_one_notice(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """50 simultaneous failing queries: one block, exactly one mail, naming the user."""
        program = fake_sendmail(sock_dir / "mail")
        notify = NotifyConfig(to=TO, sendmail=(str(program), "-t", "-oi"))
        running = await start(nursery, sock_dir, notify)
        replies: list[Reply] = []
        with trio.fail_after(20):

            async def one(i: int) -> None:
                replies.append(await running.ask(fail("auth:burst", f"r{i}@x.test")))

            async with trio.open_nursery() as clients:
                for i in range(50):
                    clients.start_soon(one, i)
            await running.finish()
        assert sum(r.verdict is Verdict.FREEZE for r in replies) == 46
        [data] = mails(sock_dir / "mail")
        message = parse(data)
        assert (
            message["Subject"] == "[spamguardd] blocked auth:burst: 5 failed recipients within 1h"
        )
        body = body_of(message)
        assert "Client IPs: 192.0.2.7" in body
        assert len([line for line in body.splitlines() if "@x.test" in line]) == 5
        assert running.notices.statistics().sent == 1

    async def test_hostile_user_reaches_the_hook_from_the_wire(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """A ${quote:}d user key with shell syntax and a newline arrives at the hook unchanged."""
        user = HOSTILE.replace(
            "\udcff", ""
        )  # the wire is UTF-8 text here; raw bytes are tested above
        program = fake_hook(sock_dir / "hook")
        notify = NotifyConfig(hook=(str(program),))
        running = await start(nursery, sock_dir, notify, ONE)
        with trio.fail_after(10):
            assert (await running.ask(fail(user, "r@x.test"))).verdict is Verdict.FREEZE
            await running.finish()
        [call] = hook_calls(sock_dir / "hook")
        assert call["argv"] == [str(program), "blocked", user]
        assert call["env"] == {
            "SPAMGUARD_EVENT": "blocked",
            "SPAMGUARD_USER": user,
            "SPAMGUARD_REASON": "1 failed recipients within 1h",
        }

    async def test_hung_sendmail_does_not_slow_the_query_path(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """While sendmail hangs, queries (and further blocks) are answered at full speed."""
        fifo = sock_dir / "fifo"
        os.mkfifo(fifo)
        program = fake_sendmail(sock_dir / "mail", fifo=fifo)
        notify = NotifyConfig(to=TO, sendmail=(str(program),), send_timeout=60, shutdown_grace=60)
        running = await start(nursery, sock_dir, notify)
        with trio.fail_after(30):
            for i in range(5):
                await running.ask(fail("auth:first", f"r{i}"))
            # opening the FIFO for writing returns once sendmail has opened it: it is hung now
            writer = await trio.to_thread.run_sync(lambda: fifo.open("wb"), abandon_on_cancel=True)
            latencies = []
            for i in range(200):
                started = trio.current_time()
                reply = await running.ask(fail(f"auth:u{i % 20}", f"x{i}"))
                latencies.append(trio.current_time() - started)
                assert reply.verdict in {Verdict.ACCEPT, Verdict.FREEZE}
            # 20 users x 10 failures: 20 more blocks, queued behind the hung one
            assert mails(sock_dir / "mail") == []
            assert running.notices.statistics().sent == 0
            assert max(latencies) < 0.25, max(latencies)
            writer.close()  # let sendmail finish
            await running.finish()
        assert len(mails(sock_dir / "mail")) == 21
        assert running.notices.statistics().sent == 21

    async def test_monitor_mode_mails_would_block_once_and_runs_no_hook(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """Monitor mode: one WOULD BLOCK mail per user, every answer accept, the hook untouched."""
        program = fake_sendmail(sock_dir / "mail")
        hook = fake_hook(sock_dir / "hook")
        notify = NotifyConfig(to=TO, sendmail=(str(program),), hook=(str(hook),))
        running = await start(nursery, sock_dir, notify, attrs.evolve(FIVE, mode=Mode.MONITOR))
        with trio.fail_after(10):
            replies = [await running.ask(fail("auth:trial", f"r{i}")) for i in range(8)]
            await running.finish()
        assert {r.verdict for r in replies} == {Verdict.ACCEPT}
        [data] = mails(sock_dir / "mail")
        message = parse(data)
        assert "WOULD BLOCK auth:trial (monitor mode)" in message["Subject"]
        assert message["X-Spamguard-Event"] == "would_block"
        assert hook_calls(sock_dir / "hook") == []


class TestDaemon:
    def config(self, sock_dir: Path, **notify: Any) -> Config:
        return Config(
            policy=FIVE,
            server=ServerConfig(query_socket=sock_dir / "q.sock"),
            state=StateConfig(dir=sock_dir / "state"),
            admin=AdminConfig(socket=sock_dir / "admin.sock"),
            notify=attrs.evolve(NotifyConfig(to=TO), **notify),
        )

    async def run_until_blocked(self, daemon: Daemon, path: Path, users: Sequence[str]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
            )
            for user in users:
                for i in range(5):
                    await readsocket(path, fail(user, f"r{i}"))
            daemon.stop()

    async def test_block_mails_one_notice(self, sock_dir: Path) -> None:
        """The daemon as wired: a block sends its notice, and a stop waits for it."""
        program = fake_sendmail(sock_dir / "mail")
        daemon = Daemon(self.config(sock_dir, sendmail=(str(program),)))
        with trio.fail_after(20):
            await self.run_until_blocked(daemon, sock_dir / "q.sock", ["auth:d"])
        [data] = mails(sock_dir / "mail")
        assert "blocked auth:d" in parse(data)["Subject"]

    async def test_stop_with_hung_sendmail_journals_unsent(self, sock_dir: Path) -> None:
        """A stop while sendmail hangs waits the grace period, then journals what is unsent."""
        fifo = sock_dir / "fifo"
        os.mkfifo(fifo)
        program = fake_sendmail(sock_dir / "mail", fifo=fifo)
        daemon = Daemon(self.config(sock_dir, sendmail=(str(program),), shutdown_grace=0.3))
        with structlog.testing.capture_logs() as logs, trio.fail_after(20):
            await self.run_until_blocked(daemon, sock_dir / "q.sock", ["auth:a", "auth:b"])
        assert [e["user"] for e in logs if e["event"] == "notice_unsent"] == ["auth:a", "auth:b"]
        journal = [
            json.loads(line) for line in (sock_dir / "state" / "journal").read_text().splitlines()
        ]
        # the journal also holds the blocks themselves; the unsent notices follow them
        unsent = [entry["user"] for entry in journal if entry["event"] == "notice_unsent"]
        assert unsent == ["auth:a", "auth:b"]
        assert [entry["event"] for entry in journal].count("block") == 2
        assert mails(sock_dir / "mail") == []


def test_real_process_mails_the_block_and_exits_cleanly_on_sigterm(sock_dir: Path) -> None:
    """``python -m spamguardd`` with a [notify] file: a block is mailed; SIGTERM exits 0."""
    program = fake_sendmail(sock_dir / "mail")
    hook = fake_hook(sock_dir / "hook")
    config = sock_dir / "spamguardd.toml"
    config.write_text(
        '[limits]\nfailed_recipients = "3/1h"\n'
        f"[notify]\nto = {json.dumps(list(TO))}\nsendmail = {json.dumps([str(program), '-t'])}\n"
        f"hook = {json.dumps([str(hook)])}\n"
    )
    process = daemon_process(config, cwd=sock_dir)
    try:
        assert process.stdout is not None
        wait_started(process.stdout)
        replies = [
            ask_blocking(sock_dir / "run" / "spamguardd.sock", fail("auth:proc", f"r{i}"))
            for i in range(4)
        ]
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert replies[2:] == [b'freeze reason="3 failed recipients within 1h"\n'] * 2
    assert process.returncode == 0, err
    assert '"event": "notice_sent"' in out
    [data] = mails(sock_dir / "mail")
    assert parse(data)["Subject"] == "[spamguardd] blocked auth:proc: 3 failed recipients within 1h"
    assert [c["argv"][1:] for c in hook_calls(sock_dir / "hook")] == [["blocked", "auth:proc"]]


async def test_admin_block_and_unblock_send_their_notices(sock_dir: Path) -> None:
    """A block and an unblock through the admin socket each mail one notice (unblock opt-in)."""
    program = fake_sendmail(sock_dir / "mail")
    config = Config(
        policy=FIVE,
        server=ServerConfig(query_socket=sock_dir / "q.sock"),
        state=StateConfig(dir=sock_dir / "state"),
        admin=AdminConfig(socket=sock_dir / "admin.sock"),
        notify=NotifyConfig(to=TO, sendmail=(str(program),), notify_unblock=True),
    )
    daemon = Daemon(config)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
            )
            for request in (
                {"command": "block", "user": "auth:x", "reason": "phished"},
                {"command": "unblock", "user": "auth:x"},
            ):
                line = json.dumps(request).encode() + b"\n"
                answer = await trio.to_thread.run_sync(ask_blocking, sock_dir / "admin.sock", line)
                reply = json.loads(answer.split(b"\n", 1)[0])
                assert reply["ok"], reply
            daemon.stop()
    subjects = [parse(data)["Subject"] for data in mails(sock_dir / "mail")]
    assert len(subjects) == 2
    assert "auth:x" in subjects[0]
    assert "auth:x" in subjects[1]
    assert subjects[0] != subjects[1]
