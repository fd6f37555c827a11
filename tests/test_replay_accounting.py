"""What the replay counts, against what the daemon with the shipped ACL (contrib/exim/) does:
a blocked user's bounces, the message that trips the volume guard, exemptions and overrides in
the peaks, and user keys with bytes that are not UTF-8 in the table and the JSON.

The logs are small and written here in Exim 4.96's formats (as in ``tests/data/exim/``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from spamguardd.core.config import PolicyConfig
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import UserKeys
from spamguardd.tools.replay.engine import Candidate, Report
from spamguardd.tools.replay.logs import replay
from spamguardd.tools.replay.report import to_html, to_json, to_table

RELAY = UserKeys([ipaddress.ip_network("127.0.0.2/32")])
FIVE = Candidate.parse("5/1h")
DAY = "2026-12-02"


def _replay(
    tmp_path: Path,
    lines: list[str],
    config: PolicyConfig | None = None,
    candidate: Candidate = FIVE,
) -> Report:
    log = tmp_path / "mainlog"
    log.write_bytes(
        "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"),
    )
    return replay([log], config or PolicyConfig(), [candidate], RELAY)


def _rejections(at: str, client: str, auth: str, *rcpts: str) -> list[str]:
    login = f" A=plain:{auth}" if auth else ""
    return [
        f"{DAY} {at} H=(c) [{client}] F=<s@example.test>{login} rejected RCPT <{rcpt}>: "
        "Callout verification failed:"
        for rcpt in rcpts
    ]


def _message(  # noqa: PLR0913 - one log entry's fields
    at: str,
    message_id: str,
    sender: str,
    origin: str,
    rcpts: list[str],
    *,
    listed: bool = True,
    failed: tuple[str, ...] = (),
) -> list[str]:
    """A message's ``<=`` line (with its ``for`` list when *listed*), a delivery per
    recipient (``**`` by the transport for those in *failed*) and its ``Completed``."""
    arrival = f"{DAY} {at} {message_id} <= {sender} {origin} S=500"
    lines = [arrival + (" for " + " ".join(rcpts) if listed else "")]
    for rcpt in rcpts:
        if rcpt in failed:
            lines.append(
                f"{DAY} {at} {message_id} ** {rcpt} R=remote T=remote_smtp H=mx [192.0.2.1]: "
                f"SMTP error from remote mail server after RCPT TO:<{rcpt}>: 550 no such user"
            )
        else:
            lines.append(f'{DAY} {at} {message_id} => {rcpt} R=remote T=remote_smtp C="250 OK"')
    lines.append(f"{DAY} {at} {message_id} Completed")
    return lines


RELAYED = "H=(c) [127.0.0.2] P=esmtp"


def _frozen(report: Report) -> dict[str, int]:
    return {user: b.frozen_after for user, b in report.results[0].blocked.items()}


class TestBounces:
    def test_a_blocked_users_bounce_is_frozen(self, tmp_path: Path) -> None:
        """The ACL asks the daemon about a bounce too and freezes it when its user is blocked:
        its six recipients are frozen after the block, besides the ordinary message. Their
        failures at delivery are not reported (event_action skips the null sender)."""
        bad = [f"bad-b{n}@remote.test" for n in range(6)]
        report = _replay(
            tmp_path,
            [
                *_rejections("10:00:00", "127.0.0.2", "", *(f"bad-r{n}@r.test" for n in range(5))),
                *_message("10:00:01", "1xYnIO-0007i4-1W", "s@x", RELAYED, ["good@r.test"]),
                *_message("10:00:02", "1xYnIR-0007kV-0b", "<>", RELAYED, bad, failed=tuple(bad)),
            ],
        )
        assert _frozen(report) == {"ip:127.0.0.2": 7}
        assert report.failures == 5

    def test_exims_own_bounces_are_left_alone(self, tmp_path: Path) -> None:
        """A bounce Exim made itself (``U=Debian-exim P=local``) passes no ACL that asks the
        daemon (the non-SMTP one leaves the null sender alone): nothing of it is counted."""
        local = "R=1xYnIZ-0007qX-1J U=Debian-exim P=local"
        report = _replay(
            tmp_path,
            _message("10:00:02", "1xYnIZ-0007qb-1L", "<>", local, ["x@example.test", "y@e.test"]),
            PolicyConfig(accepted_recipients=(Rate(1, 3600),)),
        )
        assert report.accepted == 0
        assert not report.results[0].blocked

    def test_the_volume_guard_counts_bounce_recipients(self, tmp_path: Path) -> None:
        """The ACL asks about a bounce's recipients with verify=ok: the guard counts them."""
        rcpts = [f"r{n}@r.test" for n in range(4)]
        report = _replay(
            tmp_path,
            _message("10:00:00", "1xYnIR-0007kV-0b", "<>", "H=(c) [127.0.0.2] P=esmtp", rcpts),
            PolicyConfig(accepted_recipients=(Rate(3, 3600),)),
            Candidate.parse("1000/1h"),
        )
        assert report.accepted == 4
        assert _frozen(report) == {"ip:127.0.0.2": 4}


AUTH_VOL = "H=(vm) [127.0.0.1] P=esmtpa A=plain:vol"
GUARD = PolicyConfig(accepted_recipients=(Rate(3, 3600),))


