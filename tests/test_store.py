"""The block file: Exim can read it, a crash cannot tear it, damage is reported, never dropped."""

from __future__ import annotations

import grp
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.errors import StoreError
from spamguardd.core.policy import Block
from spamguardd.state.blockfile import BlockStore, decode, encode, encode_key
from tests.helpers import T0
from tests.strategies import blocks

ODD_KEYS = [
    "auth:alice@example.com",
    "ip:192.0.2.7",
    "ip:2001:db8:1:2::/64",
    "auth:with space@example.com",
    'auth:say "hi"@example.com',
    "auth:back\\slash",
    "auth:colon:in:id",
    "auth:tab\there",
    "auth:new\nline",
    "auth:caf\u00e9@example.com",
    "auth:\udcff\udcfe8bit",  # bytes 0xff 0xfe, not UTF-8 (surrogateescape)
    "auth:#not-a-comment",
    "auth:ctrl\x01\x7f",
]


def exim() -> str:
    path = shutil.which("exim") or shutil.which("exim", path="/usr/sbin:/usr/bin")
    assert path, "Debian's exim4-daemon-light is needed for this test; `make test` installs it"
    return path


def exim_lookup(key: bytes, file: Path) -> bytes:
    """Ask a real Exim what ${lookup{KEY}lsearch{FILE}} finds."""
    # ${quote_lsearch:} hands the raw key through unchanged; \\ and $ inside the key are escaped
    # for the expansion itself
    literal = key.replace(b"\\", b"\\\\").replace(b"$", b"\\$").replace(b"}", b"\\}")
    literal = literal.replace(b"\n", b"\\n").replace(b"\t", b"\\t")
    literal = literal.replace(b"\x01", b"\\x01").replace(b"\x7f", b"\\x7f")
    expansion = b"${lookup{" + literal + b"}lsearch{" + bytes(file) + b"}{FOUND $value}{MISSING}}"
    result = subprocess.run([exim(), "-be", expansion], capture_output=True, check=True, timeout=30)
    return result.stdout.strip()


class TestEximReadsIt:
    def test_real_exim_finds_every_key(self, tmp_path: Path) -> None:
        """Exim's own lsearch finds keys with @, :, spaces, quotes, backslashes, 8-bit bytes."""
        path = tmp_path / "blocked"
        path.write_bytes(
            encode(Block(k, T0, f"reason {i}", "auto") for i, k in enumerate(ODD_KEYS))
        )
        for i, key in enumerate(ODD_KEYS):
            found = exim_lookup(key.encode("utf-8", "surrogateescape"), path)
            assert (
                found
                == f'FOUND blocked_at=2026-11-28T00:00:00Z reason="reason {i}" by=auto'.encode()
            ), key

    def test_real_exim_misses_other_keys(self, tmp_path: Path) -> None:
        """A key that is not blocked, or a prefix of one, is not found (no comment-line match)."""
        path = tmp_path / "blocked"
        path.write_bytes(encode([Block("auth:alice@example.com", T0, "x")]))
        assert exim_lookup(b"auth:alice", path) == b"MISSING"
        assert exim_lookup(b"auth", path) == b"MISSING"
        assert exim_lookup(b"# spamguardd block list", path) == b"MISSING"

    def test_keys_are_always_quoted(self) -> None:
        """lsearch ends a bare key at the first colon, and every user key has one."""
        assert encode_key("auth:alice@example.com") == b'"auth:alice@example.com"'


