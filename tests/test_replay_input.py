"""What ``spamguardctl replay`` reads: pipes and standard input, compressed logs (whole, cut
short or damaged), a file given twice, and how unparsed lines are named.

Admins feed the replay as they feed any log tool: ``zcat``, ``ssh relay cat ...``, a process
substitution. Every case is compared with the replay of the same log read as a plain file.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spamguardd.core.config import PolicyConfig
from spamguardd.tools.eximlog import UserKeys
from spamguardd.tools.replay import replay_main
from spamguardd.tools.replay.engine import Candidate
from spamguardd.tools.replay.logs import RelayLogs, replay
from spamguardd.tools.replay.report import to_json

EXIM = Path(__file__).parent / "data" / "exim"
MAINLOG = EXIM / "mainlog"
#: 8,000 lines of everyday traffic: far more than a pipe holds or a first read takes.
ORDINARY = gzip.decompress(
    (Path(__file__).parent / "data" / "replay" / "ordinary.log.gz").read_bytes()
)
NETS = ["--relay-net", "198.51.100.0/24", "--relay-net", "127.0.0.0/8"]
LIMITS = ["--limit", "5/1h", "--limit", "3/10m"]
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "bzip2": lambda data: bz2.compress(data, 1),  # blocks of 100 kB: a cut one still has some
    "xz": lzma.compress,
}


@contextlib.contextmanager
def piped(data: bytes) -> Iterator[int]:
    """The read end of a pipe that a thread fills with *data* (as ``cat`` or ``ssh`` would)."""
    read, write = os.pipe()

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), os.fdopen(write, "wb") as out:
            out.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        yield read
    finally:
        os.close(read)
        writer.join()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = replay_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        replay_main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "mainlog"
    path.write_bytes(ORDINARY)
    return path


@pytest.fixture
def expected(plain: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The JSON report of the everyday log read from a plain file."""
    code, out, _ = run(["--json", *LIMITS, *NETS, str(plain)], capsys)
    assert code == 0
    assert json.loads(out)["lines"]["read"] == ORDINARY.count(b"\n")
    return out


