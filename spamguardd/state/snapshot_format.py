"""The counter snapshot's records, version 2: encode one, decode a file of them. No I/O.

A snapshot file starts with one text line naming the format and whether the file is a *base*
(everything before it is obsolete) or a *log* (it adds to the files before it)::

    # spamguardd counters v2 base

Then records, each self-contained and checked on its own::

    C5 4B                      sync mark
    u32 little-endian          payload length
    payload                    u8 kind, u16 key length, key bytes, and for a state:
                               u8 limits length, limits ("100/1h,300/1d"), doubles (the state's
                               portable form, spamguardd.core.buckets, times on the wall clock)
    u32 little-endian          CRC-32 of the payload

Kinds: ``STATE`` (the user's counters, replacing any earlier record), ``FORGET`` (the user is no
longer counted: blocked, reset, evicted) and ``MERGE`` (counters counted from full buckets while
the earlier records were not loaded yet: added to them). A key is the user key's bytes exactly
(``surrogateescape``, like the query protocol), so any key round-trips byte for byte; the
volume guard's state of a user has the user's key followed by ``NUL accepted``, the one place
a NUL may appear.

A damaged record (bad mark, length, checksum, kind, key, limits or state) is reported as
``FILE:RECORD: problem`` and skipped; decoding resumes at the next sync mark whose record checks
out, so damage costs the records it touches and never the file. Decoding any bytes at all raises
nothing.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Final

import attrs

from spamguardd.core import buckets
from spamguardd.core.buckets import UserState
from spamguardd.core.config import ACCEPTED_SUFFIX
from spamguardd.core.protocol import ENCODING, ERRORS, MAX_USER_SIZE
from spamguardd.core.rate import Rate

VERSION: Final = 2
BASE_HEADER: Final = b"# spamguardd counters v2 base\n"
LOG_HEADER: Final = b"# spamguardd counters v2 log\n"
SYNC: Final = b"\xc5\x4b"
#: Longest payload accepted: a key, limits, and a state of MAX_RECENT failures in 8 windows.
MAX_PAYLOAD: Final = 1 + 2 + MAX_USER_SIZE + 1 + 255 + 8 * (9 + 2 * buckets.MAX_RECENT * 9)

#: What ends the key of a user's volume-guard state (``config.ACCEPTED_SUFFIX``).
_ACCEPTED: Final = ACCEPTED_SUFFIX.encode(ENCODING, ERRORS)
_HEAD: Final = struct.Struct("<2sI")
_CRC: Final = struct.Struct("<I")
_KEY: Final = struct.Struct("<BH")
_LITTLE: Final = sys.byteorder == "little"


class Kind(enum.IntEnum):
    """What a record says about its user."""

    STATE = 1
    FORGET = 2
    MERGE = 3


_KINDS: Final = {kind.value: kind for kind in Kind}


@attrs.frozen
class Record:
    """One decoded record: its user and, for a state, the limits and state (monotonic times)."""

    kind: Kind
    user: str
    rates: tuple[Rate, ...] = ()
    state: UserState | None = None


@attrs.frozen
class Problem:
    """A damaged record: ``FILE:RECORD: what is wrong`` (RECORD counts from 1)."""

    text: str


class KeyNotWritableError(ValueError):
    """A user key that has no byte form (a lone surrogate no protocol decoding produces)."""


def header(*, base: bool) -> bytes:
    """The first line of a snapshot file."""
    return BASE_HEADER if base else LOG_HEADER


def encode_record(
    kind: Kind, user: str, rates: Sequence[Rate] = (), values: Sequence[float] = ()
) -> bytes:
    """One record; *values* is a state's portable form (:func:`buckets.export`).

    Raises:
        KeyNotWritableError: *user* cannot be written as bytes.
        ValueError: the key or limits are too long for the format.
    """
    try:
        key = user.encode(ENCODING, ERRORS)
    except UnicodeEncodeError as exc:
        raise KeyNotWritableError(f"user key {user!r} has no byte form: {exc.reason}") from None
    owner = key.removesuffix(_ACCEPTED)
    if not 0 < len(owner) <= MAX_USER_SIZE:
        raise ValueError(f"user key of {len(owner)} bytes (at most {MAX_USER_SIZE})")
    parts = [_KEY.pack(kind, len(key)), key]
    if kind is not Kind.FORGET:
        limits = _limits_text(tuple(rates))
        doubles = array.array("d", values)
        if not _LITTLE:  # pragma: no cover - the reference machines are little-endian
            doubles.byteswap()
        parts += [bytes((len(limits),)), limits, doubles.tobytes()]
    payload = b"".join(parts)
    return b"".join((_HEAD.pack(SYNC, len(payload)), payload, _CRC.pack(zlib.crc32(payload))))


_LIMITS_TEXT: dict[tuple[Rate, ...], bytes] = {}
#: Recent failures remembered under each set of limits seen in a file.
_LIMITS: dict[tuple[Rate, ...], int] = {}


def _limits_text(rates: tuple[Rate, ...]) -> bytes:
    text = _LIMITS_TEXT.get(rates)
    if text is None:
        text = ",".join(str(rate) for rate in rates).encode("ascii")
        if not 0 < len(text) < 256:
            raise ValueError(f"limits {text!r} too long for the format")
        _LIMITS_TEXT[rates] = text
    return text


def is_base(data: bytes) -> bool:
    """Whether a file's first line says it is a base."""
    return data.startswith(BASE_HEADER)