class TestFormat:
    def test_layout(self) -> None:
        """One readable line per user, sorted, after a comment that says what the file is."""
        data = encode(
            [
                Block("ip:192.0.2.7", T0 + 61, "100 failed recipients within 1h", "auto"),
                Block("auth:a@x", T0, 'stolen "password"', "admin:0"),
            ]
        )
        lines = data.decode().splitlines()
        assert lines[0].startswith("# spamguardd block list")
        assert lines[2:] == [
            '"auth:a@x": blocked_at=2026-11-28T00:00:00Z reason="stolen \\"password\\"" by=admin:0',
            (
                '"ip:192.0.2.7": blocked_at=2026-11-28T00:01:01Z '
                'reason="100 failed recipients within 1h" by=auto'
            ),
        ]

    @given(st.lists(blocks, unique_by=lambda b: b.user, max_size=20))
    def test_round_trip(self, items: list[Block]) -> None:
        """decode(encode(x)) == x for any block list."""
        decoded = decode(encode(items), source="blocked")
        assert sorted(decoded, key=lambda b: b.user) == sorted(items, key=lambda b: b.user)

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b"auth:a@x: blocked_at=2026-11-28T00:00:00Z", "must be in double quotes"),
            (b'"auth:a@x: blocked_at=2026-11-28T00:00:00Z', "no closing double quote"),
            (b'"auth:a\\q": blocked_at=2026-11-28T00:00:00Z', "unknown escape"),
            (b'"auth:a": reason="x"', "missing blocked_at="),
            (b'"auth:a": blocked_at=yesterday', "expected a UTC time"),
            (b'"auth:a": blocked_at=2026-11-28T00:00:00Z reason="open', "unterminated"),
        ],
    )
    def test_damaged_line_is_named(self, line: bytes, message: str) -> None:
        """A damaged line stops loading with file:line: what is wrong."""
        data = b'# header\n"auth:ok": blocked_at=2026-11-28T00:00:00Z\n' + line + b"\n"
        with pytest.raises(StoreError, match=rf"^/var/lib/x/blocked:3: .*{message}"):
            decode(data, source="/var/lib/x/blocked")

    def test_duplicate_user_is_damage(self) -> None:
        """A user listed twice is reported, not silently merged."""
        line = b'"auth:a": blocked_at=2026-11-28T00:00:00Z\n'
        with pytest.raises(StoreError, match=r"blocked:2: 'auth:a' is listed twice"):
            decode(line * 2, source="blocked")

    def test_hand_written_entry_defaults(self) -> None:
        """An admin's hand-added line without reason or by= loads as an admin block."""
        [block] = decode(b'"auth:a": blocked_at=2026-11-28T00:00:00Z\n', source="b")
        assert block == Block("auth:a", T0, "", "admin")


class TestBlockStore:
    def test_save_and_load(self, tmp_path: Path) -> None:
        """What is saved is what is loaded; the file is 0640 for Exim's group to read."""
        store = BlockStore(tmp_path / "state")
        store.prepare()
        assert store.load() == []
        store.save([Block("auth:a", T0, "r")])
        assert BlockStore(tmp_path / "state").load() == [Block("auth:a", T0, "r")]
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o640
        assert [p.name for p in store.path.parent.iterdir()] == ["blocked"]

    def test_crash_before_rename_keeps_the_old_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If writing fails between the temp file and the rename, the old list is intact."""
        store = BlockStore(tmp_path)
        store.save([Block("auth:old", T0, "r")])
        before = store.path.read_bytes()

        def crash(self: Path, target: Path) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Path, "replace", crash)
        with pytest.raises(StoreError, match=r"blocked: cannot write: No space left on device"):
            store.save([Block("auth:old", T0, "r"), Block("auth:new", T0, "r")])
        assert store.path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["blocked"]  # no temp file left over

    def test_unreadable_state_dir(self, tmp_path: Path) -> None:
        """A state directory that cannot be created is a clear error."""
        (tmp_path / "file").write_text("")
        store = BlockStore(tmp_path / "file" / "state")
        with pytest.raises(StoreError, match="cannot create"):
            store.prepare()


class TestStateDirectoryGroup:
    def test_created_directory_gets_the_group(self, tmp_path: Path) -> None:
        """Exim must be able to search the directory of the block file, not only read it."""
        gid = grp.getgrnam("Debian-exim").gr_gid
        store = BlockStore(tmp_path / "state", group=gid)
        store.prepare()
        info = (tmp_path / "state").stat()
        assert (info.st_gid, stat.S_IMODE(info.st_mode) & 0o050) == (gid, 0o050)

    def test_existing_directory_is_left_alone(self, tmp_path: Path) -> None:
        """An existing directory (systemd's StateDirectory=) keeps its owner's choice."""
        existing = tmp_path / "state"
        existing.mkdir(mode=0o751)
        before = existing.stat()
        BlockStore(existing, group=grp.getgrnam("Debian-exim").gr_gid).prepare()
        after = existing.stat()
        assert (after.st_gid, after.st_mode) == (before.st_gid, before.st_mode)
