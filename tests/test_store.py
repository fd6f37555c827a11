"""The block file: Exim can read it, a crash cannot tear it, damage is reported, never dropped."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.errors import StateLockedError, StoreError
from spamguardd.core.lsearch import MAX_QUOTED_KEY, too_long
from spamguardd.core.policy import Block
from spamguardd.state.blockfile import (
    COMPACT_MIN_DEAD,
    HEADER,
    BlockStore,
    decode,
    encode,
    encode_key,
)
from spamguardd.state.statelock import StateLock, holder
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


class TestBlocksInPlace:
    """A block appends a line, an unblock kills one in place: no rewrite of the whole file."""

    def test_a_block_appends_and_leaves_the_rest_alone(self, tmp_path: Path) -> None:
        store = BlockStore(tmp_path)
        assert store.open() == []
        store.apply([("auth:a", Block("auth:a", T0, "r"))])
        before = store.path.read_bytes()
        store.apply([("auth:b", Block("auth:b", T0, "r"))])
        after = store.path.read_bytes()
        assert after.startswith(before)
        line = b'"auth:b": blocked_at=2026-11-28T00:00:00Z reason=r by=auto\n'
        assert after[len(before) :] == line
        assert BlockStore(tmp_path).load() == [Block("auth:a", T0, "r"), Block("auth:b", T0, "r")]

    def test_a_file_removed_by_hand_is_written_again_with_every_block(self, tmp_path: Path) -> None:
        """`rm blocked` while the daemon runs: the next write (or the stop) puts every block
        back at the path, where Exim's fallback and the next start read it."""
        store = BlockStore(tmp_path)
        store.open()
        store.apply([(f"auth:{u}", Block(f"auth:{u}", T0, "r")) for u in "abc"])
        store.path.unlink()
        store.apply([("auth:d", Block("auth:d", T0, "r"))])
        assert store.restorations == 1
        assert [b.user for b in BlockStore(tmp_path).load()] == [f"auth:{u}" for u in "abcd"]
        store.path.unlink()
        assert store.restore_if_gone()
        assert len(BlockStore(tmp_path).load()) == 4
        assert not store.restore_if_gone()  # in place: nothing to do

    def test_an_unblocked_key_no_longer_matches_in_exim(self, tmp_path: Path) -> None:
        """The unblock turns the line into a comment; the file keeps its size; others stay."""
        store = BlockStore(tmp_path)
        store.open()
        store.apply([(u, Block(u, T0, "r")) for u in ("auth:a", "auth:b", "auth:c")])
        size = store.path.stat().st_size
        store.apply([("auth:b", None)])
        assert store.path.stat().st_size == size
        assert exim_lookup(b"auth:b", store.path) == b"MISSING"
        assert exim_lookup(b"auth:a", store.path).startswith(b"FOUND")
        assert exim_lookup(b"auth:c", store.path).startswith(b"FOUND")
        assert [b.user for b in BlockStore(tmp_path).load()] == ["auth:a", "auth:c"]

    def test_a_block_after_an_unblock_is_the_one_live_line(self, tmp_path: Path) -> None:
        store = BlockStore(tmp_path)
        store.open()
        store.apply([("auth:a", Block("auth:a", T0, "first"))])
        store.apply([("auth:a", None)])
        store.apply([("auth:a", Block("auth:a", T0 + 60, "second"))])
        assert BlockStore(tmp_path).load() == [Block("auth:a", T0 + 60, "second")]
        assert exim_lookup(b"auth:a", store.path) == (
            b"FOUND blocked_at=2026-11-28T00:01:00Z reason=second by=auto"
        )
        assert store.dead_lines == 1

    def test_a_torn_line_would_match_a_wrong_key_so_appends_start_as_comments(
        self, tmp_path: Path
    ) -> None:
        """lsearch reads an unterminated quoted key to the end of what it has, so a line torn
        after ``"auth:alice`` matches the key ``auth:alice``. Every append is a comment until
        it is whole, and a start cuts a torn one off."""
        path = tmp_path / "blocked"
        path.write_bytes(HEADER + b'"auth:alice')
        assert exim_lookup(b"auth:alice", path) == b"FOUND"  # the danger, in real Exim
        path.write_bytes(HEADER + b'#"auth:alice')  # what a crash mid-append leaves
        assert exim_lookup(b"auth:alice", path) == b"MISSING"
        store = BlockStore(tmp_path)
        assert store.open() == []
        assert path.read_bytes() == HEADER
        store.apply([("auth:alice@example.com", Block("auth:alice@example.com", T0, "r"))])
        assert [b.user for b in BlockStore(tmp_path).load()] == ["auth:alice@example.com"]

    def test_a_hand_written_last_line_without_newline_is_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "blocked"
        path.write_bytes(b'"auth:a": blocked_at=2026-11-28T00:00:00Z')
        store = BlockStore(tmp_path)
        assert [b.user for b in store.open()] == ["auth:a"]
        store.apply([("auth:b", Block("auth:b", T0, "r"))])
        assert [b.user for b in BlockStore(tmp_path).load()] == ["auth:a", "auth:b"]

    def test_dead_lines_are_compacted_away_when_they_outnumber_the_live(
        self, tmp_path: Path
    ) -> None:
        store = BlockStore(tmp_path)
        store.open()
        users = [f"auth:u{i}" for i in range(COMPACT_MIN_DEAD + 10)]
        store.apply([(u, Block(u, T0, "r")) for u in [*users, "auth:keep"]])
        store.apply([(u, None) for u in users])
        assert store.wants_compaction()
        store.compact()
        assert store.dead_lines == 0
        assert store.path.read_bytes() == encode([Block("auth:keep", T0, "r")])
        store.apply([("auth:keep", None), ("auth:new", Block("auth:new", T0, "r"))])
        assert [b.user for b in BlockStore(tmp_path).load()] == ["auth:new"]
        assert [p.name for p in tmp_path.iterdir()] == ["blocked"]

    def test_a_refused_append_is_cut_off_and_completed_by_the_retry(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = BlockStore(tmp_path)
        store.open(create=True)
        before = store.path.read_bytes()
        real = os.fdatasync

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fdatasync", full)
        with pytest.raises(StoreError, match="blocked: cannot write: No space left on device"):
            store.apply([("auth:a", Block("auth:a", T0, "r"))])
        assert store.path.read_bytes() == before
        monkeypatch.setattr(os, "fdatasync", real)
        store.apply([("auth:a", Block("auth:a", T0, "r"))])
        assert [b.user for b in BlockStore(tmp_path).load()] == ["auth:a"]


class TestStateDirectory:
    def test_a_dangling_symlink_is_refused_not_read_as_empty(self, tmp_path: Path) -> None:
        (tmp_path / "blocked").symlink_to(tmp_path / "nowhere")
        for attempt in (BlockStore(tmp_path).load, BlockStore(tmp_path).open):
            with pytest.raises(StoreError, match="blocked: is a symbolic link"):
                attempt()
        assert (tmp_path / "blocked").is_symlink()  # left as it is

    def test_a_symlink_to_a_real_file_is_refused_too(self, tmp_path: Path) -> None:
        """A rename would replace the link, not the file it points to."""
        (tmp_path / "real").write_bytes(encode([Block("auth:a", T0, "r")]))
        (tmp_path / "blocked").symlink_to(tmp_path / "real")
        with pytest.raises(StoreError, match="symbolic link"):
            BlockStore(tmp_path).open()

    def test_stale_temporary_files_are_removed(self, tmp_path: Path) -> None:
        (tmp_path / ".blocked.abc123.tmp").write_bytes(b"half a file")
        (tmp_path / "keep.tmp").write_bytes(b"not ours")
        store = BlockStore(tmp_path)
        assert store.remove_stale_temporaries() == [tmp_path / ".blocked.abc123.tmp"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp"]

    def test_the_lock_refuses_a_second_holder_and_names_the_first(self, tmp_path: Path) -> None:
        first = StateLock(tmp_path)
        first.acquire()
        assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
        assert holder(tmp_path) == os.getpid()
        with pytest.raises(StateLockedError, match=rf"pid {os.getpid()} holds .*lock"):
            StateLock(tmp_path).acquire()
        first.release()
        assert holder(tmp_path) is None
        second = StateLock(tmp_path)
        second.acquire()
        second.release()

    @pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
    def test_a_read_only_state_directory_is_refused(self, tmp_path: Path) -> None:
        state = tmp_path / "ro"
        state.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)]
        subprocess.run(mount, check=True)
        try:
            with pytest.raises(StoreError, match="Read-only file system"):
                StateLock(state).acquire()
            assert BlockStore(state).open() == []  # nothing to read, nothing created
            with pytest.raises(StoreError, match="cannot open for writing: Read-only file system"):
                BlockStore(state).open(create=True)
        finally:
            subprocess.run(["umount", str(state)], check=True)


