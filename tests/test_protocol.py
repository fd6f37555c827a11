"""The query protocol: exactly what Exim may send, and exactly what we answer."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import protocol
from spamguardd.core.errors import RemoteProtocolError
from spamguardd.core.protocol import (
    MAX_REQUEST_SIZE,
    NEED_DATA,
    CheckRequest,
    PingRequest,
    PolicyConnection,
    RcptRequest,
    Reply,
    ReportRequest,
    Request,
    Verdict,
    Verify,
    parse_reply,
    parse_request,
    quote,
    serialize_request,
)
from tests.strategies import requests, wire_text


def feed(*chunks: bytes) -> Request:
    connection = PolicyConnection()
    for chunk in chunks:
        connection.receive_data(chunk)
    result = connection.next_request()
    assert result is not NEED_DATA
    return result


class TestParseRequest:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"ping", PingRequest()),
            (b"PING", PingRequest()),
            (b"check user=auth:alice@example.com", CheckRequest("auth:alice@example.com")),
            (
                b"rcpt user=auth:alice@example.com rcpt=bob@example.org verify=fail",
                RcptRequest("auth:alice@example.com", "bob@example.org", Verify.FAIL),
            ),
            (
                b'rcpt user="auth:a b" rcpt="x\\"y\\\\z" verify=ok ip=192.0.2.7 sender=""',
                RcptRequest("auth:a b", 'x"y\\z', Verify.OK, ipaddress.ip_address("192.0.2.7"), ""),
            ),
            (
                b'rcpt  user=ip:2001:db8::1\trcpt="l\\nr\\r" verify=DEFER ip=2001:db8::1',
                RcptRequest(
                    "ip:2001:db8::1", "l\nr\r", Verify.DEFER, ipaddress.ip_address("2001:db8::1")
                ),
            ),
            (
                b'rcpt user=u rcpt=r verify=fail future=1 other="x y"',
                RcptRequest("u", "r", Verify.FAIL),
            ),
            (b"rcpt user=u rcpt=r verify=fail ip=", RcptRequest("u", "r", Verify.FAIL)),
            (
                b"report user=auth:a rcpt=gone@example.org event=msg:fail:delivery",
                ReportRequest("auth:a", "gone@example.org", "msg:fail:delivery"),
            ),
            (
                b"REPORT user=ip:192.0.2.7 rcpt=x@y event=MSG:RCPT:DEFER ip=192.0.2.7 data=z",
                ReportRequest(
                    "ip:192.0.2.7", "x@y", "msg:rcpt:defer", ipaddress.ip_address("192.0.2.7")
                ),
            ),
        ],
    )
    def test_valid(self, line: bytes, expected: Request) -> None:
        """Bare and ${quote:} values parse to what Exim meant; unknown keys are ignored."""
        assert parse_request(line) == expected

    def test_eight_bit_values_are_kept_byte_exact(self) -> None:
        """A recipient that is not UTF-8 is still a recipient, byte for byte."""
        request = parse_request(b"rcpt user=auth:\xe9 rcpt=\xff\xfe@x verify=fail")
        assert isinstance(request, RcptRequest)
        assert request.user.encode("utf-8", "surrogateescape") == b"auth:\xe9"
        assert request.rcpt.encode("utf-8", "surrogateescape") == b"\xff\xfe@x"

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b"", "empty request"),
            (b"   ", "empty request"),
            (b"block user=x", "unknown verb 'block'"),
            (b"rcpt rcpt=r verify=fail", "missing required key user"),
            (b"rcpt user=u verify=fail", "missing required key rcpt"),
            (b"rcpt user=u rcpt=r", "missing required key verify"),
            (b"rcpt user=u rcpt=r verify=maybe", "verify must be ok, fail or defer"),
            (b"report user=u rcpt=r", "missing required key event"),
            (b"report user=u event=msg:fail:delivery", "missing required key rcpt"),
            (b"report user=u rcpt=r event=", "event must not be empty"),
            (b"rcpt user= rcpt=r verify=fail", "user must not be empty"),
            (b'rcpt user="" rcpt=r verify=fail', "user must not be empty"),
            (b"rcpt user=u rcpt=r verify=fail ip=300.1.1.1", "ip must be an IP address"),
            (b'check user="a\\x"', "unknown escape \\x"),
            (b'check user="abc', "unterminated quoted value for user"),
            (b"check user", "malformed field 'user'"),
            (b"check =x", "malformed field"),
            (b'check user="a"b', "junk after field"),
            (b"check user=a user=b", "duplicate key user"),
            (b"check user=" + b"x" * 1025, "user must be at most 1024 bytes (got 1025)"),
            (b'check user="a\x00b"', "NUL"),
        ],
    )
    def test_invalid(self, line: bytes, message: str) -> None:
        """A bad request is refused with a message that names what is wrong."""
        with pytest.raises(RemoteProtocolError, match=None) as info:
            parse_request(line)
        assert message in str(info.value)

    def test_user_of_exactly_1024_bytes_is_accepted(self) -> None:
        """The size limit is inclusive."""
        assert parse_request(b"check user=" + b"x" * 1024) == CheckRequest("x" * 1024)

    def test_user_exim_could_not_find_in_the_block_file_is_refused(self) -> None:
        """1024 control bytes quote to 4098 bytes, past what Exim's lsearch reads of a line:
        the fallback would never see the block (and would match a shorter key), so refuse."""
        with pytest.raises(RemoteProtocolError, match="4098 bytes once quoted for Exim's lsearch"):
            parse_request(b"check user=" + b"\x01" * 1024)
        assert parse_request(b"check user=" + b"\x01" * 1023) == CheckRequest("\x01" * 1023)


class TestConnection:
    def test_line_ends_at_lf(self) -> None:
        """shutdown=no: the request is complete at its newline, without waiting for EOF."""
        connection = PolicyConnection()
        connection.receive_data(b"check user=u")
        assert connection.next_request() is NEED_DATA
        connection.receive_data(b"\n")
        assert connection.next_request() == CheckRequest("u")

    def test_line_ends_at_eof(self) -> None:
        """Default readsocket: no newline, the half-close ends the request."""
        assert feed(b"check us", b"er=u", b"") == CheckRequest("u")

    def test_crlf_is_accepted(self) -> None:
        """A hand-typed request from a terminal (CRLF) works too."""
        assert feed(b"ping\r\n") == PingRequest()

    def test_bytes_after_the_first_line_are_ignored(self) -> None:
        """One request per connection: a second line is never read as a request."""
        assert feed(b"ping\ncheck user=x\n") == PingRequest()

    def test_eof_before_anything(self) -> None:
        """A client that connects and hangs up gets a clear error, not a crash."""
        with pytest.raises(RemoteProtocolError, match="closed before a request"):
            feed(b"")

    def test_oversized_request(self) -> None:
        """More than 4 KiB without a newline is refused before it is all buffered."""
        connection = PolicyConnection()
        connection.receive_data(b"x" * MAX_REQUEST_SIZE)
        with pytest.raises(RemoteProtocolError, match="longer than 4096"):
            connection.next_request()

    def test_request_of_exactly_the_limit(self) -> None:
        """A request whose newline is the 4096th byte is served."""
        line = b"rcpt user=u verify=fail rcpt=" + b"r" * (MAX_REQUEST_SIZE - 30) + b"\n"
        assert len(line) == MAX_REQUEST_SIZE
        assert isinstance(feed(line), RcptRequest)

    @given(data=st.binary(max_size=MAX_REQUEST_SIZE + 100), cuts=st.lists(st.integers(0, 5000)))
    def test_arbitrary_bytes_in_arbitrary_chunks(self, data: bytes, cuts: list[int]) -> None:
        """Whatever arrives, in whatever pieces, we get a request, NEED_DATA or a protocol error."""
        connection = PolicyConnection()
        start = 0
        for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
            connection.receive_data(data[start:cut])
            start = cut
            try:
                result = connection.next_request()
            except RemoteProtocolError:
                return
            if result is not NEED_DATA:
                return
        connection.receive_data(b"")
        with contextlib.suppress(RemoteProtocolError):
            assert connection.next_request() is not NEED_DATA


class TestFieldParsers:
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([b" ", b"\t", b"  ", b" \t", b""]),
                st.from_regex(rb"\A[A-Za-z0-9_.=-]{0,5}\Z"),
                st.sampled_from([b"=", b"", b"=="]),
                st.binary(max_size=8),
            ),
            max_size=6,
        )
        .map(lambda parts: b"".join(b"".join(part) for part in parts))
        .filter(lambda line: not any(c in line for c in (b'"', b"\r", b"\n")))
    )
    def test_fast_path_agrees_with_the_general_parser(self, data: bytes) -> None:
        """The quote-free fast path accepts and refuses exactly what the general parser does."""
        outcomes: list[dict[str, str] | None] = []
        for parser in (protocol._parse_bare_pairs, protocol._parse_any_pairs):
            try:
                outcomes.append(parser(b" " + data, 0))
            except RemoteProtocolError:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1]


class TestRoundTrip:
    @given(requests)
    def test_request(self, request: Request) -> None:
        """Whatever an ACL can send, we read back exactly."""
        line = serialize_request(request)
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert parse_request(line[:-1]) == request

    @given(st.sampled_from(Verdict), st.one_of(st.none(), wire_text))
    def test_reply(self, verdict: Verdict, reason: str | None) -> None:
        """A reply is one line that parses back to itself, whatever the reason holds."""
        line = Reply(verdict, reason).to_bytes()
        assert line.count(b"\n") == 1
        assert line.endswith(b"\n")
        assert parse_reply(line) == Reply(verdict, reason)

    @pytest.mark.parametrize(
        ("value", "wire"),
        [
            ("auth:alice@example.com", b"auth:alice@example.com"),
            ("", b'""'),
            ("a b", b'"a b"'),
            ('say "hi"\n', b'"say \\"hi\\"\\n"'),
            ("back\\slash", b'"back\\\\slash"'),
        ],
    )
    def test_quote(self, value: str, wire: bytes) -> None:
        """We quote the way Exim's ${quote:} does, so logs of both look alike."""
        assert quote(value) == wire

    def test_block_reply_matches_the_acl_regex(self) -> None:
        """The shipped ACL matches ^freeze\\b on the raw reply; ours starts with the word."""
        line = Reply(Verdict.FREEZE, "100 failed recipients within 1h").to_bytes()
        assert line == b'freeze reason="100 failed recipients within 1h"\n'

    def test_unknown_verdict(self) -> None:
        """A reply that is not a verdict is refused (a client must treat it as no verdict)."""
        with pytest.raises(RemoteProtocolError, match="unknown verdict"):
            parse_reply(b"FROZEN\n")