class TestVolumeGuardFreezesTheTrippingMessage:
    def _log(self, *, listed: bool) -> list[str]:
        return [
            *_message(
                "10:00:00",
                "1xYnPH-0003ms-2B",
                "vol@x",
                AUTH_VOL,
                [f"good-v{n}@r.test" for n in range(1, 5)],
                listed=listed,
            ),
            *_message("10:00:02", "1xYnPJ-0003n1-05", "vol@x", AUTH_VOL, ["good-v5@r.test"]),
        ]

    def test_with_for_lists(self, tmp_path: Path) -> None:
        """3/1h blocks at the 4th recipient of the first message, whose freeze holds all of
        it: 4 + 1 recipients frozen, as the live daemon froze them."""
        report = _replay(tmp_path, self._log(listed=True), GUARD, Candidate.parse("1000/1h"))
        assert _frozen(report) == {"auth:vol": 5}

    def test_without_for_lists(self, tmp_path: Path) -> None:
        """Counted at delivery: the block at the 4th delivery freezes the message's earlier
        deliveries too."""
        report = _replay(tmp_path, self._log(listed=False), GUARD, Candidate.parse("1000/1h"))
        assert _frozen(report) == {"auth:vol": 5}

    def test_failures_after_a_block_of_the_guard_are_peaked(self, tmp_path: Path) -> None:
        """A user blocked by the guard before any failure has its later failures in the peaks,
        as every counted failure is (they were counted, but the user had no peaks)."""
        lines = [
            *_message("10:00:00", "1xYnPH-0003ms-2B", "vol@x", AUTH_VOL, ["a@r", "b@r", "c@r"]),
            *_rejections("10:01:00", "127.0.0.1", "vol", "x1@r", "x2@r"),
        ]
        report = _replay(tmp_path, lines, GUARD, Candidate.parse("1000/1h"))
        assert report.failures == 2
        assert report.peaks["auth:vol"][3600] == 2
        assert "auth:vol" in to_table(report).split("peak failures")[1]


class TestExemptionsAndOverrides:
    def test_exempt_users_are_neither_counted_nor_peaked(self, tmp_path: Path) -> None:
        """Exempt by user, or by the client's network (for that client only, as the daemon
        decides per query): none of it is counted, peaked or drawn."""
        config = PolicyConfig(
            exempt_users=frozenset({"auth:trusted"}),
            exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),),
        )
        report = _replay(
            tmp_path,
            [
                *_rejections("10:00:00", "127.0.0.1", "trusted", *(f"t{n}@r" for n in range(7))),
                *_rejections("10:00:01", "192.0.2.7", "roamer", *(f"e{n}@r" for n in range(7))),
                *_rejections("10:00:02", "127.0.0.1", "roamer", "x1@r", "x2@r"),
            ],
            config,
        )
        assert report.failures == 2
        assert set(report.peaks) == {"auth:roamer"}
        assert report.peaks["auth:roamer"][3600] == 2
        table, page = to_table(report), to_html(report)
        assert "trusted" not in table
        assert "trusted" not in page
        assert "fill='#d00'" not in page  # no bar reaches a limit

    def test_an_override_is_compared_with_its_own_limit(self, tmp_path: Path) -> None:
        """A user with 20/1h of its own and a peak of 8 is no red bar against the candidate's
        3/1h; every bar names its user, peak and limit."""
        config = PolicyConfig(overrides={"auth:bulk": (Rate(20, 3600),)})
        report = _replay(
            tmp_path,
            [
                *_rejections("10:00:00", "127.0.0.1", "bulk", *(f"b{n}@r" for n in range(8))),
                *_rejections("10:00:01", "127.0.0.1", "spam", *(f"s{n}@r" for n in range(4))),
            ],
            config,
            Candidate.parse("3/1h"),
        )
        page = to_html(report)
        found = re.findall(r"fill='(#[0-9a-f]+)'><title>auth:(\w+):", page)
        bars = {user: fill for fill, user in found}
        assert bars == {"bulk": "#93c", "spam": "#d00"}
        assert "<title>auth:bulk: peak 8 within 1h, limit 20/1h (override)</title>" in page
        assert "<title>auth:spam: peak 4 within 1h, limit 3/1h</title>" in page

    def test_the_chart_says_how_many_users_it_leaves_out(self, tmp_path: Path) -> None:
        """A chart draws the 200 highest peaks and says so when there were more users."""
        lines = [
            line
            for n in range(201)
            for line in _rejections(
                "10:00:00", "127.0.0.1", f"u{n:03d}", *(f"a{k}@r" for k in range(1 + n % 3))
            )
        ]
        page = to_html(_replay(tmp_path, lines))
        assert "<h4>peak failures within 1h, per user (the 200 highest of 201 users)</h4>" in page
        assert page.count("<rect") == 200
        assert "auth:u198:" not in page  # the last by name of the lowest peaks
        assert "auth:u195:" in page


class TestBytesThatAreNotUtf8:
    def test_table_and_json_escape_them(self, tmp_path: Path) -> None:
        """A NUL and a lone 8-bit byte in an authenticated id reach neither the terminal nor
        the JSON raw: both show ``\\x00`` and ``\\xe9``, and the JSON is valid UTF-8."""
        report = _replay(
            tmp_path,
            [
                *_rejections("10:00:00", "127.0.0.1", "b\udce9b", *(f"r{n}@r" for n in range(6))),
                *_rejections("10:00:01", "127.0.0.1", "n\x00l", "z@r"),
            ],
        )
        table = to_table(report)
        assert "auth:b\\xe9b" in table
        assert "auth:n\\x00l" in table
        assert "\udce9" not in table
        assert "\x00" not in table
        document = json.dumps(to_json(report), ensure_ascii=False).encode("utf-8")
        parsed = json.loads(document)
        assert "auth:b\\xe9b" in parsed["peaks"]
        assert parsed["limits"][0]["blocked"][0]["user"] == "auth:b\\xe9b"
        page = to_html(report)
        assert "auth:b\\xe9b" in page
        page.encode("utf-8")  # written as UTF-8: no lone surrogate left in it
