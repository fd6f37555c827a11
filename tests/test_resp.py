"""The RESP2 reader and encoder fleet mode's query path uses: whatever the server sends, in
whatever pieces, the replies come out whole and in order; anything else is a protocol error."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.resp import (
    MAX_DEPTH,
    MAX_REPLY,
    NEED_DATA,
    ErrorReply,
    Reply,
    RespProtocolError,
    RespReader,
    encode_command,
)


def serialise(reply: Reply) -> bytes:
    """What a RESP2 server sends for *reply* (bulk strings for bytes)."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, ErrorReply):
        return b"-" + reply.message.encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(serialise(item) for item in reply)


def replies_in(reader: RespReader) -> list[Reply]:
    found: list[Reply] = []
    while True:
        reply = reader.next_reply()
        if reply is NEED_DATA or isinstance(reply, type):
            return found
        found.append(reply)


leaves = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=64),
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
        max_size=30,
    ).map(ErrorReply),
)
replies = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@given(st.lists(replies, min_size=1, max_size=5), st.data())
def test_replies_come_out_whole_whatever_the_pieces(sent: list[Reply], data: st.DataObject) -> None:
    wire = b"".join(serialise(reply) for reply in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    reader = RespReader()
    received: list[Reply] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[start:cut])
        start = cut
        received += replies_in(reader)
    assert received == sent


@given(st.binary(max_size=200))
def test_garbage_is_a_protocol_error_or_waits_never_anything_else(wire: bytes) -> None:
    reader = RespReader()
    reader.feed(wire)
    with contextlib.suppress(RespProtocolError):
        replies_in(reader)


def test_simple_strings_and_null_arrays() -> None:
    reader = RespReader()
    reader.feed(b"+OK\r\n*-1\r\n:-7\r\n")
    assert replies_in(reader) == [b"OK", None, -7]


def test_an_error_reply_names_its_code() -> None:
    reader = RespReader()
    reader.feed(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    (reply,) = replies_in(reader)
    assert isinstance(reply, ErrorReply)
    assert reply.code == "NOSCRIPT"


@pytest.mark.parametrize(
    "wire",
    [
        b"?what\r\n",
        b":12x\r\n",
        b":99999999999999999999\r\n",
        b"$3\r\nabcd\r\n",
        b"$-2\r\n",
        b"*-5\r\n",
        b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n",
    ],
)
def test_what_is_not_resp_is_refused(wire: bytes) -> None:
    reader = RespReader()
    reader.feed(wire)
    with pytest.raises(RespProtocolError):
        replies_in(reader)


def test_a_reply_larger_than_the_bound_is_refused_before_it_is_held() -> None:
    reader = RespReader()
    reader.feed(b"$%d\r\n" % (MAX_REPLY * 2))
    with pytest.raises(RespProtocolError, match="bulk string"):
        reader.next_reply()
    with pytest.raises(RespProtocolError, match="more than"):
        RespReader().feed(b"x" * (MAX_REPLY + 1))


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert (
        encode_command(b"EVALSHA", b"ab", b"0") == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n"
    )
    reader = RespReader()
    reader.feed(encode_command(b"a b", b"", b"\r\n"))
    assert replies_in(reader) == [[b"a b", b"", b"\r\n"]]
