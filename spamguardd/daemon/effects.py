"""The one place where "a block, an unblock, a reset happened" is carried out.

The policy only returns effects (:class:`~spamguardd.core.policy.Decision` for a query,
:class:`~spamguardd.core.policy.Change` for an admin's command); :class:`EffectExecutor` carries
out each the same way, whoever made it: it logs it, counts it, journals it (off the event loop),
queues its notice, and makes the block list durable before the change is reported done.

Invariants:

1. :meth:`EffectExecutor.carry_out` never waits and never raises: the query path calls it.
2. A block-list change is reported done (a block verdict sent, an admin answered) only after
   :meth:`EffectExecutor.wait_durable` for its generation has returned, or has said why not.
3. A change made on another relay of a fleet (``relay=``) is logged, journaled and made durable
   here like any other, but sends no notice: the relay that made it sent that one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import structlog

from spamguardd.core.errors import StoreError
from spamguardd.core.notice import Notice
from spamguardd.core.policy import (
    Blocked,
    Change,
    Effect,
    Policy,
    Reset,
    Unblocked,
    Warned,
    WouldBlock,
)
from spamguardd.core.statistics import EffectStatistics
from spamguardd.core.timestamps import format_time
from spamguardd.daemon.journal_writer import JournalWriter
from spamguardd.daemon.notices import NoticeQueue
from spamguardd.daemon.persist import BlockPersister
from spamguardd.state.journal import entry_for

log = structlog.get_logger("spamguardd.daemon.effects")


class EffectExecutor:
    """Carries out the policy's effects for one daemon. See the module docstring."""

    def __init__(
        self,
        policy: Policy,
        persister: BlockPersister,
        journal: JournalWriter,
        notices: NoticeQueue,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.persister = persister
        self.journal = journal
        self.notices = notices
        self.wall_clock = wall_clock
        self._auto_blocks = self._admin_blocks = self._unblocks = self._resets = 0
        self._would_blocks = self._store_failures = 0
        self._warnings = self._volume_blocks = 0
        #: Called after effects are carried out (never waits): the expiry keeper's wake-up.
        self.on_change: Callable[[], None] | None = None

    def statistics(self) -> EffectStatistics:
        """Current counters."""
        return EffectStatistics(
            auto_blocks=self._auto_blocks,
            admin_blocks=self._admin_blocks,
            unblocks=self._unblocks,
            resets=self._resets,
            would_blocks=self._would_blocks,
            store_failures=self._store_failures,
            journal_failures=self.journal.failures,
            unsaved_users=self.persister.pending,
            store_error=self.persister.last_error,
            store_failing_since=self.persister.failing_since,
            warnings=self._warnings,
            volume_blocks=self._volume_blocks,
        )

    def carry_out(self, effects: Sequence[Effect], *, relay: str | None = None) -> None:
        """Log, count, journal and notify each effect. Never waits, never raises.

        With *relay*, the effects were made on that relay of the fleet: they are logged and
        journaled with its name, counted apart, and not notified again.
        """
        verdict = self.policy.config.verdict
        for effect in effects:
            if isinstance(effect, (Blocked, Unblocked)):
                self.persister.changed(effect.block.user)
            entry = entry_for(effect)
            if relay is not None:
                self._log_remote(effect, relay)
                if entry is not None:
                    self.journal.record({**entry, "relay": relay})
                continue
            self._log_and_count(effect)
            if entry is not None:
                self.journal.record(entry)
            notice = Notice.from_effect(effect, verdict=verdict, when=self.wall_clock())
            if notice is not None:
                self.notices.submit(notice)
        if effects and self.on_change is not None:
            self.on_change()

    async def wait_durable(self, generation: int) -> None:
        """Return once the block list of *generation* (or a later one) is on disk.

        Raises:
            StoreError: it could not be written (counted here, logged by the persister); the
                change holds in memory and the persister retries with backoff.
        """
        try:
            await self.persister.wait_durable(generation)
        except StoreError:
            self._store_failures += 1  # the persister logs each failed write, not each waiter
            raise

    async def apply(self, change: Change, *, relay: str | None = None) -> None:
        """Carry out *change* (an admin's, or one made on *relay*): its effects, then its block
        list and journal on disk.

        Raises:
            StoreError: the block list could not be written; the change holds in memory.
        """
        self.carry_out(change.effects, relay=relay)
        try:
            if change.needs_generation is not None:
                await self.wait_durable(change.needs_generation)
        finally:
            await self.journal.wait_written()

    def _log_remote(self, effect: Effect, relay: str) -> None:
        if isinstance(effect, Blocked):
            block = effect.block
            log.warning(
                "user_blocked",
                user=block.user,
                reason=block.reason,
                by=block.by,
                relay=relay,
                verdict=str(self.policy.config.verdict),
                blocked_at=format_time(block.blocked_at),
            )
        elif isinstance(effect, Unblocked):
            log.warning("user_unblocked", user=effect.block.user, by=effect.by, relay=relay)
        elif isinstance(effect, Reset):
            log.info("user_reset", user=effect.user, by=effect.by, relay=relay)

    def _log_and_count(self, effect: Effect) -> None:
        if isinstance(effect, Blocked):
            block = effect.block
            fields = {"limit": str(effect.rate)} if effect.rate is not None else {}
            log.warning(
                "user_blocked",
                user=block.user,
                reason=block.reason,
                by=block.by,
                **fields,
                verdict=str(self.policy.config.verdict),
                blocked_at=format_time(block.blocked_at),
            )
            if effect.rate is None:
                self._admin_blocks += 1
            else:
                self._auto_blocks += 1
                self._volume_blocks += effect.counted != "failed recipients"
        elif isinstance(effect, WouldBlock):
            self._would_blocks += 1
            log.warning("user_would_block", user=effect.user, limit=str(effect.rate))
        elif isinstance(effect, Warned):
            self._warnings += 1
            log.warning("user_warned", user=effect.user, limit=str(effect.rate), used=effect.used)
        elif isinstance(effect, Unblocked):
            self._unblocks += 1
            log.warning("user_unblocked", user=effect.block.user, by=effect.by)
        elif isinstance(effect, Reset):
            self._resets += 1
            log.info("user_reset", user=effect.user, by=effect.by)