def decode(
    data: bytes,
    *,
    source: str,
    shift: float,
    latest: float,
) -> Iterator[Record | Problem]:
    """The records of a snapshot file, in order, and a :class:`Problem` per damaged one.

    Times move by *shift* (monotonic minus wall clock) and none ends later than *latest*.
    Never raises, whatever *data* holds.
    """
    limits: dict[bytes, tuple[Rate, ...]] = {}
    view = memoryview(data)
    position = 0
    number = 0
    if data.startswith((BASE_HEADER, LOG_HEADER)):
        position = data.index(b"\n") + 1
    elif data:
        number += 1
        yield Problem(f"{source}:{number}: not a v{VERSION} counter snapshot header")
        position = _resync(data, 0)
    end = len(data)
    while position < end:
        number += 1
        outcome = _record(data, view, position, limits, shift=shift, latest=latest)
        if isinstance(outcome, str):  # the frame is damaged: look for the next one
            yield Problem(f"{source}:{number}: {outcome}")
            position = _resync(data, position + 1)
            continue
        content, position = outcome
        yield content if isinstance(content, Record) else Problem(f"{source}:{number}: {content}")


def _resync(data: bytes, start: int) -> int:
    """The next sync mark at or after *start*, or the end."""
    found = data.find(SYNC, start)
    return len(data) if found < 0 else found


def _record(  # noqa: PLR0911, PLR0913 - one return per damage; the decoder's state is passed in
    data: bytes,
    view: memoryview,
    position: int,
    limits: dict[bytes, tuple[Rate, ...]],
    *,
    shift: float,
    latest: float,
) -> tuple[Record | str, int] | str:
    """Decode the record at *position*.

    Returns:
        ``(record or why its content is invalid, next position)`` when its frame checks out,
        else why the frame is damaged.
    """
    if len(data) - position < _HEAD.size:
        return "truncated record"
    sync, length = _HEAD.unpack_from(data, position)
    if sync != SYNC:
        return "no record starts here"
    if length > MAX_PAYLOAD:
        return f"record length {length} is larger than any record"
    start = position + _HEAD.size
    stop = start + length
    if stop + _CRC.size > len(data):
        return "truncated record"
    payload = view[start:stop]
    if zlib.crc32(payload) != _CRC.unpack_from(data, stop)[0]:
        return "checksum mismatch"
    following = stop + _CRC.size
    try:
        return _content(payload, limits, shift=shift, latest=latest), following
    except ValueError as exc:
        return str(exc), following


def _parse_limits(text: bytes, known: dict[bytes, tuple[Rate, ...]]) -> tuple[Rate, ...]:
    rates = known.get(text)
    if rates is None:
        try:
            rates = tuple(Rate.parse(part) for part in text.decode("ascii").split(","))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"limits {text!r}: {exc}") from None
        known[text] = rates
        _LIMITS.setdefault(rates, buckets.recent_limit(rates))
    return rates


def _content(
    payload: memoryview, limits: dict[bytes, tuple[Rate, ...]], *, shift: float, latest: float
) -> Record:
    if len(payload) < _KEY.size:
        raise ValueError("record too short for a kind and a key")
    kind_number, key_length = _KEY.unpack_from(payload)
    kind = _KINDS.get(kind_number)
    if kind is None:
        raise ValueError(f"unknown record kind {kind_number}")
    at = _KEY.size + key_length
    key = bytes(payload[_KEY.size : at])
    owner = key.removesuffix(_ACCEPTED)  # the volume guard's state of that user
    if len(key) != key_length or not owner or b"\x00" in owner:
        raise ValueError("user key: expected 1 to 1024 bytes, no NUL")
    user = key.decode(ENCODING, ERRORS)
    if kind is Kind.FORGET:
        if at != len(payload):
            raise ValueError("unexpected bytes after a forget record")
        return Record(kind, user)
    if at >= len(payload):
        raise ValueError("state record without limits")
    limits_length = payload[at]
    rates = _parse_limits(bytes(payload[at + 1 : at + 1 + limits_length]), limits)
    body = payload[at + 1 + limits_length :]
    if len(body) % 8:
        raise ValueError("state: not a whole number of doubles")
    doubles = array.array("d")
    doubles.frombytes(body)
    if not _LITTLE:  # pragma: no cover - the reference machines are little-endian
        doubles.byteswap()
    state = buckets.import_state(doubles, rates, _LIMITS[rates], shift=shift, latest=latest)
    return Record(kind, user, rates, state)
