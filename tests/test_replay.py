"""Replaying captured Exim logs through the policy (tests/data/exim/, see make_eximlog.py)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamguardd.core.config import PolicyConfig
from spamguardd.core.policy import Blocked, Policy
from spamguardd.core.protocol import RcptRequest, Verify
from spamguardd.core.rate import Rate
from spamguardd.tools.eximlog import Arrival, Delivery, Rejection, UserKeys, parse_line
from spamguardd.tools.replay import engine, logs, replay_main
from spamguardd.tools.replay.engine import Candidate, Replayer, Report
from spamguardd.tools.replay.logs import replay
from spamguardd.tools.replay.report import to_html, to_json, to_table

DATA = Path(__file__).parent / "data" / "exim"
MAINLOG = DATA / "mainlog"
REJECTLOG = DATA / "rejectlog"
RELAYS = UserKeys([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")])
FIVE = Candidate.parse("5/1h")
SPAMMER = "auth:spammer@example.test"


def run(
    paths: Sequence[Path], *candidates: Candidate, config: PolicyConfig | None = None
) -> Report:
    return replay(paths, config or PolicyConfig(), candidates or (FIVE,), RELAYS)


def blocked(report: Report, index: int = 0) -> dict[str, tuple[int, int]]:
    result = report.results[index]
    return {user: (b.failures, b.frozen_after) for user, b in result.blocked.items()}


class TestReplayOfCapturedLogs:
    def test_spammer_blocked_with_frozen_recipients(self) -> None:
        """5/1h blocks the spammer at its 6th failure (one was a cached repeat); 5 later
        recipients (two messages received after the block) would have been frozen."""
        report = run([MAINLOG])
        assert blocked(report) == {SPAMMER: (6, 5)}
        assert report.unparsed == 0

    def test_main_and_reject_log_count_once(self) -> None:
        """The reject log repeats the main log's rejections; together they count once."""
        alone = to_json(run([MAINLOG]))
        both = to_json(run([MAINLOG, REJECTLOG]))
        assert both["limits"] == alone["limits"]
        assert both["peaks"] == alone["peaks"]
        assert both["failures"] == alone["failures"]

    def test_reject_log_alone(self) -> None:
        """A reject log alone still shows RCPT-time failures (no ``**`` lines in it)."""
        report = run([REJECTLOG])
        assert report.peaks[SPAMMER][3600] == 8  # 9 rejections, one a repeat within the window

    def test_file_order_does_not_matter(self) -> None:
        """Files are merged by time whatever order they are given in."""
        assert to_json(run([REJECTLOG, MAINLOG])) == to_json(run([MAINLOG, REJECTLOG]))

    def test_rotated_gzip_and_out_of_order(self, tmp_path: Path) -> None:
        """``mainlog.1.gz`` (older) given after ``mainlog`` (newer) replays like the whole log."""
        lines = MAINLOG.read_text().splitlines(keepends=True)
        half = len(lines) // 2
        with gzip.open(tmp_path / "mainlog.1.gz", "wt") as old:
            old.writelines(lines[:half])
        (tmp_path / "mainlog").write_text("".join(lines[half:]))
        split = run([tmp_path / "mainlog", tmp_path / "mainlog.1.gz"])
        whole = run([MAINLOG])
        assert to_json(split) == to_json(whole)

    def test_truncated_last_line(self, tmp_path: Path) -> None:
        """A log cut mid-line (copied while Exim wrote it) is read; the stub is counted, and
        shown with the file and line it is on."""
        text = MAINLOG.read_text()
        path = tmp_path / "mainlog"
        path.write_text(text + text.splitlines()[5][:14])
        report = run([path])
        assert report.unparsed == 1
        stub = f"{path}:{len(text.splitlines()) + 1}: {text.splitlines()[5][:14]}"
        assert report.unparsed_examples == [stub]
        assert blocked(report) == {SPAMMER: (6, 5)}

    def test_several_candidates(self) -> None:
        """Each candidate gets its own policy; a tighter one blocks more, and earlier."""
        report = run([MAINLOG], FIVE, Candidate.parse("3/1m"), Candidate.parse("50/1h,100/1d"))
        assert blocked(report, 0) == {SPAMMER: (6, 5)}
        assert blocked(report, 1) == {SPAMMER: (3, 6)}
        assert blocked(report, 2) == {}
        assert set(report.windows) == {60, 3600, 86400}

    def test_ids_and_relays_become_the_acl_keys(self) -> None:
        """Mixed-case logins fold into one user; IPv6 relays group by /64."""
        report = run([MAINLOG])
        # ALICE@ counts as alice; the router :fail: at delivery (no T=) is not reported
        assert report.peaks["auth:alice@example.test"][3600] == 2
        assert report.peaks["auth:carol@example.test"][3600] == 1  # the remote 550 (T=) is
        assert report.peaks["ip:2001.0db8.0001.0002.0000.0000.0000.0000/64"][3600] == 2
        assert "auth:caf\\303\\251@example.test" in report.peaks
        assert 'auth:we ird "q"' in report.peaks

    def test_overrides_and_exemptions_apply(self) -> None:
        """The config's overrides and exemptions are used as the daemon uses them."""
        config = PolicyConfig(
            overrides={SPAMMER: (Rate(20, 3600),)},
            exempt_networks=(ipaddress.ip_network("2001:db8::/32"),),
        )
        report = run([MAINLOG], Candidate.parse("2/1h"), config=config)
        assert SPAMMER not in report.results[0].blocked
        assert "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64" not in report.results[0].blocked
        assert "auth:alice@example.test" in report.results[0].blocked

    def test_verdicts_agree_with_the_live_policy(self) -> None:
        """Feeding the same failures straight to a Policy blocks the same users at the same
        failure: the replay adds nothing to, and drops nothing from, what the daemon decides."""
        config = PolicyConfig(failed_recipients=(Rate(5, 3600),))
        policy = Policy(config)
        seen: dict[str, int] = {}
        live: dict[str, int] = {}
        arrivals: dict[str, str] = {}
        for line in MAINLOG.read_text().splitlines():
            event = parse_line(line)
            request = None
            if isinstance(event, Rejection) and event.verify_failed:
                user = RELAYS.key(event.auth_id, event.host)
                if user is not None:
                    request = RcptRequest(user, event.rcpt, Verify.FAIL)
            elif isinstance(event, Arrival):
                user = RELAYS.key(event.auth_id, event.host)
                if user is not None:
                    arrivals[event.message_id] = user
            elif (
                isinstance(event, Delivery) and event.by_transport and event.message_id in arrivals
            ):
                request = RcptRequest(arrivals[event.message_id], event.rcpt, Verify.FAIL)
            if request is None or not isinstance(event, Rejection | Delivery):
                continue
            seen[request.user] = seen.get(request.user, 0) + 1
            decision = policy.decide(request, now=event.at, wall_now=event.at)
            if any(isinstance(effect, Blocked) for effect in decision.effects):
                live[request.user] = seen[request.user]
        report = run([MAINLOG])
        assert {user: b.failures for user, b in report.results[0].blocked.items()} == live