def exim_lookup_long(key: bytes, file: Path, scratch: Path) -> bytes:
    """Like :func:`exim_lookup`, for keys too long for Exim's command line: read from a file."""
    (scratch / "key").write_bytes(key)
    read = f"${{readfile{{{scratch / 'key'}}}}}"
    expansion = f"${{lookup{{{read}}}lsearch{{{file}}}{{FOUND}}{{MISSING}}}}"
    result = subprocess.run([exim(), "-be", expansion], capture_output=True, check=True, timeout=30)
    return result.stdout.strip()


class TestLongKeys:
    """Exim's lsearch reads a line's first 4095 bytes; the quoted key must end within them."""

    def test_the_longest_key_is_found_and_one_more_byte_is_refused(self, tmp_path: Path) -> None:
        longest = "auth:" + "\x01" * ((MAX_QUOTED_KEY - 2 - 5) // 4)
        assert len(encode_key(longest)) == MAX_QUOTED_KEY
        path = tmp_path / "blocked"
        path.write_bytes(encode([Block(longest, T0, "r")]))
        raw = longest.encode()
        assert exim_lookup_long(raw, path, tmp_path) == b"FOUND"
        assert too_long(longest) is None
        assert too_long(longest + "a") == (
            "user key is 4096 bytes once quoted for Exim's lsearch, which reads at most 4095 "
            "(Exim could not find it in the block file)"
        )

    def test_past_the_limit_exim_misses_the_key_and_matches_a_wrong_one(
        self, tmp_path: Path
    ) -> None:
        """Why such keys are refused: the fallback would miss the user and hit another."""
        key = "a" * (MAX_QUOTED_KEY)  # quoted: 4097 bytes
        path = tmp_path / "blocked"
        path.write_bytes(encode([Block(key, T0, "r")]))
        assert exim_lookup_long(key.encode(), path, tmp_path) == b"MISSING"
        assert exim_lookup_long(key[: MAX_QUOTED_KEY - 1].encode(), path, tmp_path) == b"FOUND"


USERS = st.sampled_from(["auth:a", "auth:b", 'auth:"q"', "auth:tab\there", "ip:192.0.2.7"])


class TestBlocksInPlaceProperties:
    @given(
        st.lists(
            st.lists(st.tuples(USERS, st.booleans()), min_size=1, max_size=4),
            max_size=12,
        )
    )
    def test_any_sequence_of_writes_reads_back_as_the_model(
        self, batches: list[list[tuple[str, bool]]]
    ) -> None:
        """Blocks and unblocks in any order and batching: the file says what the last write
        of each user said, every user has at most one live line, and a fresh start (which
        also cuts nothing that was whole) agrees."""
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            store = BlockStore(directory)
            store.open()
            model: dict[str, Block] = {}
            for number, batch in enumerate(batches):
                changes: dict[str, Block | None] = {}
                for user, blocked in batch:
                    changes[user] = Block(user, T0 + number, f"r{number}") if blocked else None
                store.apply(list(changes.items()))
                for user, block in changes.items():
                    if block is None:
                        model.pop(user, None)
                    else:
                        model[user] = block
                if store.wants_compaction():
                    store.compact()
            path = directory / "blocked"
            data = path.read_bytes() if path.exists() else b""
            live = [line for line in data.split(b"\n") if line.startswith(b'"')]
            assert len(live) == len(model)
            reopened = BlockStore(directory)
            assert sorted(reopened.open(), key=lambda b: b.user) == sorted(
                model.values(), key=lambda b: b.user
            )
            reopened.close()
            store.close()
