"""The Redis serialisation protocol (RESP2), as far as fleet mode's query path needs it.

A failed recipient in fleet mode costs one script call on the store, and that call sits on the
query path, inside Exim's readsocket timeout. This module is the pure half of the short way to
make it: commands encoded as RESP arrays of bulk strings, and a sans-I/O reader that turns the
bytes a server sends into replies. Everything else the daemon says to the store goes through the
full client library; see ``daemon/store_link`` for why the query path does not.

Only what a RESP2 server sends to a RESP2 client is understood: simple strings, errors,
integers, bulk strings, arrays, and their null forms. A reply is bounded in size and depth: a
server that sends more is a protocol error, not a reason to grow without limit.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import attrs

#: The largest reply the reader holds (the count script answers in well under a kilobyte).
MAX_REPLY: Final = 1 << 20
#: The deepest nesting of arrays accepted (the script answers with a flat array).
MAX_DEPTH: Final = 8
#: Digits of the largest RESP integer (a signed 64-bit one).
MAX_DIGITS: Final = 19


@attrs.frozen
class ErrorReply:
    """An error the server answered (``-ERR ...``, ``-NOSCRIPT ...``): a reply, not a failure of
    the connection, which stays usable."""

    message: str

    @property
    def code(self) -> str:
        """The error's first word, ``NOSCRIPT`` in ``NOSCRIPT No matching script``."""
        return self.message.split(" ", 1)[0]


Reply: TypeAlias = "bytes | int | ErrorReply | list[Reply] | None"


class RespProtocolError(Exception):
    """The server sent something that is not RESP2, or more than :data:`MAX_REPLY`: the
    connection cannot be trusted any more and must be closed."""


def encode_command(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    parts.extend(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)
    return b"".join(parts)


class _IncompleteError(Exception):
    """The buffer ends inside the reply being read."""


class RespReader:
    """Turns the bytes a server sends into replies, in order; no I/O.

    Feed it what the socket returns with :meth:`feed`, then take replies with :meth:`next_reply`
    until it returns :data:`NEED_DATA`.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        """Append *data* from the server.

        Raises:
            RespProtocolError: the unread replies now exceed :data:`MAX_REPLY`.
        """
        self._buffer += data
        if len(self._buffer) > MAX_REPLY:
            raise RespProtocolError(f"a reply of more than {MAX_REPLY} bytes")

    def next_reply(self) -> Reply | type[NEED_DATA]:
        """The next whole reply, or :data:`NEED_DATA` when the buffer does not hold one yet.

        Raises:
            RespProtocolError: the bytes are not RESP2.
        """
        try:
            reply, end = self._parse(0, 0)
        except _IncompleteError:
            return NEED_DATA
        del self._buffer[:end]
        return reply

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            raise _IncompleteError
        return bytes(self._buffer[start:end]), end + 2

    def _parse(self, start: int, depth: int) -> tuple[Reply, int]:
        line, after = self._line(start)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest, after
        if kind == b"-":
            return ErrorReply(rest.decode("utf-8", "replace")), after
        if kind == b":":
            return _integer(rest), after
        if kind == b"$":
            return self._bulk(_integer(rest), after)
        if kind == b"*":
            return self._array(_integer(rest), after, depth)
        raise RespProtocolError(f"unknown reply type {kind!r}")

    def _bulk(self, size: int, start: int) -> tuple[bytes | None, int]:
        if size == -1:
            return None, start
        if not 0 <= size <= MAX_REPLY:
            raise RespProtocolError(f"a bulk string of {size} bytes")
        end = start + size
        if len(self._buffer) < end + 2:
            raise _IncompleteError
        if self._buffer[end : end + 2] != b"\r\n":
            raise RespProtocolError("a bulk string not followed by CRLF")
        return bytes(self._buffer[start:end]), end + 2

    def _array(self, count: int, start: int, depth: int) -> tuple[list[Reply] | None, int]:
        if count == -1:
            return None, start
        if not 0 <= count <= MAX_REPLY:
            raise RespProtocolError(f"an array of {count} items")
        if depth >= MAX_DEPTH:
            raise RespProtocolError(f"arrays nested deeper than {MAX_DEPTH}")
        items: list[Reply] = []
        for _ in range(count):
            item, start = self._parse(start, depth + 1)
            items.append(item)
        return items, start


def _integer(text: bytes) -> int:
    """A RESP integer: an optional minus and at most 19 digits (a signed 64-bit integer)."""
    body = text[1:] if text[:1] == b"-" else text
    if not body.isdigit() or len(body) > MAX_DIGITS:
        raise RespProtocolError(f"not an integer: {text[:40]!r}")
    return int(text)


class NEED_DATA:  # noqa: N801 - a sentinel class, named like h11's
    """:meth:`RespReader.next_reply` has no whole reply yet."""
