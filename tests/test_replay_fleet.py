"""Replaying a fleet: the logs of two real Exims side by side (tests/data/exim/fleet/).

``make_eximlog.py fleet`` ran two Exim 4.96 relays with their own spools and logs; a spammer
sprayed through both, three counted failures on relay-a and four on relay-b (one found at
delivery), so that neither relay alone reaches ``5/1h`` but the fleet does.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamguardd.core.config import PolicyConfig
from spamguardd.tools.eximlog import ScanCounts, UserKeys
from spamguardd.tools.replay import replay_main
from spamguardd.tools.replay.engine import Candidate, Replayer, Report
from spamguardd.tools.replay.logs import RelayLogs, replay
from spamguardd.tools.replay.merge import merge, read_events
from spamguardd.tools.replay.report import to_json, to_table

FLEET = Path(__file__).parent / "data" / "exim" / "fleet"
A, B = FLEET / "relay-a", FLEET / "relay-b"
SPAMMER = "auth:spammer"
FIVE = Candidate.parse("5/1h")


def fleet(*relays: RelayLogs | Path) -> Report:
    return replay(relays, PolicyConfig(), [FIVE], UserKeys())


def relay(name: str, *paths: Path) -> RelayLogs:
    return RelayLogs(name, paths)


def both(a: Path = A, b: Path = B) -> Report:
    return fleet(
        relay("relay-a", a / "mainlog", a / "rejectlog"),
        relay("relay-b", b / "mainlog", b / "rejectlog"),
    )


def blocks(report: Report) -> dict[str, tuple[int, int]]:
    return {u: (b.failures, b.frozen_after) for u, b in report.results[0].blocked.items()}


class TestFleet:
    def test_the_fleet_blocks_what_no_relay_alone_does(self) -> None:
        """Each relay alone stays under 5/1h; merged by time, the spammer is blocked at the
        fifth failure, and the recipients of its later messages on both relays are frozen."""
        assert blocks(fleet(A / "mainlog", A / "rejectlog")) == {}
        assert blocks(fleet(B / "mainlog", B / "rejectlog")) == {}
        report = both()
        # bad1, lost1 (a), bad2, lost2 (b), bad3 (a); then a's ok3, b's badlate (**) and ok4,
        # a's bob and ok5, b's alice and ok6
        assert blocks(report) == {SPAMMER: (5, 7)}
        assert report.peaks[SPAMMER][3600] == 7  # bad1 again on relay-a counts once
        assert report.failures == 9  # alice's nobody, and the spammer's eight lines

    def test_relay_order_does_not_matter(self) -> None:
        """The relays are merged by time, in whatever order they are given."""
        swapped = fleet(
            relay("relay-b", B / "rejectlog", B / "mainlog"),
            relay("relay-a", A / "rejectlog", A / "mainlog"),
        )
        assert to_json(swapped)["limits"] == to_json(both())["limits"]
        assert to_json(swapped)["peaks"] == to_json(both())["peaks"]

    def test_lines_are_reported_per_relay(self) -> None:
        """The report says how much of each relay's logs was read."""
        report = both()
        lines = to_json(report)["lines"]
        assert isinstance(lines, dict)
        a_lines = sum(len(p.read_text().splitlines()) for p in A.iterdir())
        b_lines = sum(len(p.read_text().splitlines()) for p in B.iterdir())
        assert lines["relays"] == {
            "relay-a": {"read": a_lines, "unparsed": 0},
            "relay-b": {"read": b_lines, "unparsed": 0},
        }
        assert lines["read"] == a_lines + b_lines
        assert f"relay relay-b: {b_lines:,} lines read, 0 unparsed" in to_table(report)

    def test_one_relay_reports_as_before(self) -> None:
        """Plain logs are one relay: no per-relay lines in the report."""
        lines = to_json(fleet(A / "mainlog"))["lines"]
        assert isinstance(lines, dict)
        assert "relays" not in lines


def _derive(tmp: Path, name: str, source: Path, edits: dict[str, str]) -> Path:
    """A copy of a relay's logs with some text replaced, its lines in time order again (each
    with the continuation lines that follow it): a fixture derived from the capture."""
    out = tmp / name
    out.mkdir()
    for log in ("mainlog", "rejectlog"):
        text = (source / log).read_text()
        for old, new in edits.items():
            text = text.replace(old, new)
        entries: list[list[str]] = []
        for line in text.splitlines(keepends=True):
            if line[:1].isdigit() or not entries:
                entries.append([line])
            else:
                entries[-1].append(line)
        entries.sort(key=lambda entry: entry[0][:19])
        (out / log).write_text("".join(line for entry in entries for line in entry))
    return out


