"""The counters' life in the daemon: loading the snapshot while serving, incremental snapshots,
compaction, and the idle sweep, all in slices of about a millisecond between queries.

Nothing here ever takes the daemon down: a snapshot that cannot be read, decoded or written is
logged, and the daemon goes on serving (counters are worth keeping, not worth refusing to
serve for; the block list is what must be right).

Loading runs while the daemon already answers. A user asked about before its saved counters are
loaded is counted from full buckets; when its record arrives the two are added up
(:meth:`Policy.restore_state`), so nothing is forgiven. The garbage collector is held off while
the records are staged, and what survives the load is frozen (``gc.freeze``): later full
collections do not walk it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Final

import structlog
import trio
import trio.lowlevel

from spamguardd.core import buckets
from spamguardd.core.counters import SHARDS
from spamguardd.core.errors import StoreError
from spamguardd.core.policy import Policy
from spamguardd.state.snapshot import SnapshotStore
from spamguardd.state.snapshot_format import (
    KeyNotWritableError,
    Kind,
    Problem,
    Record,
    encode_record,
)

log = structlog.get_logger("spamguardd.daemon.counters")

#: Seconds of work between two yields to the query path.
SLICE: Final = 0.001
#: Seconds of rest after each slice: background work takes at most half a core ...
REST: Final = 0.001
#: ... and loading the snapshot two thirds.
LOAD_REST: Final = 0.0005
#: How often the sweep looks for users that went idle.
SWEEP_INTERVAL: Final = 60.0
#: Users in one batch of a compaction (a batch never crosses a yield).
COMPACTION_BATCH: Final = 200
#: Bytes gathered before a compaction writes them out.
WRITE_CHUNK: Final = 1 << 20


class _Slicer:
    """Yields to other tasks once a slice of work has taken :data:`SLICE` seconds, and rests.

    The rest matters on a shared machine: a process that never blocks is, to the kernel's
    scheduler, a CPU hog, and a query arriving while it is preempted waits for its next turn
    (tens of milliseconds on two busy cores). Resting between slices keeps the daemon a
    process that sleeps, which the scheduler runs promptly when a query wakes it.
    """

    def __init__(self, *, enabled: bool = True, rest: float = REST) -> None:
        self.enabled = enabled
        self.rest = rest
        self._began = time.perf_counter()

    async def pause(self) -> None:
        if self.enabled and time.perf_counter() - self._began >= SLICE:
            await trio.sleep(self.rest)
            self._began = time.perf_counter()


class _Staged:
    """The last record of each user read so far, cut into dictionaries like the policy's
    table (one dictionary of a million would stall the loop each time it grows)."""

    def __init__(self) -> None:
        self._shards: list[dict[str, Record | None]] = [{} for _ in range(SHARDS)]

    def _shard(self, user: str) -> dict[str, Record | None]:
        return self._shards[hash(user) & (SHARDS - 1)]

    def __contains__(self, user: str) -> bool:
        return user in self._shard(user)

    def get(self, user: str) -> Record | None:
        return self._shard(user).get(user)

    def put(self, user: str, record: Record | None) -> None:
        self._shard(user)[user] = record

    def drain(self) -> Iterator[tuple[str, Record | None]]:
        """Every user and its record, each taken out as it is handed over."""
        for shard in self._shards:
            while shard:
                yield shard.popitem()


class CounterKeeper:
    """Loads, snapshots, compacts and sweeps the policy's counters."""

    def __init__(
        self,
        policy: Policy,
        store: SnapshotStore,
        *,
        wall_clock: Callable[[], float],
        interval: Callable[[], float],
    ) -> None:
        self.policy = policy
        self.store = store
        self.wall_clock = wall_clock
        self.interval = interval
        #: Set once the snapshot is loaded; snapshots and compaction wait for it.
        self.loaded = trio.Event()
        self._reading = True
        self._staged = _Staged()
        self.snapshots = 0
        self._scope = trio.CancelScope()
        self._started = False
        self._done = trio.Event()

    # -- loading ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the snapshot files and take their users over, in slices. Never raises."""
        began = time.perf_counter()
        was_enabled = gc.isenabled()
        gc.disable()
        files = problems = 0
        try:
            files, problems = await self._stage()
            self._reading = False
            restored, skipped = await self._apply()
        except Exception:
            log.exception("snapshot_load_failed", action="serving with the counters loaded so far")
            restored = skipped = 0
            self._reading = False
            self._staged = _Staged()
        finally:
            # cancelled part way (a stop): _reading and _staged still say what is not loaded
            gc.freeze()
            if was_enabled:
                gc.enable()
            self.loaded.set()
        if files:
            log.info(
                "snapshot_loaded",
                file=str(self.store.dir),
                files=files,
                users=restored,
                skipped=skipped,
                damaged_records=problems,
                seconds=round(time.perf_counter() - began, 3),
            )

    async def _stage(self) -> tuple[int, int]:
        """Read every file into :attr:`_staged`, the last record of each user."""
        slicer = _Slicer(rest=LOAD_REST)
        staged = self._staged
        files = problems = 0
        for path in self.store.files_to_load():
            data = await trio.to_thread.run_sync(self.store.read, path)
            if data is None:
                continue
            files += 1
            now = trio.current_time()
            items = self.store.decode(path, data, shift=now - self.wall_clock(), latest=now)
            damaged = False
            # one run's merge records are cumulative: within a file the last one counts
            merges: dict[str, Record] = {}
            for item in items:
                if isinstance(item, Problem):
                    damaged = True
                    problems += 1
                    log.error(
                        "snapshot_damaged",
                        problem=item.text,
                        action="record skipped; the others are loaded",
                    )
                elif item.kind is Kind.MERGE:
                    merges[item.user] = item
                else:
                    merges.pop(item.user, None)
                    staged.put(item.user, item if item.kind is Kind.STATE else None)
                await slicer.pause()
            for user, record in merges.items():
                staged.put(user, _merged(staged.get(user), record, now))
            if damaged:
                self.store.damaged.add(path)
        return files, problems

    async def _apply(self) -> tuple[int, int]:
        """Hand the staged users to the policy, popping them so the rest stays identifiable."""
        slicer = _Slicer(rest=LOAD_REST)
        staged = self._staged
        restored = skipped = 0
        for user, record in staged.drain():
            if record is not None and record.state is not None:
                now = trio.current_time()
                if self.policy.restore_state(user, record.rates, record.state, now):
                    restored += 1
                else:
                    skipped += 1
            await slicer.pause()
        return restored, skipped

    # -- snapshots --------------------------------------------------------------------------

    async def snapshot(self, *, sliced: bool = True) -> int:
        """Append the users changed since the last snapshot. Never raises.

        Returns:
            How many records were written.
        """
        written = 0
        with trio.CancelScope(shield=True):  # a stop waits: the taken users must be written
            written = await self._snapshot(sliced=sliced)
        return written  # noqa: RET504 - a return inside the scope reads as maybe-skipped to mypy

    async def _snapshot(self, *, sliced: bool) -> int:
        changed = self.policy.take_changed()
        if not changed:
            return 0
        slicer = _Slicer(enabled=sliced)
        began = time.perf_counter()
        now = trio.current_time()
        shift = self.wall_clock() - now
        records = []
        for user in changed:
            # while the files are not all loaded, what a user counted since the start must be
            # added to its saved counters at the next load, not replace them
            pending = self._reading or user in self._staged
            record = self._encode(user, now, shift, merge=pending)
            if record is not None:
                records.append(record)
            await slicer.pause()
        data = b"".join(records)
        try:
            await trio.to_thread.run_sync(self.store.append, data)
        except StoreError as exc:
            self.policy.mark_changed(changed)  # tried again next time
            log.error("snapshot_failed", error=str(exc))
            return 0
        self.snapshots += 1
        log.info(
            "snapshot_written",
            users=len(records),
            bytes=len(data),
            seconds=round(time.perf_counter() - began, 3),
        )
        return len(records)

    def _encode(self, user: str, now: float, shift: float, *, merge: bool) -> bytes | None:
        form = self.policy.saved_form(user)
        try:
            if form is None:
                return encode_record(Kind.FORGET, user)
            rates, state = form
            values = buckets.export(state, rates, now, shift)
            return encode_record(Kind.MERGE if merge else Kind.STATE, user, rates, values)
        except (KeyNotWritableError, ValueError) as exc:
            log.error(
                "snapshot_user_skipped",
                user=user.encode("utf-8", "backslashreplace").decode("ascii", "replace"),
                error=str(exc),
            )
            return None

    async def compact(self) -> None:
        """Write every counted user to a new base and drop the files it replaces. Never raises."""
        began = time.perf_counter()
        try:
            base = await trio.to_thread.run_sync(self.store.start_base)
        except StoreError as exc:
            log.error("snapshot_compaction_failed", error=str(exc))
            return
        slicer = _Slicer()
        users = 0
        try:
            now = trio.current_time()
            shift = self.wall_clock() - now
            chunk: list[bytes] = []
            size = 0
            for batch in self.policy.compaction_batches(COMPACTION_BATCH):
                for user in batch:
                    record = self._encode(user, now, shift, merge=False)
                    if record is not None:
                        chunk.append(record)
                        size += len(record)
                        users += 1
                if size >= WRITE_CHUNK:
                    await trio.to_thread.run_sync(base.write, b"".join(chunk))
                    chunk, size = [], 0
                await slicer.pause()
            await trio.to_thread.run_sync(base.write, b"".join(chunk))
            await trio.to_thread.run_sync(base.commit)
        except StoreError as exc:
            base.abort()
            log.error("snapshot_compaction_failed", error=str(exc))
            return
        except BaseException:
            base.abort()
            raise
        log.info(
            "snapshot_compacted",
            file=str(base.path),
            users=users,
            bytes=base.size,
            seconds=round(time.perf_counter() - began, 3),
        )

    async def save_final(self) -> None:
        """The snapshot at a clean stop: only what changed since the last one."""
        began = time.perf_counter()
        written = await self.snapshot(sliced=False)
        self.store.close()
        log.info(
            "snapshot_saved",
            file=str(self.store.dir),
            users=written,
            seconds=round(time.perf_counter() - began, 3),
        )

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, then snapshot every interval, compact when due, and sweep idle users."""
        self._started = True
        task_status.started()
        try:
            with self._scope:
                await self._run()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop :meth:`run` and wait until no write of it is under way."""
        self._scope.cancel()
        if self._started:
            await self._done.wait()

    async def _run(self) -> None:
        next_snapshot = trio.current_time() + self.interval()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.load)
            # snapshots go on while a large snapshot loads (merge records), on the same
            # schedule: a crash meanwhile must not lose more than one interval of counting
            while not self.loaded.is_set():
                with trio.move_on_at(next_snapshot):
                    await self.loaded.wait()
                if trio.current_time() >= next_snapshot:
                    await self.snapshot()
                    next_snapshot = trio.current_time() + self.interval()
        if self.store.wants_compaction():
            await self.compact()
        next_sweep = trio.current_time() + SWEEP_INTERVAL
        while True:
            await trio.sleep_until(min(next_snapshot, next_sweep))
            now = trio.current_time()
            if now >= next_snapshot:
                await self.snapshot()
                if self.store.wants_compaction():
                    await self.compact()
                next_snapshot = trio.current_time() + self.interval()
            if now >= next_sweep:
                await self.sweep()
                next_sweep = trio.current_time() + SWEEP_INTERVAL

    async def sweep(self) -> int:
        """Forget the users that went idle, a slice at a time."""
        forgotten = 0
        with trio.CancelScope(shield=True):  # the due slots are taken: finish them
            forgotten = await self._sweep()
        return forgotten  # noqa: RET504 - as in snapshot()

    async def _sweep(self) -> int:
        slicer = _Slicer()
        began = time.perf_counter()
        forgotten = 0
        for slot, users in self.policy.take_due(trio.current_time()):
            for start in range(0, len(users), COMPACTION_BATCH):
                batch = users[start : start + COMPACTION_BATCH]
                forgotten += self.policy.sweep(trio.current_time(), slot, batch)
                await slicer.pause()
        if forgotten:
            log.info(
                "users_forgotten",
                count=forgotten,
                tracked=self.policy.statistics().tracked_users,
                seconds=round(time.perf_counter() - began, 3),
            )
        return forgotten


def _merged(before: Record | None, record: Record, now: float) -> Record:
    """*record* (counted from full buckets) added to the staged *before*."""
    if before is None or before.state is None or record.state is None:
        return record
    state = record.state
    if record.rates != before.rates:
        state = buckets.remap(
            state, record.rates, before.rates, now, buckets.recent_limit(before.rates)
        )
    buckets.merge(before.state, state, before.rates, now, buckets.recent_limit(before.rates))
    return before
