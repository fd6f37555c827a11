"""The counter snapshot on disk: counters that survive a restart or a crash, written incrementally.

``STATE_DIR/counters/`` holds numbered files of records (:mod:`spamguardd.state.snapshot_format`).
Each snapshot *appends* the records of the users that changed since the one before to the newest
file, a *log*, so its I/O is in proportion to what changed, not to the users counted. Now and
then, once the logs outgrow it, a *compaction* writes a new *base* (every counted user) under
the next number and removes the files before it; the daemon goes on appending to a newer log
meanwhile. Loading reads the newest base and every file after it, in order: a later record of a
user replaces an earlier one.

A crash anywhere leaves a readable snapshot: a base becomes visible only by an atomic rename
once complete, and a log that ends in a torn record loses that record only. Damaged records are
reported and skipped; a file that had any is kept as ``NAME.damaged`` when the compaction that
follows the load replaces it.

The version 1 file (``STATE_DIR/buckets``, :mod:`spamguardd.state.legacy_snapshot`) is read before
the others, once: the first compaction writes its users into a base and removes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

import structlog

from spamguardd.core.errors import StoreError
from spamguardd.state import legacy_snapshot, snapshot_format
from spamguardd.state.snapshot_format import Problem, Record

log = structlog.get_logger("spamguardd.state.snapshot")

DIRNAME: Final = "counters"
#: Compact once the logs hold this much more than the base (and at least this many bytes).
COMPACT_MIN_BYTES: Final = 4 << 20
#: ... or once there are this many files after the base (one more each start).
COMPACT_MAX_FILES: Final = 32
DAMAGED_SUFFIX: Final = ".damaged"


def _number(path: Path) -> int | None:
    name = path.name
    return int(name) if len(name) == 10 and name.isdigit() else None


class BaseWriter:
    """A base being written by a compaction; visible only after :meth:`commit`."""

    def __init__(self, store: SnapshotStore, number: int) -> None:
        self._store = store
        self.number = number
        self.path = store.dir / f"{number:010d}"
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        # 0600 like the logs, whatever the umask: the counters say who sent what, when
        fd = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        self._file: BinaryIO | None = os.fdopen(fd, "wb")  # closed in commit/abort
        self.size = 0
        self.write(snapshot_format.header(base=True))

    def write(self, data: bytes) -> None:
        """Add records.

        Raises:
            StoreError: the write failed (call :meth:`abort`).
        """
        assert self._file is not None  # noqa: S101 - not after commit/abort
        try:
            self._file.write(data)
        except OSError as exc:
            raise StoreError(f"{self._tmp}: cannot write: {exc.strerror}") from exc
        self.size += len(data)

    def commit(self) -> None:
        """Make the base durable and current, and remove the files it replaces.

        Raises:
            StoreError: it could not be made durable; the files before it are intact.
        """
        assert self._file is not None  # noqa: S101 - once
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._tmp.replace(self.path)
            self._store.sync_dir()
        except OSError as exc:
            self.abort()
            raise StoreError(f"{self.path}: cannot write: {exc.strerror}") from exc
        self._store.committed(self)

    def abort(self) -> None:
        """Drop the unfinished base."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()