class TestMessageIdsArePerRelay:
    """Exim's message ids are unique per host only. Derived from the capture: relay-b delivers
    the spammer's message with the recipient the remote MX refuses (``**``) in a queue run four
    seconds later, as happens when a remote MX is slow; meanwhile a message of alice's with the
    same id passes through relay-a."""

    SPAM = "1xYdlH-0001Ll-31"  # relay-b: the spammer's message received at 06:24:15
    ALICE = "1xYdlD-0001K4-1U"  # relay-a: alice's message of 06:24:11

    def derived(self, tmp: Path) -> tuple[Path, Path]:
        late = {
            f"06:24:{second} {self.SPAM} {flag}": f"06:24:19 {self.SPAM} {flag}"
            for second, flag in (("15", "**"), ("15", "=>"), ("16", "Completed"))
        }
        b = _derive(tmp, "b", B, late)
        a = _derive(tmp, "a", A, {f"06:24:11 {self.ALICE}": f"06:24:17 {self.SPAM}"})
        return a, b

    def test_same_id_on_two_relays_is_two_messages(self, tmp_path: Path) -> None:
        """Kept apart, relay-a's message does not end relay-b's: the late refusal still counts
        for the spammer, and both late recipients are frozen. Read as one relay's logs, alice's
        ``Completed`` would end the spammer's message and lose them."""
        a, b = self.derived(tmp_path)
        report = both(a, b)
        assert blocks(report) == {SPAMMER: (5, 7)}
        assert report.failures == 9
        as_one = fleet(a / "mainlog", a / "rejectlog", b / "mainlog", b / "rejectlog")
        assert as_one.failures == 8
        assert blocks(as_one)[SPAMMER][1] < 7


def test_same_failure_on_two_relays_counts_twice(tmp_path: Path) -> None:
    """A reject log repeats its main log's rejections, and the twins count once; the same
    rejection written by two relays in the same second is two failures."""
    line = next(x for x in (A / "mainlog").read_text().splitlines() if "<lost1@" in x)
    b = _derive(tmp_path, "b", B, {})
    (b / "mainlog").write_text(line + "\n" + (b / "mainlog").read_text())
    report = fleet(relay("relay-a", A / "mainlog"), relay("relay-b", b / "mainlog"))
    assert report.failures == 10
    as_one = fleet(A / "mainlog", b / "mainlog")
    assert as_one.failures == 9


