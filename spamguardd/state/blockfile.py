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

The file is replaced atomically (temp file in the same directory, fsync, rename, fsync of the
directory), so Exim and a crash only ever see a whole old or a whole new file. A damaged file is
never overwritten: loading stops with ``file:line: what is wrong``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from spamguardd.core.errors import RemoteProtocolError, StoreError
from spamguardd.core.policy import Block
from spamguardd.core.protocol import ENCODING, ERRORS, parse_pairs, quote
from spamguardd.core.timestamps import format_time, parse_time

HEADER: Final = (
    b"# spamguardd block list: one blocked user per line, in Exim lsearch format.\n"
    b"# Written by spamguardd; change it through the daemon, not by hand (it rewrites this file).\n"
)

_KEY_ESCAPES: Final = {0x5C: b"\\\\", 0x22: b'\\"', 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}
_KEY_UNESCAPES: Final = {
    ord("\\"): 0x5C,
    ord('"'): 0x22,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
}
_HEX2: Final = re.compile(rb"[0-9a-fA-F]{2}")


def encode_key(user: str) -> bytes:
    """Quote a user key as an lsearch key."""
    out = bytearray(b'"')
    for byte in user.encode(ENCODING, ERRORS):
        escaped = _KEY_ESCAPES.get(byte)
        if escaped is not None:
            out += escaped
        elif byte < 0x20 or byte == 0x7F:
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    out += b'"'
    return bytes(out)


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
    blocks: dict[str, Block] = {}
    for number, line in enumerate(data.split(b"\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        try:
            block = _decode_line(stripped)
        except (ValueError, RemoteProtocolError) as exc:
            raise StoreError(f"{source}:{number}: {exc}") from exc
        if block.user in blocks:
            raise StoreError(f"{source}:{number}: {block.user!r} is listed twice")
        blocks[block.user] = block
    return list(blocks.values())


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
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreError(f"{path}: cannot create a temporary file: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            if group is not None:
                os.fchown(file.fileno(), -1, group)
            os.fsync(file.fileno())
        tmp.replace(path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StoreError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class BlockStore:
    """The block file of one state directory."""

    FILENAME: Final = "blocked"

    def __init__(self, state_dir: Path, *, group: int | None = None) -> None:
        self.path = state_dir / self.FILENAME
        self.group = group

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

    def load(self) -> list[Block]:
        """Read the block list; a missing file is an empty list.

        Raises:
            StoreError: the file cannot be read or is damaged.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        return decode(data, source=str(self.path))

    def save(self, blocks: Iterable[Block]) -> None:
        """Write the whole block list durably.

        Raises:
            StoreError: it could not be written; the old file is intact.
        """
        write_atomic(self.path, encode(blocks), group=self.group)
