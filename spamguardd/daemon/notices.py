"""Side effects of blocks: one abuse notice per block event, and the hook command.

The policy returns effects; the server hands each to :meth:`NoticeDispatcher.on_effect`, which
only puts a :class:`Notice` on a bounded queue (``send_nowait``): a verdict never waits for a
mail. One worker task, :func:`run_notifier`, takes notices off the queue in order (a hook sees a
block before the unblock that follows it), mails them and runs the hook, retrying failures with
backoff for a bounded time.

Nothing user-controlled ever passes through a shell: sendmail and the hook get argv lists, the user
key is one argv entry of its own, and in the message it is shown escaped (a user key may hold
newlines and bytes that are not UTF-8).

Invariants:

1. Every notice accepted by :meth:`NoticeDispatcher.submit` ends as exactly one of: delivered
   (``sent``), given up after its retry budget (``failed``, logged ``notice_failed``), or left at
   shutdown (``unsent``, logged and written to the journal). A notice refused by a full queue is
   ``dropped`` and logged ``notice_dropped``.
2. The query path calls only :meth:`NoticeDispatcher.on_effect`, which never waits and never raises.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.policy
import email.utils
import enum
import os
import platform
import shlex
import smtplib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Final, Protocol

import attrs
import structlog
import trio

from spamguardd.core.config import NotifyConfig
from spamguardd.core.errors import NotifyError, StoreError
from spamguardd.core.policy import Block, Blocked, Effect, FailureSample
from spamguardd.core.protocol import Verdict
from spamguardd.core.rate import Rate
from spamguardd.daemon.smtp_socket import UnixSocketSMTP
from spamguardd.state.journal import Journal

log = structlog.get_logger("spamguardd.daemon.notices")

#: First wait after a failed attempt; it doubles per attempt up to MAX_BACKOFF. A relay that is
#: restarting is back within seconds; one that is down for longer is not helped by hammering it.
INITIAL_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 60.0
#: stderr kept from sendmail or a hook for the log (a chatty program must not flood it).
STDERR_LIMIT: Final = 2000
#: Headers are folded only past RFC 5322's hard limit of 998: folding at 78 puts a long Subject
#: or Message-ID on a continuation line, which some readers (Python's among them) show with a
#: leading space.
_POLICY: Final = email.policy.default.clone(max_line_length=998)


class NoticeEvent(enum.StrEnum):
    """What happened to the user. The value is what the hook gets as its event argument."""

    BLOCKED = "blocked"
    WOULD_BLOCK = "would_block"
    ADMIN_BLOCK = "admin_block"
    UNBLOCK = "unblock"


@attrs.frozen
class Notice:
    """One block event as people need it: who, when, why, the evidence, and how to undo it."""

    event: NoticeEvent
    user: str
    #: Wall-clock time of the event, seconds since the epoch.
    when: float
    #: Why, in words: ``"100 failed recipients within 1h"``, or an admin's reason.
    reason: str
    #: The verdict now in force for the user's mail (for ``would_block``: the one that would be).
    verdict: Verdict
    #: The window that tripped, for automatic blocks and would-blocks.
    rate: Rate | None = None
    #: The user's latest counted failures, oldest first.
    samples: tuple[FailureSample, ...] = ()
    #: Who acted: ``auto`` for the policy, ``admin`` (or ``admin:UID``) for an admin.
    by: str = "auto"

    @classmethod
    def from_effect(cls, effect: Effect, *, verdict: Verdict, when: float) -> Notice:
        """The notice for a policy effect.

        Args:
            effect: what the policy returned.
            verdict: the configured block verdict.
            when: wall-clock time of the effect (a block carries its own time and ignores it).
        """
        if isinstance(effect, Blocked):
            block = effect.block
            return cls(
                NoticeEvent.BLOCKED,
                block.user,
                block.blocked_at,
                block.reason,
                verdict,
                rate=effect.rate,
                samples=effect.samples,
                by=block.by,
            )
        rate = effect.rate
        return cls(
            NoticeEvent.WOULD_BLOCK,
            effect.user,
            when,
            f"{rate.count} failed recipients within {_period(rate)}",
            verdict,
            rate=rate,
            samples=effect.samples,
        )

    @classmethod
    def admin_block(
        cls, block: Block, *, verdict: Verdict, samples: Sequence[FailureSample] = ()
    ) -> Notice:
        """The notice for a block an admin made."""
        return cls(
            NoticeEvent.ADMIN_BLOCK,
            block.user,
            block.blocked_at,
            block.reason,
            verdict,
            samples=tuple(samples),
            by=block.by,
        )

    @classmethod
    def unblock(cls, user: str, *, when: float, by: str, reason: str = "unblocked") -> Notice:
        """The notice for lifting a block: mail of *user* is accepted again."""
        return cls(NoticeEvent.UNBLOCK, user, when, reason, Verdict.ACCEPT, by=by)

    @property
    def client_ips(self) -> tuple[str, ...]:
        """Distinct client addresses in the samples, in order of first appearance."""
        return tuple(dict.fromkeys(str(s.ip) for s in self.samples if s.ip is not None))


@attrs.frozen
class NoticeStatistics:
    """Counts for ``stats`` and metrics."""

    queued: int
    sent: int
    failed: int
    dropped: int
    unsent: int
    retries: int
    hooks_ok: int
    hooks_failed: int

    def metric_events(self) -> dict[str, int]:
        """The counters under the names the metrics export uses (``notices_sent``, ...)."""
        return {
            "notices_sent": self.sent,
            "notices_failed": self.failed,
            "notices_dropped": self.dropped,
        }


# -- the message ------------------------------------------------------------------------------


def build_message(
    notice: Notice,
    config: NotifyConfig,
    *,
    sender: str,
    message_id: str | None = None,
) -> EmailMessage:
    """The abuse notice for *notice* as a complete UTF-8 message. Pure apart from the Message-ID.

    Args:
        notice: the event.
        config: recipients and subject prefix.
        sender: the From address (``config.sender`` or a default the caller chose).
        message_id: a fixed Message-ID (tests); by default a fresh one in the sender's domain
            (``make_msgid`` would otherwise ask DNS for the host's name).

    Returns:
        The message, headers and body set.
    """
    message = EmailMessage(policy=_POLICY)
    user = printable(notice.user)
    titles = {
        NoticeEvent.BLOCKED: f"blocked {user}: {notice.reason}",
        NoticeEvent.WOULD_BLOCK: f"WOULD BLOCK {user} (monitor mode): {notice.reason}",
        NoticeEvent.ADMIN_BLOCK: f"admin blocked {user}: {printable(notice.reason)}",
        NoticeEvent.UNBLOCK: f"unblocked {user}",
    }
    message["Subject"] = f"{config.subject} {titles[notice.event]}".strip()
    message["From"] = sender
    message["To"] = ", ".join(config.to)
    message["Date"] = email.utils.format_datetime(dt.datetime.fromtimestamp(notice.when, dt.UTC))
    message["Message-ID"] = message_id or email.utils.make_msgid(
        "spamguardd", domain=sender.rpartition("@")[2] or "localhost"
    )
    # RFC 3834: no vacation replies or other automatic answers to this
    message["Auto-Submitted"] = "auto-generated"
    message["X-Spamguard-Event"] = notice.event.value
    body = _body(notice)
    # quoted-printable rather than 8bit for non-ASCII keys: a relay without 8BITMIME takes it
    message.set_content(body, charset="utf-8", cte="7bit" if body.isascii() else "quoted-printable")
    return message


def _body(notice: Notice) -> str:
    user = printable(notice.user)
    word = shell_word(notice.user)
    lines: list[str] = []
    add = lines.append
    if notice.event is NoticeEvent.WOULD_BLOCK:
        add("MONITOR MODE: nothing was blocked. spamguardd WOULD HAVE BLOCKED this user.")
    elif notice.event is NoticeEvent.UNBLOCK:
        add("spamguardd lifted the block of this user; its mail is accepted again.")
    else:
        add("spamguardd blocked this user's outgoing mail.")
    add("")
    add(f"User:       {user}")
    add(f"When:       {_time(notice.when)}")
    add(f"Event:      {notice.event.value} (by {printable(notice.by)})")
    add(f"Reason:     {printable(notice.reason)}")
    if notice.rate is not None:
        add(f"Window:     {notice.rate.count} failed recipients in {_period(notice.rate)}")
    if notice.event is NoticeEvent.WOULD_BLOCK:
        add(f'Verdict:    accept (in enforce mode it would be "{notice.verdict}")')
    elif notice.event is NoticeEvent.UNBLOCK:
        add("Verdict:    accept (counting starts afresh)")
    else:
        verdict = notice.verdict
        add(f'Verdict:    {verdict} (every further recipient of this user is answered "{verdict}")')
    add(f"Client IPs: {', '.join(notice.client_ips) or '(none recorded)'}")
    if notice.samples:
        add("")
        add(f"Last {len(notice.samples)} failed recipients (oldest first):")
        lines.extend(
            f"  {_time(s.at)}  {str(s.ip) if s.ip else '-':<15}  {printable(s.rcpt)}"
            for s in notice.samples
        )
    add("")
    add("Inspect:")
    add(f"  spamguardctl show {word}")
    if notice.event in {NoticeEvent.BLOCKED, NoticeEvent.ADMIN_BLOCK}:
        add("Undo (lift the block and release the mail frozen meanwhile):")
        add(f"  spamguardctl unblock {word} --release")
    elif notice.event is NoticeEvent.WOULD_BLOCK:
        add('To block such users, set mode = "enforce" in the configuration.')
    add("")
    add("-- ")
    add("spamguardd (automatic notice; replies are not read)")
    return "\n".join(lines) + "\n"


def printable(text: str) -> str:
    """*text* for one line of a message: control characters and undecodable bytes escaped.

    User keys and recipients come from the network: a newline in one must not start a new header
    or a fake line in the body, and bytes that are not UTF-8 (kept as surrogates) must show.
    """
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if raw.isprintable():
        return raw
    return "".join(c if c.isprintable() else _escape(c) for c in raw)


def _escape(char: str) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def shell_word(text: str) -> str:
    """*text* quoted as one shell word that a person can paste, even with newlines in it.

    Printable text gets POSIX single quotes (:func:`shlex.quote`); anything else gets bash's
    ``$'...'`` form, which spells control characters and raw bytes as escapes.
    """
    if text.isprintable() and not _has_surrogates(text):
        return shlex.quote(text)
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        char = chr(byte)
        if char in "\\'":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "$'" + "".join(out) + "'"


def _has_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _period(rate: Rate) -> str:
    return str(rate).partition("/")[2]


# -- transports -------------------------------------------------------------------------------


class Transport(Protocol):
    """Hands a finished message to the mail system."""

    async def send(self, message: EmailMessage) -> None:
        """Deliver *message* or raise.

        Raises:
            NotifyError: it was not accepted; the reason says why.
        """


@attrs.frozen
class SendmailTransport:
    """Feeds the message to a sendmail-compatible program (argv, never a shell)."""

    argv: tuple[str, ...]
    timeout: float

    async def send(self, message: EmailMessage) -> None:
        """Run sendmail with the message on stdin; a non-zero exit is a failure.

        Raises:
            NotifyError: the program could not be run, timed out, or exited non-zero.
        """
        data = message.as_bytes()
        with _time_limit(self.timeout, self.argv[0]):
            result = await _run(self.argv, data, env=None)
        if result.returncode != 0:
            raise NotifyError(
                f"{self.argv[0]} exited with status {result.returncode}: {_stderr(result)}"
            )


@attrs.frozen
class SmtpTransport:
    """Sends the message to an SMTP relay with the standard library, in a worker thread.

    *host* may be the path of a Unix socket that speaks SMTP (then *port* is None): the
    package's ``spamguardd-submit.socket``, the local MTA's ``sendmail -bs``.
    """

    host: str | Path
    port: int | None
    timeout: float
    #: EHLO name. Passed explicitly: smtplib's default asks DNS for the host's full name.
    local_hostname: str = attrs.field(factory=lambda: platform.node() or "localhost")

    async def send(self, message: EmailMessage) -> None:
        """Deliver *message* to the relay.

        Raises:
            NotifyError: connecting failed, the relay refused, or the attempt timed out.
        """
        with _time_limit(self.timeout, f"SMTP {self._where}"):
            # abandoned on timeout: the thread ends by itself within smtplib's own timeout
            await trio.to_thread.run_sync(self._send_sync, message, abandon_on_cancel=True)

    @property
    def _where(self) -> str:
        return str(self.host) if self.port is None else f"{self.host}:{self.port}"

    def _send_sync(self, message: EmailMessage) -> None:
        try:
            smtp: smtplib.SMTP
            if self.port is None:
                smtp = UnixSocketSMTP(
                    Path(self.host), local_hostname=self.local_hostname, timeout=self.timeout
                )
            else:
                smtp = smtplib.SMTP(
                    str(self.host),
                    self.port,
                    local_hostname=self.local_hostname,
                    timeout=self.timeout,
                )
            with smtp:
                smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise NotifyError(f"SMTP {self._where}: {exc}") from exc


@attrs.frozen
class HookCommand:
    """Runs the configured hook with the event and the user key as argv entries of their own."""

    argv: tuple[str, ...]
    timeout: float

    async def run(self, notice: Notice) -> None:
        """Run the hook for *notice*, logging its exit status and stderr.

        Raises:
            NotifyError: the hook could not be run, timed out, or exited non-zero.
        """
        env = {
            **os.environ,
            "SPAMGUARD_EVENT": notice.event.value,
            "SPAMGUARD_USER": notice.user,
            "SPAMGUARD_REASON": notice.reason,
        }
        argv = (*self.argv, notice.event.value, notice.user)
        with _time_limit(self.timeout, f"hook {self.argv[0]}"):
            result = await _run(argv, b"", env=env)
        (log.info if result.returncode == 0 else log.warning)(
            "hook_finished",
            hook=self.argv[0],
            notice_event=notice.event.value,
            user=notice.user,
            status=result.returncode,
            stderr=_stderr(result),
        )
        if result.returncode != 0:
            raise NotifyError(f"hook {self.argv[0]} exited with status {result.returncode}")


async def _run(
    argv: Sequence[str], stdin: bytes, env: dict[str, str] | None
) -> subprocess.CompletedProcess[bytes]:
    try:
        return await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in argv or env
        raise NotifyError(f"cannot run {argv[0]}: {exc}") from exc


@contextlib.contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Cancel the block after *seconds* (a child process is killed) and say so as NotifyError."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise NotifyError(f"{what} did not finish within {seconds:g}s; given up") from None


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or b"")[:STDERR_LIMIT].decode("utf-8", "backslashreplace")
    return text.strip()


# -- the queue and the worker -----------------------------------------------------------------


class NoticeDispatcher:
    """The notice queue, its delivery with retries, and its counters. See the module docstring."""

    def __init__(
        self,
        config: NotifyConfig,
        *,
        verdict: Verdict,
        journal: Journal | None = None,
        transport: Transport | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.verdict = verdict
        self.journal = journal
        self.wall_clock = wall_clock
        self.sender = config.sender or f"spamguardd@{platform.node() or 'localhost'}"
        self.transport = transport or _default_transport(config)
        self.hook = HookCommand(config.hook, config.hook_timeout) if config.hook else None
        self._send, self.receive_channel = trio.open_memory_channel[Notice](config.queue_size)
        #: Cancelled at the end of the shutdown grace period (see :meth:`close`).
        self.shutdown_scope = trio.CancelScope()
        self._running = False
        self._finished = trio.Event()
        #: What is still to do for the notice being delivered (see :meth:`record_unsent`).
        self._due: list[str] = []
        self._queued = self._sent = self._failed = self._dropped = self._unsent = 0
        self._retries = self._hooks_ok = self._hooks_failed = 0

    @property
    def enabled(self) -> bool:
        """Whether anything is done for a notice: mail to someone, or a hook."""
        return self.config.mail_enabled or self.hook is not None

    def statistics(self) -> NoticeStatistics:
        """Current counters."""
        return NoticeStatistics(
            queued=self._queued,
            sent=self._sent,
            failed=self._failed,
            dropped=self._dropped,
            unsent=self._unsent,
            retries=self._retries,
            hooks_ok=self._hooks_ok,
            hooks_failed=self._hooks_failed,
        )

    # -- producer side (the query path) -------------------------------------------------------

    def on_effect(self, effect: Effect) -> None:
        """Queue the notice for a policy effect. Called on the query path: never waits."""
        if self.enabled:
            self.submit(Notice.from_effect(effect, verdict=self.verdict, when=self.wall_clock()))

    def submit(self, notice: Notice) -> bool:
        """Queue *notice* without waiting; False (logged, counted) when it had to be dropped."""
        if not self.enabled:
            return False
        try:
            self._send.send_nowait(notice)
        except trio.WouldBlock:
            reason = "queue full"
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            reason = "shutting down"
        else:
            self._queued += 1
            return True
        self._dropped += 1
        log.error(
            "notice_dropped", notice_event=notice.event.value, user=notice.user, reason=reason
        )
        return False

    def close(self) -> None:
        """Take no more notices; the worker gets ``shutdown_grace`` seconds for the queued ones."""
        self._send.close()
        self.shutdown_scope.deadline = min(
            self.shutdown_scope.deadline, trio.current_time() + self.config.shutdown_grace
        )

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the worker (if running) has finished or given up."""
        self.close()
        if self._running:
            await self._finished.wait()

    # -- consumer side ------------------------------------------------------------------------

    def parts(self, notice: Notice) -> list[str]:
        """What is done for *notice*: ``mail`` and/or ``hook``.

        No mail for an unblock unless ``notify_unblock``; no hook for ``would_block``, because
        monitor mode must act on nobody (a suspend hook would turn it into enforce mode).
        """
        parts = []
        if self.config.mail_enabled and (
            notice.event is not NoticeEvent.UNBLOCK or self.config.notify_unblock
        ):
            parts.append("mail")
        if self.hook is not None and notice.event is not NoticeEvent.WOULD_BLOCK:
            parts.append("hook")
        return parts

    async def deliver(self, notice: Notice) -> None:
        """Mail *notice* and run the hook, as :meth:`parts` says, each retried within budget."""
        self._due = self.parts(notice)
        if "mail" in self._due:
            message = build_message(notice, self.config, sender=self.sender)
            if await self._with_retries("mail", notice, lambda: self.transport.send(message)):
                self._sent += 1
                log.info("notice_sent", notice_event=notice.event.value, user=notice.user)
            else:
                self._failed += 1
            self._due.remove("mail")
        if self.hook is not None and "hook" in self._due:
            hook = self.hook
            if await self._with_retries("hook", notice, lambda: hook.run(notice)):
                self._hooks_ok += 1
            else:
                self._hooks_failed += 1
            self._due.remove("hook")

    async def _with_retries(
        self, what: str, notice: Notice, attempt: Callable[[], Awaitable[None]]
    ) -> bool:
        deadline = trio.current_time() + self.config.retry_for
        delay = INITIAL_BACKOFF
        tries = 0
        while True:
            tries += 1
            try:
                await attempt()
            except NotifyError as exc:
                error = str(exc)
            except Exception as exc:  # a bug in a transport must not end the worker
                log.exception("notice_error", what=what, user=notice.user)
                error = f"internal error: {exc!r}"
                break
            else:
                return True
            if trio.current_time() + delay > deadline:
                break
            self._retries += 1
            log.warning(
                "notice_retry",
                what=what,
                notice_event=notice.event.value,
                user=notice.user,
                attempt=tries,
                error=error,
                retry_in=delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
        log.error(
            "notice_failed",
            what=what,
            notice_event=notice.event.value,
            user=notice.user,
            attempts=tries,
            error=error,
        )
        return False

    def record_unsent(self, notices: Iterable[Notice], *, in_flight: Notice | None = None) -> None:
        """Log notices left at shutdown, and append them to the journal so nothing is lost.

        Args:
            notices: notices never started.
            in_flight: the notice being delivered when time ran out; only what was still due
                for it (``mail``, ``hook``) is recorded.
        """
        records = []
        left = [(in_flight, list(self._due))] if in_flight is not None else []
        left += [(notice, self.parts(notice)) for notice in notices]
        for notice, parts in left:
            self._unsent += 1
            log.error(
                "notice_unsent", notice_event=notice.event.value, user=notice.user, parts=parts
            )
            records.append(
                {
                    "event": "notice_unsent",
                    "at": _time(self.wall_clock()),
                    "notice_event": notice.event.value,
                    "user": notice.user,
                    "when": _time(notice.when),
                    "reason": notice.reason,
                    "by": notice.by,
                    "parts": parts,
                }
            )
        if records and self.journal is not None:
            try:
                for record in records:
                    self.journal.append(record, durable=True)
            except StoreError as exc:
                log.error("journal_write_failed", path=str(self.journal.path), error=str(exc))


def _default_transport(config: NotifyConfig) -> Transport:
    if isinstance(config.smtp, Path):
        return SmtpTransport(config.smtp, None, config.send_timeout)
    if config.smtp is not None:
        host, port = config.smtp
        return SmtpTransport(host, port, config.send_timeout)
    return SendmailTransport(config.sendmail, config.send_timeout)


async def run_notifier(
    receive_channel: trio.MemoryReceiveChannel[Notice],
    dispatcher: NoticeDispatcher,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver notices from *receive_channel* in order until it is closed and empty.

    After :meth:`NoticeDispatcher.close`, what is still queued gets the grace period; whatever is
    left then (or when this task is cancelled) is recorded as unsent.
    """
    current: Notice | None = None
    dispatcher._running = True  # noqa: SLF001 - the worker half of NoticeDispatcher, kept a function
    task_status.started()
    try:
        with dispatcher.shutdown_scope:
            async for notice in receive_channel:
                current = notice
                await dispatcher.deliver(notice)
                current = None
    finally:
        queued: list[Notice] = []
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                queued.append(receive_channel.receive_nowait())
        receive_channel.close()
        dispatcher.record_unsent(queued, in_flight=current)
        dispatcher._finished.set()  # noqa: SLF001
