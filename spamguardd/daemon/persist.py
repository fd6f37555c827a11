"""Make the policy's block list durable before a block verdict goes out, with group commit.

The policy changes its block list in memory (pure code, instantly); a reply that depends on a
block waits here until the store holds at least that generation. Writers queue on one lock, and
each write saves the whole current list, so a burst of blocks costs one or two fsyncs, not one
each. The write runs in a worker thread and is not abandoned when its caller is cancelled: a
shutdown never leaves a half-decided block behind.
"""

from __future__ import annotations

import trio

from spamguardd.core.policy import Policy
from spamguardd.state.blockfile import BlockStore


class BlockPersister:
    """Tracks which block-list generation is on disk and writes newer ones on demand."""

    def __init__(self, policy: Policy, store: BlockStore) -> None:
        self._policy = policy
        self._store = store
        #: The block list as loaded at start is on disk by definition.
        self.durable_generation = policy.generation
        self.writes = 0
        self._lock = trio.Lock()

    async def wait_durable(self, generation: int) -> None:
        """Return once the store holds block-list *generation* or a later one.

        Raises:
            StoreError: the write failed. The block stays in force in memory; the next call
                tries again.
        """
        if self.durable_generation >= generation:
            return
        async with self._lock:
            if self.durable_generation >= generation:
                return  # a write made while we waited already covered us
            current, blocks = self._policy.snapshot_blocks()
            await trio.to_thread.run_sync(self._store.save, blocks.values())
            self.durable_generation = current
            self.writes += 1
