"""What the replay counts, against what the daemon with the shipped ACL (contrib/exim/) does:
a blocked user's bounces, the message that trips the volume guard, exemptions and overrides in
the peaks, and user keys with bytes that are not UTF-8 in the table and the JSON.

The logs are small and written here in Exim 4.96's formats (as in ``tests/data/exim/``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from spamguardd.core.config import PolicyConfig
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import UserKeys
from spamguardd.tools.replay.engine import Candidate, Report
from spamguardd.tools.replay.logs import replay

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
