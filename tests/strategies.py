"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from spamguardd.core.policy import Block
from spamguardd.core.protocol import (
    ENCODING,
    ERRORS,
    MAX_USER_SIZE,
    CheckRequest,
    PingRequest,
    RcptRequest,
    ReportRequest,
    Request,
    Verify,
)


def _decode(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


#: Any byte string Exim could hand us, as the str the protocol maps it to (8-bit safe).
wire_text = st.binary(max_size=200).map(_decode)

#: User keys the daemon accepts: 1 to 1024 bytes, no NUL.
user_keys = (
    st.one_of(
        st.binary(min_size=1, max_size=80),
        st.from_regex(rb"\A(auth|ip):[a-z0-9.@_-]{1,40}\Z"),
        st.binary(min_size=MAX_USER_SIZE - 2, max_size=MAX_USER_SIZE),
    )
    .filter(lambda raw: b"\x00" not in raw)
    .map(_decode)
)

ip_addresses = st.one_of(st.none(), st.ip_addresses(v=4), st.ip_addresses(v=6)).map(
    lambda ip: None if ip is None else ipaddress.ip_address(ip)
)

rcpt_requests = st.builds(
    RcptRequest,
    user=user_keys,
    rcpt=wire_text,
    verify=st.sampled_from(Verify),
    ip=ip_addresses,
    sender=st.one_of(st.none(), wire_text),
)

report_requests = st.builds(
    ReportRequest,
    user=user_keys,
    rcpt=wire_text,
    event=st.sampled_from(["msg:fail:delivery", "msg:rcpt:defer", "msg:fail:internal"]),
    ip=ip_addresses,
)

requests: st.SearchStrategy[Request] = st.one_of(
    rcpt_requests, report_requests, st.builds(CheckRequest, user=user_keys), st.just(PingRequest())
)

blocks = st.builds(
    Block,
    user=user_keys,
    blocked_at=st.integers(min_value=0, max_value=2**33).map(float),
    reason=wire_text,
    by=st.sampled_from(["auto", "admin", "admin:0", "admin:1000"]),
)
