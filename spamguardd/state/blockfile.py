"""The block list on disk, in Exim ``lsearch`` format, so Exim can read it without the daemon.

One line per blocked user (shown here folded)::

    "auth:alice@example.com": blocked_at=2026-11-28T01:02:03Z
        reason="100 failed recipients within 1h" by=auto until=2026-11-29T01:02:03Z nth=1

``until=`` (when the block lifts itself) and ``nth=`` (which automatic block of the user it is
within ``block.repeat_within``) are written only when they apply. Exim's lookup only asks whether
the key is there, so the fields after the key are the daemon's own.

The key is always double-quoted: lsearch ends an unquoted key at the first colon or blank, and
every user key has a colon (``auth:...``, ``ip:...``). Inside the quotes Exim honours ``\\\\``,
``\\"``, ``\\n``, ``\\r``, ``\\t`` and ``\\xHH`` (checked against Exim 4.96 in the test suite);
bytes of 0x80 and above are written as they are, because Exim compares raw bytes. Exim's lsearch
compares keys without regard to case, which is why the shipped ACL folds ids to lower case.

A block costs O(1) on disk, whatever the number of blocked users: its line is appended, and an
unblock turns the user's line into a comment by overwriting its first byte (``"`` becomes ``#``)
in place. Exim reads the file while it changes, and lsearch takes the first matching line, so
every line reaches the file as a comment and comes to life only once it is whole: the append
writes ``#"key": ...`` and fsyncs it, then one byte is overwritten with ``"`` and fsynced. A
reader therefore never sees a torn line that could match a wrong key (lsearch reads an
unterminated quoted key up to the end of what it has), a crash never leaves one, and a user has
at most one live line. When the dead lines outnumber the live ones (and there are at least
:data:`COMPACT_MIN_DEAD`), the file is rewritten without them, atomically (temp file in the same
directory, fsync, rename, fsync of the directory). A damaged file is never overwritten: loading
stops with ``file:line: what is wrong``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

from spamguardd.core.errors import RemoteProtocolError, StoreError
from spamguardd.core.lsearch import quote_key
from spamguardd.core.policy import Block
from spamguardd.core.protocol import ENCODING, ERRORS, parse_pairs, quote
from spamguardd.core.timestamps import format_time, parse_time

HEADER: Final = (
    b"# spamguardd block list: one blocked user per line, in Exim lsearch format.\n"
    b"# Written by spamguardd; change it through the daemon, not by hand (it rewrites this file).\n"
)

_KEY_UNESCAPES: Final = {
    ord("\\"): 0x5C,
    ord('"'): 0x22,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
}
_HEX2: Final = re.compile(rb"[0-9a-fA-F]{2}")


encode_key = quote_key


def _decode_key(line: bytes) -> tuple[str, int]:
    """Parse the quoted key at the start of *line*; return it and the position after it."""
    if not line.startswith(b'"'):
        raise ValueError("the user key must be in double quotes")
    out = bytearray()
    i = 1
    while i < len(line):
        byte = line[i]
        if byte == 0x22:
            return out.decode(ENCODING, ERRORS), i + 1
        if byte == 0x5C:
            nxt = line[i + 1 : i + 2]
            if nxt == b"x" and _HEX2.fullmatch(line[i + 2 : i + 4]):
                out.append(int(line[i + 2 : i + 4], 16))
                i += 4
                continue
            if not nxt or nxt[0] not in _KEY_UNESCAPES:
                raise ValueError(f"unknown escape in the user key at byte {i + 1}")
            out.append(_KEY_UNESCAPES[nxt[0]])
            i += 2
            continue
        out.append(byte)
        i += 1
    raise ValueError("the user key has no closing double quote")


def encode(blocks: Iterable[Block]) -> bytes:
    """Serialise a block list to the bytes of the file, sorted by key for stable diffs."""
    ordered = sorted(blocks, key=lambda b: b.user.encode(ENCODING, ERRORS))
    return HEADER + b"".join(map(_encode_line, ordered))


def _encode_line(block: Block) -> bytes:
    return b"%s: blocked_at=%s reason=%s by=%s%s\n" % (
        encode_key(block.user),
        format_time(block.blocked_at).encode(),
        quote(block.reason),
        quote(block.by),
        _expiry_fields(block),
    )


def _expiry_fields(block: Block) -> bytes:
    """`` until=TIME`` for a block that lifts itself, `` nth=N`` for a counted automatic one."""
    out = b""
    if block.expires_at is not None:
        out += b" until=" + format_time(block.expires_at).encode()
    if block.nth:
        out += b" nth=%d" % block.nth
    return out


def decode(data: bytes, *, source: str) -> list[Block]:
    """Parse the bytes of a block file.

    Raises:
        StoreError: a line is damaged or a user appears twice; the message is
            ``SOURCE:LINE: what is wrong``.
    """
    return [block for block, _ in scan(data, source=source).live.values()]


@attrs.frozen
class Scan:
    """What a block file holds, with where each live line starts (to kill it in place)."""

    #: Live lines by user: the block and the offset of the line's first byte.
    live: dict[str, tuple[Block, int]]
    #: Lines killed by an unblock (``#"key": ...``), waiting for a compaction.
    dead: int
    #: Where the whole lines end: an append torn by a crash (a comment without its newline)
    #: starts here and is cut off when the file is opened for writing.
    end: int
    #: The last line is live but has no newline (written by hand): one goes before an append.
    needs_newline: bool


def scan(data: bytes, *, source: str) -> Scan:
    """Parse a block file and index its lines.

    Raises:
        StoreError: a line is damaged or a user appears twice (``SOURCE:LINE: ...``).
    """
    live: dict[str, tuple[Block, int]] = {}
    dead = 0
    offset = 0
    end = len(data)
    needs_newline = False
    for number, line in enumerate(data.split(b"\n"), start=1):
        start = offset
        offset += len(line) + 1
        stripped = line.strip()
        last = offset > len(data)
        if last and stripped and not stripped.startswith(b'"'):
            end = start  # a torn append (or a last comment without its newline)
            break
        if not stripped or stripped.startswith(b"#"):
            dead += stripped.startswith(b'#"')
            continue
        try:
            block = _decode_line(stripped)
        except (ValueError, RemoteProtocolError) as exc:
            raise StoreError(f"{source}:{number}: {exc}") from exc
        if block.user in live:
            raise StoreError(f"{source}:{number}: {block.user!r} is listed twice")
        live[block.user] = (block, start + len(line) - len(line.lstrip()))
        needs_newline = last
    return Scan(live, dead, end, needs_newline)


def _decode_line(line: bytes) -> Block:
    user, pos = _decode_key(line)
    if line[pos : pos + 1] == b":":
        pos += 1
    fields = parse_pairs(line, pos)
    try:
        blocked_at = parse_time(fields["blocked_at"])
    except KeyError:
        raise ValueError("missing blocked_at=") from None
    until = fields.get("until")
    nth = fields.get("nth", "0")
    if not nth.isdigit():
        raise ValueError(f"nth= must be a whole number (got {nth!r})")
    return Block(
        user=user,
        blocked_at=blocked_at,
        reason=fields.get("reason", ""),
        by=fields.get("by", "admin"),
        expires_at=None if until is None else parse_time(until),
        nth=int(nth),
    )


def write_atomic(path: Path, data: bytes, *, mode: int = 0o640, group: int | None = None) -> None:
    """Replace *path* with *data* so that readers see the old or the new file, never a mix.

    Raises:
        StoreError: any step failed; *path* is unchanged and no temporary file is left behind.
    """
    os.close(_replace(path, data, mode=mode, group=group))


def _replace(path: Path, data: bytes, *, mode: int = 0o640, group: int | None = None) -> int:
    """:func:`write_atomic`, returning the new file open for reading and writing."""
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create a temporary file: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        _pwrite_all(fd, data, 0)
        os.fchmod(fd, mode)
        if group is not None:
            os.fchown(fd, -1, group)
        os.fsync(fd)
        tmp.replace(path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StoreError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return fd


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


#: A compaction runs once the dead lines outnumber the live ones and are at least this many.
COMPACT_MIN_DEAD: Final = 1024
#: Prefix of the temporary files of atomic writes in the state directory.
TEMP_PREFIX: Final = ".blocked."
TEMP_SUFFIX: Final = ".tmp"


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class BlockStore:
    """The block file of one state directory.

    :meth:`open` reads and indexes it and keeps it open for writing (so a block can still be
    written when the process is out of file descriptors); :meth:`apply` writes changed users.
    """

    FILENAME: Final = "blocked"

    def __init__(self, state_dir: Path, *, group: int | None = None) -> None:
        self.path = state_dir / self.FILENAME
        self.group = group
        self._fd: int | None = None
        self._live: dict[str, tuple[Block, int]] = {}
        self._end = 0
        #: Lines killed by unblocks, not yet compacted away.
        self.dead_lines = 0
        #: Completed compactions since the start.
        self.compactions = 0
        #: Times the file was written again after it was removed or replaced under the daemon.
        self.restorations = 0

    def prepare(self) -> None:
        """Create the state directory if needed.

        Raises:
            StoreError: it cannot be created.
        """
        directory = self.path.parent
        created = not directory.exists()
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{directory}: cannot create: {exc.strerror}") from exc
        if created and self.group is not None:
            # Exim's lsearch fallback needs search permission on the directory too. A directory
            # that already exists is left alone: its owner (systemd's StateDirectory=, an admin)
            # chose its permissions, and systemd re-chowns one whose group was changed.
            try:
                os.chown(directory, -1, self.group)
            except OSError as exc:
                raise StoreError(
                    f"{directory}: cannot give it group {_group_name(self.group)} (is the "
                    f"daemon's user a member?): {exc.strerror}"
                ) from exc

    def _refuse_symlink(self) -> None:
        if self.path.is_symlink():
            raise StoreError(
                f"{self.path}: is a symbolic link (to {self.path.readlink()}); the block file "
                "must be a regular file in the state directory (spamguardd writes it in place "
                "and replaces it by rename, which would not follow a link)"
            )

    def load(self) -> list[Block]:
        """Read the block list without changing anything; a missing file is an empty list.

        Raises:
            StoreError: the file cannot be read, is damaged, or is a symbolic link.
        """
        self._refuse_symlink()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        return decode(data, source=str(self.path))

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove temporary files an interrupted atomic write left behind; return them.

        Only safe while holding the state directory's lock: another daemon's write in flight
        looks the same.
        """
        removed = []
        for path in self.path.parent.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed

    def open(self, *, create: bool = False) -> list[Block]:
        """Open the block file for writing, read and index it; return its blocks.

        A missing file is an empty list, and is created only with *create* (by the first
        write): until someone is blocked there is no file, as Exim's ACL has always seen it.
        An append torn by a crash (never acknowledged: it was a comment until whole) is cut off.

        Raises:
            StoreError: it cannot be opened for writing (read-only file system, permissions), is
                not a regular file, or is damaged (then it is left as it is).
        """
        self.close()
        self._refuse_symlink()
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o640)
        except FileNotFoundError:
            if create:
                raise StoreError(f"{self.path}: cannot create: directory missing") from None
            self._live, self._end, self.dead_lines = {}, 0, 0
            return []
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._refuse_symlink()
            raise StoreError(f"{self.path}: cannot open for writing: {exc.strerror}") from exc
        try:
            found, end = self._index(fd)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{self.path}: cannot write: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._live = found.live
        self._end = end
        self.dead_lines = found.dead
        return [block for block, _ in found.live.values()]

    def _index(self, fd: int) -> tuple[Scan, int]:
        """Read and scan the open file; give a new one its header, cut a torn append off."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"{self.path}: is not a regular file")
        data = _read_all(fd, info.st_size)
        found = scan(data, source=str(self.path))
        if not data:
            _pwrite_all(fd, HEADER, 0)
            if self.group is not None:
                os.fchown(fd, -1, self.group)
            os.fchmod(fd, 0o640)
            os.fsync(fd)
            return found, len(HEADER)
        end = found.end
        if end < len(data):
            os.ftruncate(fd, end)
        if found.needs_newline:
            _pwrite_all(fd, b"\n", end)
            end += 1
        if end != len(data):
            os.fsync(fd)
        return found, end

    def close(self) -> None:
        """Close the file (a later :meth:`apply` opens it again)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def live_lines(self) -> int:
        """Users blocked in the file."""
        return len(self._live)

    def users(self) -> list[str]:
        """The users blocked in the file, as of the last successful write."""
        return list(self._live)

    def on_disk(self, user: str) -> Block | None:
        """The block the file holds for *user*, as of the last successful write."""
        found = self._live.get(user)
        return None if found is None else found[0]

    def apply(self, changes: Iterable[tuple[str, Block | None]]) -> None:
        """Make the file say, for each ``(user, block)``, that *user* is blocked by *block*
        (None: not blocked), durably. O(changes), whatever the size of the file.

        Raises:
            StoreError: a step failed; what was appended is cut off again, and the next call
                with the same changes completes them (killing a line twice is harmless).
        """
        changes = list(changes)
        if self._fd is None:
            self.open(create=True)
        else:
            self.restore_if_gone()
        fd = self._fd
        assert fd is not None  # noqa: S101 - open(create=True) set it or raised
        appends, kills = self._plan(changes)
        if not appends and not kills:
            return
        try:
            offsets = _append_and_kill(fd, self._end, [b for _, b in appends], kills)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._end)
            raise StoreError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        self._end = offsets.pop()
        for user, change in changes:
            if change is None:
                self._live.pop(user, None)
        for (user, block), offset in zip(appends, offsets, strict=True):
            self._live[user] = (block, offset)
        self.dead_lines += len(kills)

    def restore_if_gone(self) -> bool:
        """Write the file again, from the lines it held, if it was removed or replaced under the
        open descriptor (an ``rm`` by hand while the daemon runs). Blocks written to a removed
        file would reach neither Exim's fallback nor the next start. O(live users), only then.

        Returns:
            Whether the file was written again (counted in :attr:`restorations`).

        Raises:
            StoreError: it could not be written.
        """
        if self._fd is None:
            return False
        try:
            at_path = self.path.lstat()
        except FileNotFoundError:
            at_path = None
        except OSError:
            return False  # cannot tell from here; a write will say what is wrong
        mine = os.fstat(self._fd)
        if at_path is not None and (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino):
            return False
        self.compact()
        self.restorations += 1
        return True

    def _plan(
        self, changes: list[tuple[str, Block | None]]
    ) -> tuple[list[tuple[str, Block]], list[int]]:
        """The lines to append and the offsets of the lines to kill for *changes*."""
        appends: list[tuple[str, Block]] = []
        kills: list[int] = []
        for user, block in changes:
            old = self._live.get(user)
            if old is not None and old[0] == block:
                continue
            if old is not None:
                kills.append(old[1])
            if block is not None:
                appends.append((user, block))
        return appends, kills

    def wants_compaction(self) -> bool:
        """Whether dead lines are numerous enough for a rewrite to pay."""
        return self.dead_lines >= COMPACT_MIN_DEAD and self.dead_lines > len(self._live)

    def compact(self) -> None:
        """Rewrite the file with its live lines only, atomically. O(live users).

        Raises:
            StoreError: the rewrite failed; the old file is intact and still in use.
        """
        blocks = [block for block, _ in self._live.values()]
        data = encode(blocks)
        fd = _replace(self.path, data, group=self.group)
        found = scan(data, source=str(self.path))
        self.close()
        self._fd = fd
        self._live = found.live
        self._end = len(data)
        self.dead_lines = 0
        self.compactions += 1

    def save(self, blocks: Iterable[Block]) -> None:
        """Replace the whole block list durably (a compaction to exactly *blocks*).

        Raises:
            StoreError: it could not be written; the old file is intact.
        """
        data = encode(blocks)
        fd = _replace(self.path, data, group=self.group)
        self.close()
        self._fd = fd
        self._live = scan(data, source=str(self.path)).live
        self._end = len(data)
        self.dead_lines = 0


def _append_and_kill(fd: int, end: int, blocks: list[Block], kills: list[int]) -> list[int]:
    """Append *blocks* at *end* and kill the lines at *kills*, durably; return the offsets of
    the new lines, then the new end.

    Raises:
        OSError: a step failed (the caller cuts the file back to *end*).
    """
    lines = [_encode_line(block) for block in blocks]
    offsets = []
    at = end
    for line in lines:
        offsets.append(at)
        at += len(line)
    if lines:
        # whole lines as comments first: no reader can match a line still in flight
        _pwrite_all(fd, b"".join(b"#" + line[1:] for line in lines), end)
        os.fdatasync(fd)
    for offset in offsets:  # alive before the old lines die: never a gap in a re-block
        _pwrite_all(fd, b'"', offset)
    for offset in kills:
        _pwrite_all(fd, b"#", offset)
    os.fdatasync(fd)
    return [*offsets, at]


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, max(size - offset, 65536), offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
