"""Exim log lines as events, checked against lines a real Exim 4.96 wrote (tests/data/exim/)."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.userkey import fold_auth_id
from spamguardd.tools.eximlog import (
    CONTINUATION,
    UNPARSED,
    Arrival,
    Completed,
    Delivery,
    Event,
    Rejection,
    ScanCounts,
    UserKeys,
    parse_line,
    parse_timestamp,
    scan,
)

DATA = Path(__file__).parent / "data" / "exim"
MAINLOG = (DATA / "mainlog").read_text().splitlines(keepends=True)
REJECTLOG = (DATA / "rejectlog").read_text().splitlines(keepends=True)
SELECTORS = (DATA / "mainlog-selectors").read_text().splitlines(keepends=True)
LIVE = (DATA / "mainlog-live").read_text().splitlines(keepends=True)
LIVE_REJECTLOG = (DATA / "rejectlog-live").read_text().splitlines(keepends=True)
ALL_LINES = MAINLOG + REJECTLOG + SELECTORS + LIVE + LIVE_REJECTLOG


def real(fragment: str) -> str:
    """The first captured line containing *fragment* (so tests never invent a line)."""
    return next(line for line in ALL_LINES if fragment in line)


class TestRealLines:
    def test_every_captured_line_parses(self) -> None:
        """Nothing Exim wrote in the capture is left unparsed."""
        kinds = Counter(type(parse_line(line)).__name__ for line in ALL_LINES)
        assert UNPARSED not in {parse_line(line) for line in ALL_LINES}
        assert kinds["Rejection"] == 2 * 19 + 1 + 2 * 17
        assert kinds["Arrival"] >= 19
        # the TLS certificate warning's second line (twice), blank lines after taint panics
        assert kinds["Continuation"] == 4

    def test_arrival_with_authenticated_id(self) -> None:
        """``<=`` gives the message id, the id after the driver name, and the client address."""
        event = parse_line(real("<= sender@example.test H=(client.test) [127.0.0.1] P=esmtpa"))
        assert isinstance(event, Arrival)
        assert event.auth_id == "alice@example.test"
        assert event.host == "127.0.0.1"
        assert len(event.message_id) == 16

    @pytest.mark.parametrize(
        "auth_id", ['we ird "q"', "back\\slash", "colon:in:id", "caf\\303\\251@example.test"]
    )
    def test_odd_ids_are_read_whole(self, auth_id: str) -> None:
        """Spaces, quotes, colons and Exim's octal escapes stay part of the id, on both lines."""
        arrival = parse_line(real(f"A=plain_server:{auth_id} S="))
        rejection = parse_line(real(f"A=plain_server:{auth_id} rejected"))
        assert isinstance(arrival, Arrival)
        assert isinstance(rejection, Rejection)
        assert arrival.auth_id == rejection.auth_id == auth_id

    def test_unrouteable_rejection(self) -> None:
        """``rejected RCPT <x>: Unrouteable address`` is a verification failure."""
        event = parse_line(real("rejected RCPT <nobody@example.test>"))
        assert event == Rejection(
            event.at,  # type: ignore[union-attr]
            "nobody@example.test",
            "alice@example.test",
            "127.0.0.1",
            "Unrouteable address",
            verify_failed=True,
            temporary=False,
        )

    @pytest.mark.parametrize(
        "fragment",
        [
            "rejected RCPT <bad2@callout.test>: 127.0.0.1 [127.0.0.1] : SMTP error",
            "Previous (cached) callout verification failure",
        ],
    )
    def test_callout_failures(self, fragment: str) -> None:
        """A callout's 550 and a cached callout failure both count as failed verification."""
        event = parse_line(real(fragment))
        assert isinstance(event, Rejection)
        assert event.verify_failed
        assert event.auth_id == "spammer@example.test"

    def test_ipv6_relay(self) -> None:
        """An IPv6 client's address is read out of its brackets."""
        event = parse_line(real("[2001:db8:1:2::77] U=root F=<relay@example.test> rejected"))
        assert isinstance(event, Rejection)
        assert event.host == "2001:db8:1:2::77"
        assert event.auth_id is None

    def test_helo_address_literal_is_not_the_client(self) -> None:
        """``HELO [192.0.2.99]`` is logged inside the parentheses; the client is the next ``[]``."""
        rejection = parse_line(real("H=([192.0.2.99]) [127.0.0.1] F=<sender@example.test> rej"))
        arrival = parse_line(real("<= sender@example.test H=([192.0.2.99]) [127.0.0.1]"))
        assert isinstance(rejection, Rejection)
        assert isinstance(arrival, Arrival)
        assert rejection.host == arrival.host == "127.0.0.1"

    def test_delivery_time_failures(self) -> None:
        """``**`` lines name the message and the failed recipient, with or without a router."""
        remote = parse_line(real("** badlate@remote.test R=fake_remote"))
        router = parse_line(real("** late@latefail.test R=latefail"))
        bounce = parse_line(real("** sender@example.test: Unrouteable address"))
        assert isinstance(remote, Delivery)
        assert remote.failed
        assert remote.rcpt == "badlate@remote.test"
        assert isinstance(router, Delivery)
        assert router.rcpt == "late@latefail.test"
        assert isinstance(bounce, Delivery)
        assert bounce.rcpt == "sender@example.test"

    def test_delivery_and_completed(self) -> None:
        """``=>`` is a delivered recipient; ``Completed`` ends the message."""
        delivered = parse_line(real("=> good@remote.test"))
        done = parse_line(real(" Completed"))
        assert isinstance(delivered, Delivery)
        assert not delivered.failed
        assert isinstance(done, Completed)

    def test_optional_prefixes(self) -> None:
        """``+millisec``, ``log_timezone``, ``+pid`` and ``+incoming_port`` are all understood."""
        events = [parse_line(line) for line in SELECTORS]
        rejection, arrival = events[0], events[1]
        assert isinstance(rejection, Rejection)
        assert isinstance(arrival, Arrival)
        assert rejection.host == arrival.host == "192.0.2.25"
        assert rejection.auth_id == "Sel.User@Example.test"
        millis = int(SELECTORS[0][20:23])  # "2026-11-28 02:48:28.520 +0000 [16677] ..."
        assert rejection.at % 1 == pytest.approx(millis / 1000, abs=1e-5)
        assert 0 <= arrival.at - rejection.at < 1
        stamp = parse_timestamp(SELECTORS[0])
        assert stamp is not None
        assert stamp.zoned

    def test_zone_is_applied(self) -> None:
        """A zone offset moves the time to UTC."""
        line = SELECTORS[0]
        east = parse_timestamp(line.replace("+0000", "+0200", 1))
        west = parse_timestamp(line.replace("+0000", "-0130", 1))
        base = parse_timestamp(line)
        assert base is not None
        assert east is not None
        assert west is not None
        assert base.at - east.at == 7200
        assert west.at - base.at == 5400

    def test_uninteresting_lines(self) -> None:
        """Connections and queue runs are lines of no interest, not unparsed ones."""
        assert parse_line(real("SMTP connection from [127.0.0.1]")) is None
        assert parse_line(real("Start queue run")) is None
        assert parse_line(real("Message is frozen")) is None