class SnapshotStore:
    """The counter snapshot files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / DIRNAME
        self.legacy = state_dir / legacy_snapshot.FILENAME
        self._log: Path | None = None
        self.log_number = 0
        #: Bytes of the newest base, and of the files after it (what a compaction would drop).
        self.base_bytes = 0
        self.log_bytes = 0
        self.log_files = 0
        #: Files with damaged records, kept aside at the next compaction.
        self.damaged: set[Path] = set()
        self._legacy_loaded = False

    # -- reading ----------------------------------------------------------------------------

    def numbered(self) -> list[tuple[int, Path]]:
        """The numbered files, oldest first."""
        try:
            paths = list(self.dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("snapshot_unreadable", file=str(self.dir), error=exc.strerror)
            return []
        found = [(number, path) for path in paths if (number := _number(path)) is not None]
        return sorted(found)

    def remove_unfinished(self) -> None:
        """Remove bases a crash left half written (they were never renamed into place)."""
        with contextlib.suppress(OSError):
            for path in self.dir.glob("*.tmp"):
                path.unlink()

    def files_to_load(self) -> list[Path]:
        """The files a start reads, in order: the v1 file if any, the newest base, the rest."""
        self.remove_unfinished()
        files = self.numbered()
        start = 0
        for index in range(len(files) - 1, -1, -1):
            if self._is_base(files[index][1]):
                start = index
                break
        chosen = [path for _, path in files[start:]]
        self.log_files = max(0, len(chosen) - 1)
        if self.legacy.exists():
            chosen.insert(0, self.legacy)
        return chosen

    @staticmethod
    def _is_base(path: Path) -> bool:
        try:
            with path.open("rb") as file:
                return snapshot_format.is_base(file.read(len(snapshot_format.BASE_HEADER)))
        except OSError:
            return False

    def read(self, path: Path) -> bytes | None:
        """A file's bytes, or None (logged) when it cannot be read."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error(
                "snapshot_unreadable",
                file=str(path),
                error=exc.strerror,
                action="starting without the counters it holds",
            )
            return None
        if path == self.legacy:
            self._legacy_loaded = True
        elif snapshot_format.is_base(data):
            self.base_bytes = len(data)
            self.log_bytes = 0
        else:
            self.log_bytes += len(data)
        return data

    def decode(
        self, path: Path, data: bytes, *, shift: float, latest: float
    ) -> Iterator[Record | Problem]:
        """The records of *path* (v1 or v2). Never raises."""
        decoder = legacy_snapshot.decode if path == self.legacy else snapshot_format.decode
        return decoder(data, source=str(path), shift=shift, latest=latest)

    def wants_compaction(self) -> bool:
        """Whether a compaction is due: a v1 file or damage to replace, or logs grown large."""
        return (
            self._legacy_loaded
            or bool(self.damaged)
            or self.log_files > COMPACT_MAX_FILES
            or self.log_bytes > max(self.base_bytes, COMPACT_MIN_BYTES)
        )

    # -- writing ----------------------------------------------------------------------------

    def open_log(self) -> None:
        """Start a new log after every existing file (each start, and each compaction).

        Raises:
            StoreError: it cannot be created.
        """
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            files = self.numbered()
            number = max(files[-1][0] if files else 0, self.log_number) + 1
            path = self.dir / f"{number:010d}"
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            try:
                os.write(fd, snapshot_format.header(base=False))
            finally:
                os.close(fd)
            self.sync_dir()
        except OSError as exc:
            raise StoreError(f"{self.dir}: cannot start a snapshot log: {exc.strerror}") from exc
        self.log_number = number
        self._log = path
        self.log_files += 1

    def append(self, data: bytes) -> None:
        """Append records to the current log and make them durable.

        Raises:
            StoreError: they could not be written (the log may end in a torn record, which the
                next load reports and skips).
        """
        if self._log is None:
            self.open_log()
        assert self._log is not None  # noqa: S101 - opened above
        try:
            fd = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"{self.dir}: cannot write the snapshot: {exc.strerror}") from exc
        self.log_bytes += len(data)

    def start_base(self) -> BaseWriter:
        """Begin a compaction: reserve the next number for the base, and log after it.

        Raises:
            StoreError: the files could not be created.
        """
        files = self.numbered()
        # after every file there is, whether this run has logged yet or not: a base numbered
        # below an older file would leave that file (and its damage) to every later load
        number = max(files[-1][0] if files else 0, self.log_number) + 1
        self.log_number = number  # the new log goes after the base
        self.open_log()
        self.log_files = 1
        try:
            return BaseWriter(self, number)
        except OSError as exc:
            raise StoreError(f"{self.dir}: cannot start a compaction: {exc.strerror}") from exc

    def committed(self, base: BaseWriter) -> None:
        """Remove what *base* replaces; keep damaged files aside."""
        for number, path in self.numbered():
            if number >= base.number:
                continue
            try:
                if path in self.damaged:
                    path.replace(path.with_name(path.name + DAMAGED_SUFFIX))
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("snapshot_cleanup_failed", file=str(path), error=exc.strerror)
        if self._legacy_loaded:
            try:
                if self.legacy in self.damaged:
                    self.legacy.replace(self.legacy.with_name(self.legacy.name + DAMAGED_SUFFIX))
                else:
                    self.legacy.unlink()
            except OSError as exc:
                log.warning("snapshot_cleanup_failed", file=str(self.legacy), error=exc.strerror)
            self._legacy_loaded = False
        self.damaged.clear()
        self.base_bytes = base.size
        self.log_bytes = 0

    def sync_dir(self) -> None:
        """fsync the directory, so that creations and renames survive a crash."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop appending to the current log (the next append starts a new one)."""
        self._log = None
