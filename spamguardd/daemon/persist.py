"""Make the policy's block list durable before a block verdict goes out, with group commit.

The policy changes its block list in memory (pure code, instantly); a reply that depends on a
block waits here until the store holds at least that generation. The effects executor names each
user whose block changed (:meth:`BlockPersister.changed`); a write takes every user named since
the last one and writes only those (``state/blockfile``: an append or a one-byte kill each), so
a burst of blocks costs one or two fsyncs and a block costs the same with ten or a million users
blocked. The write runs in a worker thread and is not abandoned when its caller is cancelled: a
shutdown never leaves a half-decided block behind.

When the disk refuses (full, read-only, out of descriptors), the blocks stay in force in memory,
every caller is told at once (no query waits for a disk that is failing; the server answers
``defer`` meanwhile), the failure is logged, counted and reported through :attr:`on_state`, and
:meth:`run` retries with backoff (:data:`RETRY_MIN` doubling to :data:`RETRY_MAX`) until the
write succeeds. :meth:`close` makes a last attempt at shutdown and logs every user it could not
save.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import structlog
import trio

from spamguardd.core.errors import StoreError
from spamguardd.core.policy import Block, Policy
from spamguardd.state.blockfile import BlockStore

log = structlog.get_logger("spamguardd.daemon.persist")

#: First retry after a failed write, in seconds; doubled after every failure up to RETRY_MAX.
RETRY_MIN = 0.5
RETRY_MAX = 30.0


class BlockPersister:
    """Tracks which block-list generation is on disk and writes newer ones on demand."""

    def __init__(
        self,
        policy: Policy,
        store: BlockStore,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._store = store
        self._wall_clock = wall_clock
        #: The block list as loaded at start is on disk by definition.
        self.durable_generation = policy.generation
        self.writes = 0
        #: Writes that failed since the start.
        self.write_failures = 0
        #: Compactions of the block file that failed (the file stays as it was, and correct).
        self.compaction_failures = 0
        #: The error of the last failed write while writes fail; None while they succeed.
        self.last_error: str | None = None
        #: Wall-clock time writes began to fail; None while they succeed.
        self.failing_since: float | None = None
        #: Called with the error when writes begin to fail, and with None when one succeeds again.
        self.on_state: Callable[[str | None], None] = lambda _error: None
        #: The backoff between retries, in seconds.
        self.retry_min = RETRY_MIN
        self.retry_max = RETRY_MAX
        self._dirty: set[str] = set()
        self._lock = trio.Lock()
        self._delay = RETRY_MIN
        self._retry_at = -math.inf
        self._failing = trio.Event()

    @property
    def pending(self) -> int:
        """Users whose block or unblock is not on disk yet."""
        return len(self._dirty)

    def changed(self, user: str) -> None:
        """*user*'s block changed in the policy: the next write saves it. Never waits."""
        self._dirty.add(user)

    async def wait_durable(self, generation: int) -> None:
        """Return once the store holds block-list *generation* or a later one.

        Raises:
            StoreError: the write failed, now or in the last attempt (while writes fail, no
                caller waits for the next retry). The block stays in force in memory.
        """
        if self.durable_generation >= generation:
            return
        await self._write(generation)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Retry failed writes with backoff until cancelled."""
        task_status.started()
        while True:
            await self._failing.wait()
            await trio.sleep_until(self._retry_at)
            with contextlib.suppress(StoreError):  # logged; the next retry is scheduled
                await self._write(self._policy.generation, retry=True)

    async def close(self) -> None:
        """A last write at shutdown, whatever the backoff; log every user it could not save.
        A block file removed by hand meanwhile is written again, or the next start would find
        nobody blocked."""
        try:
            await self._write(self._policy.generation, retry=True)
            if await trio.to_thread.run_sync(self._store.restore_if_gone):
                _said_restored(self._store)
        except StoreError as exc:
            log.critical(
                "blocks_not_saved_at_shutdown",
                error=str(exc),
                users=sorted(self._dirty),
                action="they are lost at exit; block them again once the state directory "
                "can be written",
            )
        self._store.close()

    async def _write(self, generation: int, *, retry: bool = False) -> None:
        async with self._lock:
            if self.durable_generation >= generation:
                return  # a write made while we waited already covered us
            if self.last_error is not None and not retry and trio.current_time() < self._retry_at:
                raise StoreError(f"the block list is not on disk yet: {self.last_error}")
            current = self._policy.generation
            changes = self._take_changes()
            restored = self._store.restorations
            try:
                await trio.to_thread.run_sync(self._store.apply, changes)
            except StoreError as exc:
                self._dirty.update(user for user, _ in changes)
                self._failed(exc)
                raise
            self.durable_generation = current
            self.writes += 1
            if self._store.restorations != restored:
                _said_restored(self._store)
            if self.last_error is not None:
                self._recovered()
            if self._store.wants_compaction():
                await self._compact()

    def _take_changes(self) -> list[tuple[str, Block | None]]:
        """The named users with their current blocks; every user when the count does not add
        up (a change that was not named), so that nothing is ever left out."""
        blocks = self._policy.blocks
        store = self._store
        users = self._dirty
        live = store.live_lines
        for user in users:
            live += (user in blocks) - (store.on_disk(user) is not None)
        if live != len(blocks):
            users = users | set(blocks) | set(store.users())
        self._dirty = set()
        return [(user, blocks.get(user)) for user in users]

    def _failed(self, exc: StoreError) -> None:
        self.write_failures += 1
        first = self.last_error is None
        self.last_error = str(exc)
        now = trio.current_time()
        if first:
            self.failing_since = self._wall_clock()
            self._delay = self.retry_min
        else:
            self._delay = min(self._delay * 2, self.retry_max)
        self._retry_at = now + self._delay
        log.error(
            "block_not_persisted",
            error=str(exc),
            pending_users=len(self._dirty),
            retry_in=self._delay,
            verdict="defer until it is on disk",
        )
        if first:
            self._failing.set()
            self.on_state(self.last_error)

    def _recovered(self) -> None:
        log.warning(
            "block_persisted_again",
            failed_for=round(self._wall_clock() - (self.failing_since or self._wall_clock()), 3),
        )
        self.last_error = None
        self.failing_since = None
        self._delay = self.retry_min
        self._retry_at = -math.inf
        self._failing = trio.Event()
        self.on_state(None)

    async def _compact(self) -> None:
        try:
            await trio.to_thread.run_sync(self._store.compact)
        except StoreError as exc:
            self.compaction_failures += 1
            log.error("block_file_compaction_failed", error=str(exc))


def _said_restored(store: BlockStore) -> None:
    log.warning(
        "block_file_restored",
        path=str(store.path),
        users=store.live_lines,
        reason="the file was removed or replaced while the daemon ran; written again from the "
        "blocks in force (to change the block list, use spamguardctl)",
    )
