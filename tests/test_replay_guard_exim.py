"""``spamguardctl replay`` with the volume guard and the early warning, on a real Exim's main
log: the accepted recipients come from the ``<=`` lines' ``for`` lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spamguardd.tools.replay import replay_main
from tests.eximlab import EximLab, wait_for


def test_replay_counts_the_accepted_recipients_exim_logged(
    exim_lab: EximLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five accepted recipients of carol in two messages: a 4/1h guard blocks her at the 4th,
    warn_at 0.5 warns her at the 2nd; the accepted count is what Exim accepted."""
    lab = exim_lab
    first = lab.send(["a@remote.test", "b@remote.test", "c@remote.test"], user="carol")
    second = lab.send(["d@remote.test", "e@remote.test"], user="carol")
    assert first.message_id is not None
    assert second.message_id is not None
    wait_for("the deliveries", lambda: lab.mx.delivered_to("e@remote.test"))
    config = tmp_path / "guard.toml"
    config.write_text('[limits]\nwarn_at = 0.5\naccepted_recipients = "4/1h"\n')
    assert replay_main(["--config", str(config), "--json", str(lab.mainlog)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] == 5
    (limit,) = report["limits"]
    assert [(b["user"], b["reason"]) for b in limit["blocked"]] == [
        ("auth:carol", "4 accepted recipients within 1h")
    ]
    assert [(w["user"], w["limit"], w["counted"]) for w in limit["warned"]] == [
        ("auth:carol", "4/1h", "accepted recipients")
    ]
