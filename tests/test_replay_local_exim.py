"""``spamguardctl replay`` on the main log of a real Exim: local senders keyed as the ACLs key
them (``uid:LOGIN``), agreeing with what the daemon did while the mail went through."""

from __future__ import annotations

import json

import pytest

from spamguardd.tools.eximlog import Arrival, Rejection, parse_line
from spamguardd.tools.replay import replay_main
from tests.eximlab import EximLab, wait_for
from tests.test_exim import debian_config


def test_replay_blocks_the_local_users_the_daemon_blocked(
    exim_lab: EximLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script's ``sendmail -t`` (refused at delivery) and a ``sendmail -bs`` session (refused
    at RCPT) are blocked by the daemon and by the replay alike; the daemon's own notices are
    not, and ``--no-local`` leaves them all out."""
    lab = exim_lab
    spray = lab.submit_local([f"bad{i}@remote.test" for i in range(3)], login="www-data")
    lab.wait_queue_settled(spray)
    notice = lab.submit_local([f"bad{i}@remote.test" for i in range(4)], login="spamguardd")
    lab.wait_queue_settled(notice)
    debian, defines = debian_config(lab)
    smtp = ["EHLO localhost", "MAIL FROM:<root@localhost>"]
    rcpts = [f"RCPT TO:<nosuch{i}@localhost>" for i in range(3)]
    lab.run_exim(
        *defines, "-bs", stdin="\r\n".join([*smtp, *rcpts, "QUIT"]) + "\r\n", config=debian
    )
    wait_for("uid:www-data's block", lambda: lab.spamguard.is_blocked("uid:www-data"))
    assert lab.spamguard.is_blocked("uid:root")
    assert not lab.spamguard.is_blocked("uid:spamguardd")

    lines = lab.mainlog.read_text().splitlines()
    arrivals = [e for e in map(parse_line, lines) if isinstance(e, Arrival) and e.local]
    assert {e.local for e in arrivals} >= {"www-data", "spamguardd"}
    rejections = [e for e in map(parse_line, lines) if isinstance(e, Rejection)]
    assert {e.local for e in rejections if e.host is None} == {"root"}

    assert replay_main(["--limit", "3/1h", "--json", str(lab.mainlog)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(b["user"] for b in report["limits"][0]["blocked"]) == [
        "uid:root",
        "uid:www-data",
    ]
    assert replay_main(["--limit", "3/1h", "--json", "--no-local", str(lab.mainlog)]) == 0
    assert json.loads(capsys.readouterr().out)["limits"][0]["blocked"] == []
