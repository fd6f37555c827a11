"""Writes journal entries off the event loop, in batches, in the order they were recorded.

:meth:`JournalWriter.record` only appends to a list (the query path may call it); the worker,
:meth:`JournalWriter.run`, writes whatever has gathered in one append and one fsync, in a
worker thread. An admin command that must report its change journaled awaits
:meth:`JournalWriter.wait_written`.

Invariants:

1. Entries reach the file in the order they were recorded.
2. Every recorded entry ends as written, or as failed (logged ``journal_write_failed`` and
   counted): the journal is history, and the block file stays the authority on who is blocked.
3. The backlog is bounded (:data:`MAX_BACKLOG`); past it entries are counted as failed, so a
   stuck disk cannot grow the daemon's memory without bound.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

import structlog
import trio

from spamguardd.core.errors import StoreError
from spamguardd.state.journal import Journal

log = structlog.get_logger("spamguardd.daemon.journal_writer")

#: Entries waiting to be written at most: a storm of a hundred thousand blocks, about 30 MB.
MAX_BACKLOG: Final = 100_000


class JournalWriter:
    """The journal's one writer. See the module docstring."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._pending: list[Mapping[str, Any]] = []
        self._recorded = 0
        self._done = 0
        self.failures = 0
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._lock = trio.Lock()

    def record(self, entry: Mapping[str, Any]) -> None:
        """Queue *entry* for the journal. Never waits, never raises."""
        self._recorded += 1
        if len(self._pending) >= MAX_BACKLOG:
            self._failed(1, f"more than {MAX_BACKLOG} entries waiting for the disk")
            return
        self._pending.append(entry)
        self._wakeup.set()

    async def wait_written(self) -> None:
        """Return once every entry recorded so far is written (or has failed)."""
        target = self._recorded
        while self._done < target:
            await self._progress.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write recorded entries as they come, until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write everything recorded so far (the daemon calls this last at shutdown)."""
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, []
                append = functools.partial(self.journal.append_many, batch, durable=True)
                try:
                    # not abandoned on cancel: an entry is written whole or reported failed
                    await trio.to_thread.run_sync(append)
                except StoreError as exc:
                    self._failed(len(batch), str(exc))
                else:
                    self._finished(len(batch))

    def _failed(self, count: int, error: str) -> None:
        self.failures += count
        log.error("journal_write_failed", entries=count, error=error)
        self._finished(count)

    def _finished(self, count: int) -> None:
        self._done += count
        self._progress.set()
        self._progress = trio.Event()