class TestCommandLine:
    def test_relay_options(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--relay NAME LOGFILE...`` per relay, shell globs and all."""
        argv = ["--json", "--limit", "5/1h"]
        argv += ["--relay", "relay-a", str(A / "mainlog"), str(A / "rejectlog")]
        argv += ["--relay", "relay-b", str(B / "mainlog"), str(B / "rejectlog")]
        assert replay_main(argv) == 0
        document = json.loads(capsys.readouterr().out)
        [entry] = document["limits"][0]["blocked"]
        assert (entry["user"], entry["failures"], entry["frozen_after"]) == (SPAMMER, 5, 7)
        assert set(document["lines"]["relays"]) == {"relay-a", "relay-b"}

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--relay", "relay-a"], "at least one LOGFILE"),
            (["--relay", "a", str(A / "mainlog"), "--relay", "a", str(B / "mainlog")], "twice"),
            ([str(A / "mainlog"), "--relay", "b", str(B / "mainlog")], "not both"),
            ([], "no logs"),
        ],
    )
    def test_usage_errors(
        self, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A relay without logs, a name given twice, plain logs mixed with relays, no logs at
        all: exit 2 with a message that says what is wrong."""
        with pytest.raises(SystemExit) as exc:
            replay_main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    def test_zones_that_disagree_are_warned_of(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A relay logging with zones merged with one logging local time: a warning."""
        zoned = Path(__file__).parent / "data" / "exim" / "mainlog-selectors"
        argv = ["--relay", "a", str(A / "mainlog"), "--relay", "z", str(zoned)]
        assert replay_main(argv) == 0
        assert "only the logs of z carry time zones" in capsys.readouterr().err


# Lines in the formats of the capture, for generated traffic.
_ARRIVAL = (
    "{t} {id} <= promo@example.test H=(client.test) [127.0.0.1] P=esmtpa A=plain_server:{u}"
    " S=231 for x@callout.test"
)
_DELIVERED = (
    '{t} {id} => {r} R=fake_remote T=fake_remote_smtp H=127.0.0.1 [127.0.0.1] C="250 OK queued"'
)
_REFUSED = (
    "{t} {id} ** {r} R=fake_remote T=fake_remote_smtp H=127.0.0.1 [127.0.0.1]: SMTP error from"
    " remote mail server after RCPT TO:<{r}>: 550 5.1.1 <{r}>: no such user here"
)
_COMPLETED = "{t} {id} Completed"
_REJECTED = (
    "{t} H=(client.test) [127.0.0.1] F=<promo@example.test> A=plain_server:{u}"
    " rejected RCPT <{r}>: Unrouteable address"
)
_IDS = [f"1xYdl{c}-0001K4-1U" for c in "ABCDEFGH"]

_messages = st.lists(
    st.tuples(
        st.sampled_from(["spammer", "alice"]),  # sender
        st.integers(0, 3),  # seconds since the relay's previous line
        st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 5)), max_size=3),
        st.lists(st.integers(0, 5), max_size=3),  # rejected recipients first
    ),
    max_size=8,
)


def _relay_log(
    messages: list[tuple[str, int, list[tuple[bool, int, int]], list[int]]],
) -> tuple[str, str]:
    """A relay's main and reject log for *messages*, each id in use once at a time."""
    lines: list[tuple[int, int, str]] = []
    now = 0
    free = list(_IDS)
    busy: list[tuple[int, str]] = []  # (completed at, id)
    for user, gap, deliveries, rejected in messages:
        now += gap
        for done, message_id in [b for b in busy if b[0] < now]:
            busy.remove((done, message_id))
            free.append(message_id)
        for r in rejected:
            lines.append((now, len(lines), _REJECTED.format(t=now, u=user, r=f"r{r}@x.test")))
        if not free:
            continue
        message_id = free.pop(0)
        lines.append((now, len(lines), _ARRIVAL.format(t=now, id=message_id, u=user)))
        last = now
        for refused, delay, r in deliveries:
            template = _REFUSED if refused else _DELIVERED
            at = now + delay
            lines.append((at, len(lines), template.format(t=at, id=message_id, r=f"d{r}@x.test")))
            last = max(last, at)
        lines.append((last, len(lines), _COMPLETED.format(t=last, id=message_id)))
        busy.append((last, message_id))
    lines.sort()

    def stamp(line: str) -> str:
        seconds, rest = line.split(" ", 1)
        return f"2026-12-02 06:{int(seconds) // 60:02d}:{int(seconds) % 60:02d} {rest}\n"

    main = "".join(stamp(line) for _, _, line in lines)
    rejects = "".join(stamp(line) for _, _, line in lines if "rejected RCPT" in line)
    return main, rejects


@settings(deadline=None)  # files and two replays per example: speed is not what is tested
@given(_messages, _messages, st.floats(0, 1), st.floats(0, 1))
def test_skipping_ahead_changes_nothing(
    a: list[tuple[str, int, list[tuple[bool, int, int]], list[int]]],
    b: list[tuple[str, int, list[tuple[bool, int, int]], list[int]]],
    a_cut: float,
    b_cut: float,
) -> None:
    """Generated traffic on two relays, message ids reused across them, each main log rotated
    somewhere and given newest first: the replay, whose streams skip message lines up to their
    relay's horizon, reports exactly what feeding every line in time order reports."""
    with tempfile.TemporaryDirectory() as tmp:
        relays = []
        for name, messages, cut in (("a", a, a_cut), ("b", b, b_cut)):
            main, rejects = _relay_log(messages)
            lines = main.splitlines(keepends=True)
            older, newer = lines[: int(cut * len(lines))], lines[int(cut * len(lines)) :]
            paths = [Path(tmp) / f"{name}.{log}" for log in ("main", "reject", "main.1")]
            for path, text in zip(paths, ("".join(newer), rejects, "".join(older)), strict=True):
                path.write_text(text)
            relays.append(relay(name, *paths))
        candidates = [Candidate.parse("2/1h"), Candidate.parse("4/1h")]
        fast = replay(relays, PolicyConfig(), candidates, UserKeys())
        replayer = Replayer(PolicyConfig(), candidates, UserKeys(), relays=2)
        files = [(i, r, path) for r, logs in enumerate(relays) for i, path in enumerate(logs.paths)]
        streams = [
            read_events(io.StringIO(path.read_text()), ScanCounts(), n)
            for n, (_, _, path) in enumerate(files)
        ]
        replayer.feed_merged(merge(streams, [r for _, r, _ in files]))
        assert to_json(fast)["limits"] == to_json(replayer.report)["limits"]
        assert to_json(fast)["peaks"] == to_json(replayer.report)["peaks"]
        assert fast.failures == replayer.report.failures


def test_no_logs_is_an_empty_report() -> None:
    """Nothing to read, nothing found: an empty report rather than an error."""
    report = replay([], PolicyConfig(), [FIVE], UserKeys())
    assert (report.lines_read, report.failures, report.peaks) == (0, 0, {})