class TestPeaks:
    @given(st.lists(st.integers(0, 10_000), max_size=60), st.sampled_from([60, 600, 3600]))
    def test_peak_is_the_busiest_window(self, times: list[int], period: int) -> None:
        """The peak equals a brute-force count of the most failures within any window span."""
        times.sort()
        replayer = Replayer(
            PolicyConfig(failed_recipients=(Rate(1000, period),)),
            [Candidate(f"1000/{period}", (Rate(1000, period),))],
            UserKeys(),
        )
        for n, at in enumerate(times):
            replayer.feed(Rejection(float(at), f"r{n}@x", "u", None, "", True, False))
        expected = max((sum(1 for u in times if t - period < u <= t) for t in times), default=None)
        peaks = replayer.report.peaks.get("auth:u")
        assert (None if peaks is None else peaks[period]) == expected

    @settings(deadline=None)  # a replay per example, on a shared machine: not a speed test
    @given(
        st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 6)), max_size=80),
        st.sampled_from([(60,), (600, 3600), (60, 600, 86400)]),
    )
    def test_peaks_with_repeats(self, failures: list[tuple[int, int]], periods: list[int]) -> None:
        """With recipients repeated, each window's peak is the busiest span of the failures it
        counted: a recipient counts again in a window only once its last count there is a
        whole period old."""
        failures.sort()
        rates = tuple(Rate(1000, period) for period in periods)
        replayer = Replayer(PolicyConfig(), [Candidate("c", rates)], UserKeys())
        for at, rcpt in failures:
            replayer.feed(Rejection(float(at), f"r{rcpt}@x", "u", None, "", True, False))
        if not failures:
            assert replayer.report.peaks == {}
            return
        for period in periods:
            counted: list[int] = []
            last: dict[int, int] = {}
            for at, rcpt in failures:
                if rcpt not in last or at - last[rcpt] >= period:
                    last[rcpt] = at
                    counted.append(at)
            busiest = max(sum(1 for u in counted if t - period < u <= t) for t in counted)
            assert replayer.report.peaks["auth:u"][period] == busiest

    def test_repeats_within_a_window_count_once(self) -> None:
        """As in the policy, the same recipient again within the window adds nothing."""
        replayer = Replayer(PolicyConfig(), [FIVE], UserKeys())
        for at in (0.0, 10.0, 20.0, 4000.0):
            replayer.feed(Rejection(at, "same@x", "u", None, "", True, False))
        assert replayer.report.peaks["auth:u"][3600] == 1

    def test_message_map_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past MAX_MESSAGES the oldest senders are forgotten; memory does not follow the log."""
        monkeypatch.setattr(engine, "MAX_MESSAGES", 3)
        report = run([MAINLOG])
        assert report.lines_read > 100  # ran to the end with the small bound


class TestCommandLine:
    def test_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--json`` prints the documented schema."""
        args = ["--json", "--limit", "5/1h", "--relay-net", "127.0.0.0/8", str(MAINLOG)]
        assert replay_main(args) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["limits"][0]["limit"] == "5/1h"
        entry = document["limits"][0]["blocked"][0]
        assert entry["user"] == SPAMMER
        assert entry["at"].startswith("20")
        assert "T" in entry["at"]
        assert (entry["failures"], entry["frozen_after"]) == (6, 5)
        assert document["peaks"][SPAMMER]["1h"] == 9
        assert document["lines"]["read"] == len(MAINLOG.read_text().splitlines())
        assert document["lines"]["unparsed"] == 0

    def test_table_and_html(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The table names the blocked user; the HTML page is self-contained SVG."""
        page = tmp_path / "report.html"
        assert replay_main(["--limit", "5/1h", "--html", str(page), str(MAINLOG)]) == 0
        out = capsys.readouterr().out
        assert "limit 5/1h: 1 user(s) blocked" in out
        assert SPAMMER in out
        text = page.read_text()
        assert text.count("<svg") >= 2
        assert "http" not in text.replace("http-equiv", "")
        assert "spammer@example.test" in text

    @pytest.mark.parametrize(("where", "why"), [("missing/r.html", "No such file"), (".", "Is a")])
    def test_an_html_path_that_cannot_be_written_is_said_before_the_replay(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, why: str
    ) -> None:
        """Exit 1 with the path and the reason, no traceback, no table."""
        page = tmp_path / where
        assert replay_main(["--limit", "5/1h", "--html", str(page), str(MAINLOG)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"spamguardctl replay: {page}: {why}" in captured.err

    def test_config_limits_by_default(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without ``--limit`` the config's limits are the one candidate."""
        config = tmp_path / "c.toml"
        config.write_text('[limits]\nfailed_recipients = ["4/1h", "8/1d"]\n')
        assert replay_main(["--json", "--config", str(config), str(MAINLOG)]) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["limits"][0]["limit"] == "4/1h,8/1d"
        assert [b["user"] for b in document["limits"][0]["blocked"]] == [SPAMMER]

    def test_bad_config_exits_78(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid config is reported, exit 78."""
        config = tmp_path / "c.toml"
        config.write_text('mode = "loud"\n')
        assert replay_main(["--config", str(config), str(MAINLOG)]) == 78
        assert "mode" in capsys.readouterr().err

    def test_bad_limit_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A limit that is not a rate exits 2 with argparse's usage message."""
        with pytest.raises(SystemExit) as exc:
            replay_main(["--limit", "lots", str(MAINLOG)])
        assert exc.value.code == 2
        assert "expected a rate" in capsys.readouterr().err

    def test_missing_log_exits_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A log that cannot be read is named; exit 1."""
        assert replay_main([str(tmp_path / "nope")]) == 1
        assert "nope" in capsys.readouterr().err

    def test_progress(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """Progress goes to the given stream (stderr when it is a terminal)."""
        monkeypatch.setattr(logs, "_PROGRESS_LINES", 10)
        progress = tmp_path / "progress"
        with progress.open("w") as stream:
            replay([MAINLOG], PolicyConfig(), [FIVE], RELAYS, progress=stream)
        assert "replay:" in progress.read_text()


def test_html_escapes_user_keys() -> None:
    """A user key is shown as text, never as markup."""
    replayer = Replayer(PolicyConfig(), [Candidate.parse("1/1h")], UserKeys())
    replayer.feed(Rejection(0.0, "r@x", "<script>", None, "", True, False))
    page = to_html(replayer.report)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


_LIVE_LINE = re.compile(r'spamguardd: user="((?:[^"\\]|\\.)*)" rcpt=(\S+) verify=(\w+) reply=(\w+)')


def _unquote(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


class TestAgainstTheLiveDaemon:
    """``mainlog-live``: the same traffic with spamguardd (limit 5/1h) answering Exim's ACL,
    which logged each verdict. A replay of that log must reproduce them."""

    LOG = DATA / "mainlog-live"
    KEYS = UserKeys([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")])

    def live_failures(self) -> list[tuple[str, str, str]]:
        """(user key, recipient, reply) of every failed recipient, as the ACL logged them."""
        found = []
        for line in self.LOG.read_text().splitlines():
            match = _LIVE_LINE.search(line)
            if match is not None and match.group(3) == "fail":
                found.append((_unquote(match.group(1)), match.group(2), match.group(4)))
        return found

    def test_keys_are_the_acls(self) -> None:
        """The key computed from each rejection line is the key the ACL sent the daemon."""
        rejections = [
            event
            for event in map(parse_line, self.LOG.read_text().splitlines())
            if isinstance(event, Rejection)
        ]
        computed = [(self.KEYS.key(r.auth_id, r.host), r.rcpt) for r in rejections]
        assert computed == [(user, rcpt) for user, rcpt, _ in self.live_failures()]

    def test_blocks_where_the_daemon_blocked(self) -> None:
        """The replay blocks the users the daemon blocked, at the same failure."""
        live: dict[str, int] = {}
        seen: dict[str, int] = {}
        for user, _, reply in self.live_failures():
            seen[user] = seen.get(user, 0) + 1
            if reply == "freeze":
                live.setdefault(user, seen[user])
        report = replay([self.LOG], PolicyConfig(), [FIVE], self.KEYS)
        assert live == {SPAMMER: 6}
        assert {u: b.failures for u, b in report.results[0].blocked.items()} == live
        assert report.unparsed == 0  # the blank lines after Exim's taint panics continue it


class TestEdges:
    def test_candidate_with_two_rates_of_one_period(self) -> None:
        """A candidate may not have two windows of the same length, as in the config."""
        with pytest.raises(ValueError, match="same period"):
            Candidate.parse("5/1h,10/60m")

    def test_message_map_evicts_the_oldest(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past MAX_MESSAGES the oldest message is forgotten, frozen or not, with its ``**``."""
        monkeypatch.setattr(engine, "MAX_MESSAGES", 2)
        replayer = Replayer(PolicyConfig(), [Candidate.parse("1/1h")], UserKeys())
        replayer.feed(Rejection(0.0, "r@x", "u", None, "", True, False))  # blocks auth:u
        for n in range(3):
            replayer.feed(Arrival(1.0 + n, f"id{n}", "u", None))
        replayer.feed(Delivery(5.0, "id0", "late@x", failed=True))  # forgotten: not counted
        replayer.feed(Delivery(5.0, "id2", "ok@x", failed=False))
        assert replayer.report.results[0].blocked["auth:u"].frozen_after == 1
        assert replayer.report.failures == 1

    def test_recipient_memory_is_pruned(self) -> None:
        """A user with many distinct failures over a long time keeps only the window's."""
        replayer = Replayer(PolicyConfig(), [Candidate.parse("1000/1m")], UserKeys())
        for n in range(500):
            replayer.feed(Rejection(float(n * 30), f"r{n}@x", "u", None, "", True, False))
        [window] = replayer.report.peaks["auth:u"].windows
        assert len(window.last) <= 2 * len(window.times) + 32
        assert replayer.report.peaks["auth:u"][60] == 2

    def test_bad_client_address_is_no_address(self) -> None:
        """A host field that is not an IP address is treated as none, never an error."""
        keys = UserKeys([ipaddress.ip_network("0.0.0.0/0")])
        replayer = Replayer(PolicyConfig(), [FIVE], keys)
        replayer.feed(Rejection(0.0, "r@x", "u", "not-an-ip", "", True, False))
        assert replayer.report.failures == 1

    def test_damaged_line_in_a_merge(self, tmp_path: Path) -> None:
        """With several files, a message line with a damaged date is still just counted."""
        damaged = tmp_path / "damaged"
        line = next(x for x in MAINLOG.read_text().splitlines() if " Completed" in x)
        damaged.write_text(line.replace("-11-", "-13-", 1) + "\n")
        report = run([MAINLOG, damaged])
        assert report.unparsed == 1
        assert blocked(report) == {SPAMMER: (6, 5)}

    def test_empty_report_renders(self) -> None:
        """No failures at all still gives a table, JSON and a page."""
        replayer = Replayer(PolicyConfig(), [FIVE], UserKeys())
        assert "0 user(s) blocked" in to_table(replayer.report)
        assert to_json(replayer.report)["peaks"] == {}
        assert "<html>" in to_html(replayer.report)

    def test_bad_relay_net_is_a_usage_error(self) -> None:
        """A --relay-net that is not a network exits 2."""
        with pytest.raises(SystemExit) as exc:
            replay_main(["--relay-net", "nowhere", str(MAINLOG)])
        assert exc.value.code == 2

    def test_zoned_logs_report_utc(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With ``log_timezone`` the times are UTC and say so; without, they are the log's own."""
        selectors = DATA / "mainlog-selectors"
        assert replay_main(["--json", "--limit", "1/1h", str(selectors)]) == 0
        zoned = json.loads(capsys.readouterr().out)["limits"][0]["blocked"][0]
        assert zoned["user"] == "auth:sel.user@example.test"
        assert zoned["at"].endswith("Z")
        assert zoned["at"][:19] == selectors.read_text()[:19].replace(" ", "T")  # +0000 log
        assert replay_main(["--json", "--limit", "1/1h", str(MAINLOG)]) == 0
        plain = json.loads(capsys.readouterr().out)["limits"][0]["blocked"][0]
        assert not plain["at"].endswith("Z")

    def test_bounces_are_not_counted(self) -> None:
        """A failed recipient of a bounce (``F=<>``) counts for no one, as in the shipped ACL."""
        replayer = Replayer(PolicyConfig(), [FIVE], UserKeys())
        replayer.feed(Rejection(0.0, "r@x", "u", None, "", True, False, null_sender=True))
        assert replayer.report.failures == 0


def test_spamguardctl_replay_runs_the_replay() -> None:
    """``spamguardctl replay`` is the replay, with its own options, and needs no daemon."""
    ctl = Path(sys.executable).with_name("spamguardctl")
    result = subprocess.run(
        [str(ctl), "replay", "--json", "--limit", "5/1h", str(MAINLOG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["limit"] for entry in report["limits"]] == ["5/1h"]
    assert report["lines"]["read"] > 0
