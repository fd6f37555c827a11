"""The notice queue: abuse notices and hook runs, delivered in order, off the query path.

The effects executor hands each notice to :meth:`NoticeQueue.submit`, which only puts it on a
bounded queue (``send_nowait``): a verdict never waits for a mail. One worker,
:meth:`NoticeQueue.run`, takes notices off the queue in order (a hook sees a block before the
unblock that follows it), mails them and runs the hook, retrying failures with backoff for a
bounded time.

Invariants:

1. Every notice accepted by :meth:`NoticeQueue.submit` ends as exactly one of: delivered
   (``sent``), given up after its retry budget (``failed``, logged ``notice_failed``), or left at
   shutdown (``unsent``, logged and journaled). A notice refused by a full queue is ``dropped``,
   logged ``notice_dropped`` and journaled too: nothing owed to the abuse desk is lost silently.
2. :meth:`NoticeQueue.submit` never waits and never raises.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import structlog
import trio

from spamguardd.core.config import NotifyConfig
from spamguardd.core.errors import NotifyError
from spamguardd.core.notice import Notice, NoticeEvent, build_message
from spamguardd.core.statistics import NoticeStatistics
from spamguardd.core.timestamps import format_time
from spamguardd.daemon.transports import HookCommand, Transport, default_transport

log = structlog.get_logger("spamguardd.daemon.notices")

#: First wait after a failed attempt; it doubles per attempt up to MAX_BACKOFF. A relay that is
#: restarting is back within seconds; one that is down for longer is not helped by hammering it.
INITIAL_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 60.0

#: Where the queue writes what it could not deliver: one journal entry, never waiting.
Record = Callable[[Mapping[str, Any]], None]


class NoticeQueue:
    """The notice queue, its delivery worker with retries, and its counters.

    Args:
        config: the ``[notify]`` section.
        record: journals an entry for a notice dropped or left unsent (default: nowhere).
        transport: how mail leaves (default: the one ``config`` names).
        wall_clock: the wall clock, for the journal's times.
    """

    def __init__(
        self,
        config: NotifyConfig,
        *,
        record: Record | None = None,
        transport: Transport | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.record = record
        self.wall_clock = wall_clock
        self.sender = config.sender or f"spamguardd@{platform.node() or 'localhost'}"
        self.transport = transport or default_transport(config)
        self.hook = HookCommand(config.hook, config.hook_timeout) if config.hook else None
        self._send, self._receive = trio.open_memory_channel[Notice](config.queue_size)
        #: Cancelled at the end of the shutdown grace period (see :meth:`close`).
        self._shutdown_scope = trio.CancelScope()
        self._running = False
        self._finished = trio.Event()
        #: What is still to do for the notice being delivered (see :meth:`_record_left`).
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

    # -- producer side (the effects executor, on the query path) --------------------------------

    def submit(self, notice: Notice) -> bool:
        """Queue *notice* without waiting; False (logged, journaled) when it had to be dropped."""
        if not self.enabled:
            return False
        try:
            if notice.event is NoticeEvent.WARNING and self._half_full():
                # a wave of warnings must not crowd out the blocks' notices and hooks
                reason = "queue half full: the rest is kept for blocks"
            else:
                self._send.send_nowait(notice)
                self._queued += 1
                return True
        except trio.WouldBlock:
            reason = "queue full"
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            reason = "shutting down"
        self._dropped += 1
        log.error(
            "notice_dropped", notice_event=notice.event.value, user=notice.user, reason=reason
        )
        self._journal("notice_dropped", notice, self.parts(notice), dropped_because=reason)
        return False

    def _half_full(self) -> bool:
        return 2 * self._send.statistics().current_buffer_used >= self.config.queue_size

    def close(self) -> None:
        """Take no more notices; the worker gets ``shutdown_grace`` seconds for the queued ones."""
        self._send.close()
        self._shutdown_scope.deadline = min(
            self._shutdown_scope.deadline, trio.current_time() + self.config.shutdown_grace
        )

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the worker (if running) has finished or given up."""
        self.close()
        if self._running:
            await self._finished.wait()

    # -- consumer side --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued notices in order until the queue is closed and empty.

        After :meth:`close`, what is still queued gets the grace period; whatever is left then
        (or when this task is cancelled) is recorded as unsent.
        """
        current: Notice | None = None
        self._running = True
        task_status.started()
        try:
            with self._shutdown_scope:
                async for notice in self._receive:
                    current = notice
                    await self.deliver(notice)
                    current = None
        finally:
            queued: list[Notice] = []
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    queued.append(self._receive.receive_nowait())
            self._receive.close()
            self._record_left(queued, in_flight=current)
            self._finished.set()

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

    def _record_left(self, notices: Iterable[Notice], *, in_flight: Notice | None) -> None:
        """Log and journal the notices left at shutdown.

        Args:
            notices: notices never started.
            in_flight: the notice being delivered when time ran out; only what was still due
                for it (``mail``, ``hook``) is recorded.
        """
        left = [(in_flight, list(self._due))] if in_flight is not None else []
        left += [(notice, self.parts(notice)) for notice in notices]
        for notice, parts in left:
            self._unsent += 1
            log.error(
                "notice_unsent", notice_event=notice.event.value, user=notice.user, parts=parts
            )
            self._journal("notice_unsent", notice, parts)

    def _journal(self, event: str, notice: Notice, parts: list[str], **extra: str) -> None:
        if self.record is None:
            return
        self.record(
            {
                "event": event,
                "at": format_time(self.wall_clock()),
                "notice_event": notice.event.value,
                "user": notice.user,
                "when": format_time(notice.when),
                "reason": notice.reason,
                "by": notice.by,
                "parts": parts,
                **extra,
            }
        )