class TestDamagedLines:
    @pytest.mark.parametrize("line", ALL_LINES)
    def test_every_prefix_of_a_real_line(self, line: str) -> None:
        """A line cut anywhere (a crash, a copy of a live log) never raises and never misleads."""
        whole = parse_line(line)
        for cut in range(len(line.rstrip("\n"))):
            part = parse_line(line[:cut])
            if isinstance(part, Rejection):
                assert isinstance(whole, Rejection)
                assert whole.rcpt == part.rcpt

    def test_cut_rejection_is_unparsed(self) -> None:
        """A rejection cut before its reason is counted as unparsed, not dropped silently."""
        line = real("rejected RCPT <lost4@example.test>")
        assert parse_line(line[: line.index("lost4") + 3]) is UNPARSED

    @pytest.mark.parametrize(
        "line",
        ["garbage", "2026-13-28 02:43:50 x", "2026-11-28 02:43:5x <= a", "\x00\xff"],
    )
    def test_not_a_log_line(self, line: str) -> None:
        """Lines without a valid time stamp are unparsed."""
        assert parse_line(line) is UNPARSED

    def test_continuations(self) -> None:
        """Indented lines and reject-log header dumps continue the entry before them."""
        assert parse_line(" Suggested action: ...") is CONTINUATION
        assert parse_line("Envelope-from: <a@b>") is CONTINUATION
        assert parse_line("P Received: from x") is CONTINUATION
        assert parse_line("\n") is CONTINUATION  # Exim 4.96 after a taint panic

    @given(st.text())
    def test_never_raises(self, text: str) -> None:
        """Arbitrary text gives an event, a sentinel or None; never an exception."""
        parse_line(text)

    @given(st.text(max_size=200))
    def test_never_raises_after_a_time_stamp(self, text: str) -> None:
        """The same after a valid time stamp and message id, where the real parsing starts."""
        parse_line("2026-11-28 02:43:50 " + text)
        parse_line("2026-11-28 02:43:50 1xX8Pm-00035Q-0q " + text)


