"""Local senders in Exim's main log: ``U=LOGIN`` without a client keyed ``uid:LOGIN``, as the
shipped ACLs key them, and ``spamguardctl replay --no-local``."""

from __future__ import annotations

from pathlib import Path

import pytest

from spamguardd.tools.eximlog import Arrival, Rejection, ScanCounts, UserKeys, parse_line, scan
from spamguardd.tools.replay import replay_main

LOG = Path(__file__).parent / "data" / "replay" / "local-senders.log"


@pytest.mark.parametrize(
    ("line", "local"),
    [
        (
            (
                "2026-11-28 03:04:00 1xY10A-000001-1Q <= www-data@web.test U=www-data P=local "
                "S=2048 id=x@web.test for a@remote.test"
            ),
            "www-data",
        ),
        (
            "2026-11-28 03:04:00 1xY10A-000001-1Q <= bob@web.test U=bob P=local-smtp S=70",
            "bob",
        ),
        # a TCP client's U= is its RFC 1413 ident, not a local user: keyed by the client
        (
            (
                "2026-11-28 03:16:11 1xX8v5-0004uj-2T <= relay@example.test H=(client.test) "
                "[2001:db8:1:2::77] U=root P=esmtp S=248 for alice@example.test"
            ),
            None,
        ),
    ],
)
def test_arrivals_carry_the_local_user(line: str, local: str | None) -> None:
    event = parse_line(line)
    assert isinstance(event, Arrival)
    assert event.local == local
    (scanned,) = scan([line + "\n"], ScanCounts())
    assert scanned == event


def test_a_local_smtp_rejection_carries_the_local_user() -> None:
    """``sendmail -bs``: Exim starts the fields with ``U=LOGIN`` where a client has ``H=``."""
    line = (
        "2026-11-28 03:10:00 U=bob F=<bob@web.test> rejected RCPT <nobody@example.test>: "
        "Unrouteable address"
    )
    event = parse_line(line)
    assert isinstance(event, Rejection)
    assert (event.host, event.local, event.verify_failed) == (None, "bob", True)
    assert list(scan([line + "\n"], ScanCounts())) == [event]
    client = parse_line(
        "2026-11-28 03:16:11 H=(client.test) [2001:db8:1:2::5] U=root F=<relay@example.test> "
        "rejected RCPT <v6a@example.test>: Unrouteable address"
    )
    assert isinstance(client, Rejection)
    assert client.local is None


def test_keys_of_local_senders() -> None:
    """``uid:LOGIN`` for mail without a client; not the daemon's own notices; not at all
    with ``local_senders=False``; an authenticated id still wins."""
    keys = UserKeys()
    assert keys.key(None, None, "www-data") == "uid:www-data"
    assert keys.key(None, None, "spamguardd") is None
    assert keys.key("Alice", None, "www-data") == "auth:alice"
    assert keys.key(None, "192.0.2.1", "root") is None
    assert UserKeys(local_senders=False).key(None, None, "www-data") is None


def test_replay_blocks_a_script_and_leaves_local_mail_out_on_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The PHP script and the ``-bs`` session are blocked; the notices and bounces are not;
    ``--no-local`` counts none of them."""
    assert replay_main(["--limit", "5/1h", str(LOG)]) == 0
    out = capsys.readouterr().out
    assert "uid:www-data" in out
    assert "uid:bob" in out
    assert "uid:spamguardd" not in out
    assert "uid:Debian-exim" not in out
    assert replay_main(["--limit", "5/1h", "--no-local", str(LOG)]) == 0
    assert "failed recipients counted: 0" in capsys.readouterr().out
