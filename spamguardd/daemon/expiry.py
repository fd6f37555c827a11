"""Lifting blocks whose time is up, and saving the history escalation counts.

One task sleeps until the policy's next expiry (the top of a heap: nothing walks the block
list) or until an effect wakes it (a new block may expire sooner; a new automatic block or a
reset changed the history). A lift is an unblock like an admin's, carried out by the
:class:`~spamguardd.daemon.effects.EffectExecutor`: logged (``user_unblocked by=expiry``),
counted, journaled, notified when unblocks are, and the block file rewritten so Exim sees it.
Blocks that expired while the daemon was down are lifted when it starts, before it serves.

Expiry times are wall-clock; the task sleeps on trio's clock for the difference, and never
longer than :data:`MAX_SLEEP`, so a wall clock that is set forward is noticed within that.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Final

import structlog
import trio

from spamguardd.core.errors import StoreError
from spamguardd.core.expiry import expires, format_steps
from spamguardd.core.policy import Policy
from spamguardd.core.statistics import ExpiryStatistics
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.state.repeats import RepeatStore

log = structlog.get_logger("spamguardd.daemon.expiry")

#: The longest sleep between two looks at the next expiry, in seconds.
MAX_SLEEP: Final = 60.0
#: Seconds before a history that could not be written is tried again.
RETRY_SAVE: Final = 10.0


class ExpiryKeeper:
    """Lifts due blocks on time and keeps the repeat history on disk. See the module docstring."""

    def __init__(
        self,
        policy: Policy,
        effects: EffectExecutor,
        store: RepeatStore,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.effects = effects
        self.store = store
        self.wall_clock = wall_clock
        self._wake = trio.Event()
        self._saved_version = policy.repeats.version
        self._save_lock = trio.Lock()
        #: Blocks lifted because their time was up, since the start.
        self.lifted = 0
        self.save_failures = 0
        self._lifting = 0
        effects.on_change = self.wake

    @property
    def settled(self) -> bool:
        """Whether no lift is being made durable and the history on disk is current."""
        return not self._lifting and self.policy.repeats.version == self._saved_version

    def statistics(self) -> ExpiryStatistics | None:
        """The expiry's counters for ``stats``; None when no block can expire by the rules."""
        config = self.policy.config
        if not expires(config.expire) and self.policy.next_expiry() is None:
            return None
        return ExpiryStatistics(
            steps=format_steps(config.expire),
            repeat_within=config.repeat_within,
            lifted=self.lifted,
            repeat_users=len(self.policy.repeats),
            next_at=self.policy.next_expiry(),
        )

    def wake(self) -> None:
        """Look again at the next expiry and the history now (never waits)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lift what expired while the daemon was down, report started, then keep lifting."""
        await self.lift_due()
        task_status.started()
        while True:
            await self.save()
            delay = MAX_SLEEP
            if self.policy.repeats.version != self._saved_version:
                delay = RETRY_SAVE
            upcoming = self.policy.next_expiry()
            if upcoming is not None:
                delay = min(delay, max(0.0, upcoming - self.wall_clock()))
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.lift_due()

    async def lift_due(self) -> int:
        """Lift every block due now, through the effects executor; how many were lifted."""
        change = self.policy.expire_due(self.wall_clock())
        if not change.effects:
            return 0
        self.lifted += len(change.effects)
        self._lifting += 1
        # a failed write is logged by the executor; the lift holds and the next write retries
        try:
            with contextlib.suppress(StoreError):
                await self.effects.apply(change)
        finally:
            self._lifting -= 1
        return len(change.effects)

    async def save(self) -> None:
        """Write the repeat history if it changed since the last write; a failure is logged
        (``repeat_history_not_saved``) and tried again later."""
        async with self._save_lock:
            version = self.policy.repeats.version
            if version == self._saved_version:
                return
            config = self.policy.config
            history = self.policy.repeats.recent(now=self.wall_clock(), within=config.repeat_within)
            try:
                await trio.to_thread.run_sync(self.store.save, history)
            except StoreError as exc:
                self.save_failures += 1
                log.error("repeat_history_not_saved", error=str(exc))
                return
            self._saved_version = version