# Fields as Exim writes them: an id is string_printing()ed (no control characters) and cannot
# contain the field that follows it; local parts and domains as in the captured lines.
_ids = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
).filter(lambda s: " S=" not in s and " rejected RCPT <" not in s and not s.endswith(" "))
_addresses = st.from_regex(r"[a-z0-9._+-]{1,20}@[a-z0-9-]{1,20}\.test", fullmatch=True)
_hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


class TestRoundTrip:
    @given(auth_id=_ids, rcpt=_addresses, host=_hosts)
    def test_rejection(self, auth_id: str, rcpt: str, host: str) -> None:
        """Fields written in the captured rejection format come back unchanged."""
        line = (
            f"2026-11-28 02:43:54 H=(client.test) [{host}] F=<promo@example.test> "
            f"A=plain_server:{auth_id} rejected RCPT <{rcpt}>: Unrouteable address\n"
        )
        event = parse_line(line)
        assert isinstance(event, Rejection)
        assert (event.auth_id, event.rcpt, event.host) == (auth_id, rcpt, host)

    @given(auth_id=_ids, host=_hosts)
    def test_arrival(self, auth_id: str, host: str) -> None:
        """Fields written in the captured arrival format come back unchanged."""
        line = (
            f"2026-11-28 02:43:57 1xX8Pt-00036g-06 <= promo@example.test H=(client.test) "
            f"[{host}] P=esmtpa A=plain_server:{auth_id} S=207 for alice@example.test\n"
        )
        event = parse_line(line)
        assert isinstance(event, Arrival)
        assert (event.auth_id, event.host) == (auth_id, host)


class TestUserKeys:
    def test_auth_ids_fold_ascii_only(self) -> None:
        """``auth:`` + the id lowered as ``${lc:}`` lowers it: ASCII letters only."""
        keys = UserKeys()
        assert keys.key("ALICE@Example.TEST", "127.0.0.1") == "auth:alice@example.test"
        assert fold_auth_id("\u00c4BC") == "\u00c4bc"

    def test_hosts_count_only_in_relay_networks(self) -> None:
        """Without relay networks, unauthenticated mail has no user; with them, its address."""
        assert UserKeys().key(None, "127.0.0.1") is None
        keys = UserKeys([ipaddress.ip_network("127.0.0.0/8")])
        assert keys.key(None, "127.0.0.1") == "ip:127.0.0.1"
        assert keys.key(None, "192.0.2.1") is None
        assert keys.key(None, None) is None
        assert keys.key(None, "not-an-ip") is None

    def test_ipv6_grouped_by_64(self) -> None:
        """IPv6 clients of one /64 are one user, written as ``${mask:...}`` writes it."""
        keys = UserKeys([ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("::1/128")])
        assert keys.key(None, "2001:db8:1:2::5") == "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64"
        assert keys.key(None, "2001:DB8:1:2::77") == keys.key(None, "2001:db8:1:2::5")
        assert keys.key(None, "2001:db8:1:3::5") == "ip:2001.0db8.0001.0003.0000.0000.0000.0000/64"
        assert keys.key(None, "::1") == "ip:0000.0000.0000.0000.0000.0000.0000.0000/64"

    def test_null_sender_and_router_failures_are_marked(self) -> None:
        """Bounces (``<= <>``) and delivery failures without a transport are told apart."""
        bounce = parse_line(real("<= <> R="))
        router = parse_line(real("** late@latefail.test R=latefail"))
        remote = parse_line(real("** badlate@remote.test R=fake_remote T="))
        assert isinstance(bounce, Arrival)
        assert bounce.null_sender
        assert isinstance(router, Delivery)
        assert not router.by_transport
        assert isinstance(remote, Delivery)
        assert remote.by_transport