class TestPipes:
    @pytest.mark.parametrize("compression", ["plain", *COMPRESSORS])
    def test_a_pipe_reads_like_the_file(
        self, compression: str, expected: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``<(cat mainlog)`` or ``<(zcat ...)``: every line is read, none is lost at the start."""
        data = ORDINARY if compression == "plain" else COMPRESSORS[compression](ORDINARY)
        with piped(data) as read:
            code, out, err = run(["--json", *LIMITS, *NETS, f"/dev/fd/{read}"], capsys)
        assert (code, err) == (0, "")
        assert out == expected

    @pytest.mark.parametrize("compression", ["plain", "gzip"])
    def test_dash_is_standard_input(
        self,
        compression: str,
        expected: str,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``cat mainlog | spamguardctl replay -`` reads the log from standard input."""
        data = ORDINARY if compression == "plain" else gzip.compress(ORDINARY)
        with piped(data) as read, open(read, closefd=False) as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            code, out, err = run(["--json", *LIMITS, *NETS, "-"], capsys)
        assert (code, err) == (0, "")
        assert out == expected

    def test_dash_with_other_logs_and_relays(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Standard input merges with files, in a fleet's ``--relay`` too."""
        half = len(ORDINARY.splitlines(keepends=True)) // 2
        lines = ORDINARY.splitlines(keepends=True)
        older = tmp_path / "mainlog.1"
        older.write_bytes(b"".join(lines[:half]))
        config, limits, keys = PolicyConfig(), [Candidate.parse("5/1h")], UserKeys()
        whole = tmp_path / "mainlog"
        whole.write_bytes(ORDINARY)
        alone = to_json(replay([RelayLogs("mx1", (whole,))], config, limits, keys))
        with piped(b"".join(lines[half:])) as read, open(read, closefd=False) as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            both = to_json(replay([RelayLogs("mx1", (Path("-"), older))], config, limits, keys))
        assert both == alone

    def test_spamguardctl_reads_a_gzip_stream_on_stdin(self, expected: str) -> None:
        """``zcat``'s habit the other way round: ``gzip -c mainlog | spamguardctl replay -``."""
        ctl = Path(sys.executable).with_name("spamguardctl")
        result = subprocess.run(
            [str(ctl), "replay", "--json", *LIMITS, *NETS, "-"],
            input=gzip.compress(ORDINARY),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == expected

    def test_help_says_how(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--help`` says that ``-`` is standard input and which compressions are read."""
        with pytest.raises(SystemExit):
            replay_main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "- is standard input" in text
        assert "gzip, bzip2 or xz" in text


class TestCompressed:
    @pytest.mark.parametrize("compression", ["bzip2", "xz"])
    def test_bzip2_and_xz_are_read(
        self, compression: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """logrotate can compress with bzip2 or xz: those logs read like the plain one."""
        path = tmp_path / "mainlog.2"  # no extension: told by content
        path.write_bytes(COMPRESSORS[compression](ORDINARY))
        code, out, err = run(["--json", *LIMITS, *NETS, str(path)], capsys)
        assert (code, err) == (0, "")
        assert out == expected

    @pytest.mark.parametrize("compression", list(COMPRESSORS))
    def test_a_log_cut_short_is_replayed_as_far_as_it_goes(
        self, compression: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A compressed log copied while it was written: what is there is replayed, and a
        warning names the file and how many lines were read."""
        data = COMPRESSORS[compression](ORDINARY)
        path = tmp_path / "mainlog.2.gz"
        path.write_bytes(data[: len(data) // 2])
        code, out, err = run(["--json", *LIMITS, *NETS, str(path)], capsys)
        assert code == 0
        read = json.loads(out)["lines"]["read"]
        assert 0 < read < ORDINARY.count(b"\n")
        assert err == (
            f"spamguardctl replay: warning: {path}: {compression} data ends early (cut while it"
            f" was written or copied): replayed the {read:,} lines before\n"
        )

    def test_a_fake_gzip_header_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Gzip's magic followed by garbage: a one-line error naming the file, exit 1."""
        path = tmp_path / "t.gz"
        path.write_bytes(b"\x1f\x8b\x08garbage")
        code, out, err = run([str(path)], capsys)
        assert (code, out) == (1, "")
        assert err == (
            f"spamguardctl replay: {path}: not gzip data: it starts like gzip, but its header"
            " is not\n"
        )

    @pytest.mark.parametrize("where", ["middle", "crc"])
    def test_damaged_gzip_is_named(
        self, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A flipped byte stops the replay with the file named and what is wrong, exit 1:
        what was read of it may be wrong already."""
        data = bytearray(gzip.compress(ORDINARY))
        data[len(data) // 2 if where == "middle" else -6] ^= 0x40
        path = tmp_path / "mainlog.2.gz"
        path.write_bytes(data)
        code, out, err = run([str(path)], capsys)
        assert (code, out) == (1, "")
        assert err.startswith(f"spamguardctl replay: {path}: damaged gzip data: ")
        assert err.count("\n") == 1
        if where == "crc":
            assert "CRC check failed" in err

    @pytest.mark.parametrize("compression", ["bzip2", "xz"])
    def test_damaged_bzip2_and_xz_are_named(
        self, compression: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        data = bytearray(COMPRESSORS[compression](ORDINARY))
        data[len(data) // 2] ^= 0x40
        path = tmp_path / "mainlog.2"
        path.write_bytes(data)
        code, _, err = run([str(path)], capsys)
        assert code == 1
        assert err.startswith(f"spamguardctl replay: {path}: damaged {compression} data: ")

    def test_zstd_is_refused_by_name(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A format it cannot read is said, not replayed as unparsed lines."""
        path = tmp_path / "mainlog.2.zst"
        path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(64)))
        code, out, err = run([str(path)], capsys)
        assert (code, out) == (1, "")
        assert err.startswith(f"spamguardctl replay: {path}: zstd-compressed")
        assert err.count("\n") == 1


class TestGivenTwice:
    def test_the_same_path(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The same log twice would count its deliveries and failures twice: exit 2."""
        err = usage_error([str(MAINLOG), str(EXIM / "rejectlog"), str(MAINLOG)], capsys)
        assert f"{MAINLOG} is given twice" in err

    def test_a_hard_link(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Another name of the same file (same device and inode) is the same log."""
        link = tmp_path / "mainlog.copy"
        link.hardlink_to(MAINLOG)
        err = usage_error([str(MAINLOG), str(link)], capsys)
        assert f"{MAINLOG} and {link} are the same file" in err

    def test_across_relays(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Two relays given the same log (here by a symbolic link) are refused as well."""
        link = tmp_path / "mx2.mainlog"
        link.symlink_to(MAINLOG)
        argv = ["--relay", "mx1", str(MAINLOG), "--relay", "mx2", str(link)]
        assert f"{MAINLOG} and {link} are the same file" in usage_error(argv, capsys)

    def test_standard_input_twice(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert "- (standard input) is given twice" in usage_error(["-", "-"], capsys)


class TestUnparsedExamples:
    def test_named_by_file_and_line_with_bytes_escaped(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Unparsed lines are shown as ``FILE:LINE: text``, a byte that is not UTF-8 as
        ``\\xfd``; the JSON is valid for a strict parser (no lone surrogates)."""
        lines = MAINLOG.read_bytes().splitlines(keepends=True)
        path = tmp_path / "mainlog"
        path.write_bytes(
            b"".join(lines[:6]) + b"not a log \xfd line\tat all\n" + b"".join(lines[6:])
        )
        other = tmp_path / "rejectlog"
        other.write_bytes((EXIM / "rejectlog").read_bytes() + b"junk\n")
        code, out, _ = run(["--json", str(path), str(other)], capsys)
        assert code == 0
        examples = json.loads(out)["lines"]["unparsed_examples"]
        assert examples == [
            f"{path}:7: not a log \\xfd line\\tat all",
            f"{other}:{len((EXIM / 'rejectlog').read_bytes().splitlines()) + 1}: junk",
        ]
        out.encode("utf-8")  # a lone surrogate would raise
        # the table shows them as the JSON does, not as Python's repr of the text
        code, out, _ = run([str(path), str(other)], capsys)
        assert code == 0
        assert f"  unparsed: {path}:7: not a log \\xfd line\\tat all\n" in out

    def test_standard_input_is_named(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with piped(b"junk\n" + MAINLOG.read_bytes()) as read, open(read, closefd=False) as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            code, out, _ = run(["--json", "-"], capsys)
        assert code == 0
        assert json.loads(out)["lines"]["unparsed_examples"] == ["<stdin>:1: junk"]
