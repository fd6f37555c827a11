"""``spamguardctl replay`` prints exactly what it printed before it was made faster.

The files in ``tests/data/replay/golden/`` are the table, JSON and HTML that the replay wrote
for each case below before its engine was split up and sped up; any change to the output of a
case shows here as a diff. The cases cover the captured Exim logs (``tests/data/exim/``), and
two generated logs in the same line formats (``tests/data/replay/``, written by
``bench/generated_logs.py``): everyday traffic and a spam wave, also rotated, gzipped, with
their reject log, with ``+millisec +pid`` fields and with damaged lines; and a small
hand-written log of local senders (``local-senders.log``: a PHP script's ``sendmail -t``, a
``sendmail -bs`` session, the daemon's own notices, Exim's bounces).

When an output is meant to change, regenerate the files and review the diff:
``SPAMGUARDD_WRITE_GOLDEN=1 pytest tests/test_replay_golden.py``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from spamguardd.tools.replay import replay_main

DATA = Path(__file__).parent / "data"
EXIM = DATA / "exim"
GENERATED = DATA / "replay"
GOLDEN = GENERATED / "golden"
WRITE = os.environ.get("SPAMGUARDD_WRITE_GOLDEN") == "1"

LAB_NETS = ["--relay-net", "127.0.0.0/8", "--relay-net", "2001:db8::/32"]
GENERATED_NETS = ["--relay-net", "198.51.100.0/24"]


def _lines(name: str) -> list[str]:
    with gzip.open(GENERATED / name, "rt", encoding="utf-8") as log:
        return log.readlines()


def _rotated(tmp: Path) -> list[Path]:
    """The everyday log cut in two (the older half gzipped), with its reject log, newest first."""
    lines = _lines("ordinary.log.gz")
    half = len(lines) // 2
    old, new, rejects = tmp / "mainlog.1.gz", tmp / "mainlog", tmp / "rejectlog"
    with gzip.open(old, "wt", encoding="utf-8") as out:
        out.writelines(lines[:half])
    new.write_text("".join(lines[half:]), encoding="utf-8")
    rejects.write_text("".join(x for x in lines if " rejected RCPT <" in x), encoding="utf-8")
    return [new, rejects, old]


def _selectors(tmp: Path) -> list[Path]:
    """The everyday log as Exim writes it with ``+millisec +pid``: every line the long way."""
    path = tmp / "mainlog"
    lines = _lines("ordinary.log.gz")
    path.write_text(
        "".join(f"{x[:19]}.{n % 1000:03d} [{4000 + n % 97}]{x[19:]}" for n, x in enumerate(lines)),
        encoding="utf-8",
    )
    return [path]


def _damaged(tmp: Path) -> list[Path]:
    """The spam wave with a line cut short every 997 lines and a stray text line every 1,499;
    named relative to *tmp* (the replay's directory), as the report names it with the lines."""
    path = tmp / "mainlog"
    out = []
    for n, line in enumerate(_lines("spam-wave.log.gz")):
        if n % 997 == 500:
            out.append(line[: 14 + n % 60] + "\n")
        elif n % 1499 == 700:
            out.append("not a log line at all\n")
        else:
            out.append(line)
    path.write_text("".join(out), encoding="utf-8")
    return [path.relative_to(tmp)]


def _without_for_lists(tmp: Path) -> list[Path]:
    """The everyday log as Exim writes it without ``+received_recipients``: no ``for`` lists."""
    path = tmp / "mainlog"
    lines = _lines("ordinary.log.gz")
    path.write_text(
        "".join(x.split(" for ", 1)[0] + "\n" if " <= " in x else x for x in lines),
        encoding="utf-8",
    )
    return [path]


def _given(*paths: Path) -> Callable[[Path], list[Path]]:
    return lambda _tmp: list(paths)


@attrs.frozen
class Case:
    """One ``spamguardctl replay`` run and the outputs it is compared on."""

    name: str
    logs: Callable[[Path], list[Path]]
    options: tuple[str, ...]
    outputs: tuple[str, ...] = ("table", "json", "html")


CASES = [
    Case("lab", _given(EXIM / "mainlog"), ("--limit", "5/1h", *LAB_NETS)),
    Case(
        "lab-main-and-reject",
        _given(EXIM / "rejectlog", EXIM / "mainlog"),
        ("--limit", "5/1h", "--limit", "3/1m", "--limit", "50/1h,100/1d", *LAB_NETS),
    ),
    Case("lab-selectors", _given(EXIM / "mainlog-selectors"), ("--limit", "1/1h")),
    Case(
        "lab-live",
        _given(EXIM / "mainlog-live", EXIM / "rejectlog-live"),
        ("--limit", "5/1h", "--relay-net", "127.0.0.0/8", "--relay-net", "::1/128"),
    ),
    Case(
        "lab-config",
        _given(EXIM / "mainlog"),
        ("--config", str(GENERATED / "overrides.toml"), *LAB_NETS),
    ),
    Case(
        "ordinary",
        _given(GENERATED / "ordinary.log.gz"),
        ("--limit", "5/1h", "--limit", "20/1h,50/1d", "--limit", "3/10m", *GENERATED_NETS),
    ),
    Case("ordinary-unauthenticated-ignored", _given(GENERATED / "ordinary.log.gz"), ()),
    Case(
        "ordinary-rotated-with-rejectlog",
        _rotated,
        ("--limit", "5/1h", "--limit", "20/1h,50/1d", *GENERATED_NETS),
        ("table", "json"),
    ),
    Case(
        "ordinary-millisec-pid",
        _selectors,
        ("--limit", "5/1h", "--limit", "20/1h,50/1d", *GENERATED_NETS),
        ("json",),
    ),
    Case(
        "spam-wave",
        _given(GENERATED / "spam-wave.log.gz"),
        ("--limit", "20/1h", "--limit", "30/1h", "--limit", "100/1h,150/1d", *GENERATED_NETS),
        ("table", "json"),
    ),
    Case(
        "spam-wave-html",
        _given(GENERATED / "spam-wave.log.gz"),
        ("--limit", "34/1h", *GENERATED_NETS),
        ("html",),
    ),
    Case("spam-wave-damaged", _damaged, ("--limit", "30/1h", *GENERATED_NETS), ("table", "json")),
    Case(
        "ordinary-guard",
        _given(GENERATED / "ordinary.log.gz"),
        ("--config", str(GENERATED / "guard.toml"), *GENERATED_NETS),
    ),
    Case(
        "ordinary-guard-without-for-lists",
        _without_for_lists,
        ("--config", str(GENERATED / "guard.toml"), *GENERATED_NETS),
        ("table",),
    ),
    Case(
        "local-senders",
        _given(GENERATED / "local-senders.log"),
        ("--limit", "5/1h"),
        ("table", "json"),
    ),
    Case(
        "local-senders-left-out",
        _given(GENERATED / "local-senders.log"),
        ("--limit", "5/1h", "--no-local"),
        ("table",),
    ),
]


def _run(case: Case, tmp: Path, output: str, capsys: pytest.CaptureFixture[str]) -> str:
    argv = [*case.options]
    page = tmp / "report.html"
    if output == "json":
        argv.append("--json")
    elif output == "html":
        argv += ["--html", str(page)]
    capsys.readouterr()
    assert replay_main([*argv, *map(str, case.logs(tmp))]) == 0
    out = capsys.readouterr().out
    return page.read_text(encoding="utf-8") if output == "html" else out


@pytest.mark.parametrize(
    ("case", "output"),
    [pytest.param(c, o, id=f"{c.name}.{o}") for c in CASES for o in c.outputs],
)
def test_output_is_unchanged(
    case: Case,
    output: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replay writes, byte for byte, the output stored for this case."""
    golden = GOLDEN / f"{case.name}.{'txt' if output == 'table' else output}"
    monkeypatch.chdir(tmp_path)
    text = _run(case, tmp_path, output, capsys)
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    expected = golden.read_text(encoding="utf-8")
    if text != expected:  # where they part, not a 200 kB assertion message
        at = next(
            (n for n, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
            min(len(text), len(expected)),
        )
        line = text.count("\n", 0, at) + 1
        pytest.fail(
            f"{golden.name} differs from line {line} on (character {at}):\n"
            f"  got:    {text[max(0, at - 60) : at + 60]!r}\n"
            f"  stored: {expected[max(0, at - 60) : at + 60]!r}"
        )


def test_every_stored_output_has_a_case() -> None:
    """No golden file is left over from a case that no longer exists."""
    expected = {f"{c.name}.{'txt' if o == 'table' else o}" for c in CASES for o in c.outputs}
    assert {path.name for path in GOLDEN.iterdir()} == expected