class TestScan:
    def test_scan_gives_the_events_of_parse_line(self) -> None:
        """The fast scan finds exactly the events the line parser finds, in order."""
        for lines in (MAINLOG, REJECTLOG, SELECTORS, LIVE, LIVE_REJECTLOG):
            counts = ScanCounts()
            expected = [e for e in map(parse_line, lines) if isinstance(e, Event)]
            assert list(scan(lines, counts)) == expected
            assert counts.lines == len(lines)
            assert counts.unparsed == 0

    @given(st.lists(st.sampled_from(ALL_LINES) | st.text(max_size=60), max_size=30))
    def test_scan_agrees_on_any_mix(self, lines: list[str]) -> None:
        """Mixed with junk, the scan still agrees with the parser and counts the junk.

        (A line shaped like a time stamp but with an impossible date, and nothing of interest
        after it, may be passed over rather than counted: the scan does not check dates.)
        """
        counts = ScanCounts()
        parsed = [parse_line(line) for line in lines]
        assert list(scan(lines, counts)) == [e for e in parsed if isinstance(e, Event)]
        assert counts.unparsed <= sum(1 for e in parsed if e is UNPARSED)
        assert counts.lines == len(lines)

    def test_skip_sees_message_lines_only(self) -> None:
        """*skip* is asked about deliveries, failures and Completed lines, never arrivals."""
        asked: list[str] = []

        def skip(stamp: str, message_id: str, flag: str) -> bool:
            asked.append(flag)
            return flag != "**"

        events = list(scan(MAINLOG, ScanCounts(), skip))
        assert set(asked) == {"=>", "**", "Co"}
        assert not any(isinstance(e, Delivery) and not e.failed for e in events)
        assert not any(isinstance(e, Completed) for e in events)
        assert any(isinstance(e, Arrival) for e in events)


class TestOtherShapes:
    def test_exim_497_message_ids(self) -> None:
        """Exim 4.97 made message ids 23 characters long (6-11-4); both lengths are read.

        The lines are captured 4.96 lines with the id widened as 4.97 writes it.
        """
        for fragment in ("<= sender@example.test H=(client.test) [127.0.0.1] P=esmtpa", "** bad"):
            line = real(fragment)
            old_id = line[20:36]
            new_id = f"{old_id[:6]}-00000{old_id[7:13]}-{old_id[14:16]}AB"
            widened = line.replace(old_id, new_id)
            event = parse_line(widened)
            assert isinstance(event, Arrival | Delivery)
            assert event.message_id == new_id
            assert event._replace(message_id=old_id) == parse_line(line)
            assert list(scan([widened], ScanCounts())) == [event]

    def test_damaged_date_on_a_message_line(self) -> None:
        """A message line whose date cannot be is counted as unparsed by the scan."""
        line = real("<= sender@example.test").replace("-11-", "-13-", 1)
        counts = ScanCounts()
        assert list(scan([line], counts, lambda *_: False)) == []
        assert counts.unparsed == 1
        assert parse_line(line) is UNPARSED
