"""How a notice leaves: a sendmail program, an SMTP relay, and the hook command.

Nothing user-controlled ever passes through a shell: sendmail and the hook get argv lists, and
the user key is one argv entry of its own. Each attempt is bounded by a timeout (a child process
is killed at it); a failure is a :class:`NotifyError` that the notice queue retries.
"""

from __future__ import annotations

import contextlib
import os
import platform
import smtplib
import subprocess
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Final, Protocol

import attrs
import structlog
import trio

from spamguardd.core.config import NotifyConfig
from spamguardd.core.errors import NotifyError
from spamguardd.core.notice import Notice
from spamguardd.daemon.smtp_socket import UnixSocketSMTP

log = structlog.get_logger("spamguardd.daemon.transports")

#: stderr kept from sendmail or a hook for the log (a chatty program must not flood it).
STDERR_LIMIT: Final = 2000


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
        with time_limit(self.timeout, self.argv[0]):
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
        with time_limit(self.timeout, f"SMTP {self._where}"):
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
        with time_limit(self.timeout, f"hook {self.argv[0]}"):
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
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Cancel the block after *seconds* (a child process is killed) and say so as NotifyError."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise NotifyError(f"{what} did not finish within {seconds:g}s; given up") from None


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or b"")[:STDERR_LIMIT].decode("utf-8", "backslashreplace")
    return text.strip()


def default_transport(config: NotifyConfig) -> Transport:
    """The transport ``[notify]`` names: the SMTP relay or socket when set, else sendmail."""
    if isinstance(config.smtp, Path):
        return SmtpTransport(config.smtp, None, config.send_timeout)
    if config.smtp is not None:
        host, port = config.smtp
        return SmtpTransport(host, port, config.send_timeout)
    return SendmailTransport(config.sendmail, config.send_timeout)
