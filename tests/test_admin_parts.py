"""The parts behind the admin socket: protocol, policy changes, journal, latency, config."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import adminproto
from spamguardd.core.adminproto import AdminReplyError, AdminRequestError, Command
from spamguardd.core.config import Config, PolicyConfig
from spamguardd.core.errors import ConfigError
from spamguardd.core.latency import percentiles
from spamguardd.core.policy import Policy
from spamguardd.core.protocol import RcptRequest, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.daemon.metrics import LatencyHistogram
from spamguardd.state.journal import Journal, read_journal
from tests.helpers import T0

FIVE = PolicyConfig(failed_recipients=(Rate(5, 3600), Rate(20, 86400)))


def fail(user: str, rcpt: str) -> RcptRequest:
    return RcptRequest(
        user=user, rcpt=rcpt, verify=Verify.FAIL, ip=ipaddress.ip_address("192.0.2.7")
    )


class TestAdminProtocol:
    @given(
        command=st.sampled_from(sorted(adminproto.USER_COMMANDS)),
        user=st.text(min_size=1, max_size=50).filter(lambda u: "\x00" not in u),
    )
    def test_round_trip_any_user(self, command: str, user: str) -> None:
        """Any user key, including surrogate-escaped bytes, survives encode/parse unchanged."""
        sent = Command(command, user)
        line = adminproto.encode_command(sent)
        assert line.endswith(b"\n")
        assert line.isascii()
        assert adminproto.parse_command(line) == sent

    def test_non_utf8_user_key(self) -> None:
        """A key that is not UTF-8 (kept with surrogate escapes) is carried byte for byte."""
        user = b"auth:\xff\xfe".decode("utf-8", "surrogateescape")
        sent = Command("block", user, "why")
        assert adminproto.parse_command(adminproto.encode_command(sent)) == sent

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b"block auth:x", "not a JSON object"),
            (b"[1]", "not a JSON object"),
            (b'{"command": "frob"}', "unknown command 'frob'"),
            (b'{"command": "block"}', "block needs a user key"),
            (b'{"command": "show", "user": ""}', "show needs a user key"),
            (b'{"command": "list", "user": "a"}', "list takes no user"),
            (b'{"command": "reset", "user": "a", "reason": "x"}', "reset takes no reason"),
            (b'{"command": "list", "force": true}', "unknown field 'force'"),
            (b'{"command": "block", "user": "a", "reason": 5}', "reason must be a string"),
        ],
    )
    def test_bad_requests_say_why(self, line: bytes, message: str) -> None:
        """Every refused request names its problem."""
        with pytest.raises(AdminRequestError, match=message):
            adminproto.parse_command(line)

    def test_replies(self) -> None:
        """Replies are one sorted ASCII JSON line; a reply without ok is not a reply."""
        line = adminproto.encode_reply(adminproto.ok(user="auth:é", b=1))
        assert line == b'{"b":1,"ok":true,"user":"auth:\\u00e9"}\n'
        assert adminproto.decode_reply(line) == {"ok": True, "user": "auth:é", "b": 1}
        assert adminproto.decode_reply(adminproto.encode_reply(adminproto.error("no")))[
            "error"
        ] == ("no")
        for bad in (b"pong", b"{}", b'{"ok": false}'):
            with pytest.raises(AdminReplyError):
                adminproto.decode_reply(bad)


class TestPolicyAdmin:
    def test_block_unblock_bump_generation(self) -> None:
        """Admin blocks and unblocks change the block list and its generation like auto blocks."""
        policy = Policy(FIVE)
        block, new = policy.block("auth:a", "phished", by="admin:0", wall_now=T0 + 0.7)
        assert new
        assert (block.blocked_at, block.by, policy.generation) == (T0, "admin:0", 1)
        again, new = policy.block("auth:a", "other", by="admin:5", wall_now=T0 + 99)
        assert (again, new, policy.generation) == (block, False, 1)
        reply = policy.decide(fail("auth:a", "x"), now=0.0, wall_now=T0).reply
        assert (reply.verdict, reply.reason) == (Verdict.FREEZE, "phished")
        assert policy.unblock("auth:a") == block
        assert policy.generation == 2
        assert policy.unblock("auth:a") is None
        assert policy.generation == 2
        assert policy.decide(fail("auth:a", "x"), now=0.0, wall_now=T0).reply.verdict is (
            Verdict.ACCEPT
        )

    def test_block_drops_counters(self) -> None:
        """A user is counted or blocked, never both, also when an admin blocks."""
        policy = Policy(FIVE)
        policy.decide(fail("auth:a", "r1"), now=0.0, wall_now=T0)
        policy.block("auth:a", "x", by="admin:0", wall_now=T0)
        assert policy.user_state("auth:a") is None

    def test_reset_forgets_counters_only(self) -> None:
        """reset empties the counters; the next failures count from full buckets."""
        policy = Policy(FIVE)
        for i in range(4):
            policy.decide(fail("auth:a", f"r{i}"), now=0.0, wall_now=T0)
        assert policy.reset("auth:a")
        assert not policy.reset("auth:a")
        for i in range(4):
            assert policy.decide(fail("auth:a", f"s{i}"), now=1.0, wall_now=T0).reply.verdict is (
                Verdict.ACCEPT
            )
        policy.block("auth:b", "x", by="admin:0", wall_now=T0)
        assert not policy.reset("auth:b")
        assert "auth:b" in policy.blocks

    def test_inspect_windows_and_clear_time(self) -> None:
        """Counted failures, tokens left and when each bucket is full again, per window."""
        policy = Policy(FIVE)
        for i in range(3):
            policy.decide(fail("auth:a", f"r{i}"), now=0.0, wall_now=T0)
        policy.decide(fail("auth:a", "r0"), now=10.0, wall_now=T0 + 10)  # a retry: not counted
        view = policy.inspect("auth:a", now=720.0, wall_now=T0 + 720)
        hour, day = view.windows
        assert (hour.counted, day.counted) == (3, 3)
        # 5/1h refills one token per 720 s: 2 left after the burst, 3 at t=720, so the two
        # missing tokens are back 1440 s later
        assert hour.tokens_left == pytest.approx(3.0)
        assert hour.clears_at == pytest.approx(T0 + 720 + 1440, abs=1e-6)
        assert day.tokens_left == pytest.approx(17.0 + 720 * 20 / 86400)
        assert day.clears_at == pytest.approx(T0 + 720 + (3 - 720 * 20 / 86400) * 4320, abs=1e-6)
        assert [s.rcpt for s in view.samples] == ["r2", "r1", "r0"]
        assert view.block is None
        assert not view.exempt

    def test_inspect_unknown_user(self) -> None:
        """A user never seen has full buckets that clear at no time."""
        view = Policy(FIVE).inspect("auth:new", now=5.0, wall_now=T0)
        assert [(w.counted, w.tokens_left, w.clears_at) for w in view.windows] == [
            (0, 5.0, None),
            (0, 20.0, None),
        ]


class TestJournal:
    def test_append_and_read_by_user(self, tmp_path: Path) -> None:
        """Entries come back in order, filtered by user."""
        journal = Journal(tmp_path / "journal")
        journal.append({"event": "block", "user": "a"}, durable=True)
        journal.append({"event": "reload"})
        journal.append({"event": "unblock", "user": "a"})
        contents = read_journal(journal.path, user="a")
        assert [e["event"] for e in contents.entries] == ["block", "unblock"]
        assert contents.truncated_line is None
        assert read_journal(tmp_path / "missing").entries == []

    def test_truncated_last_line_is_reported_and_healed(self, tmp_path: Path) -> None:
        """A write cut short is skipped and reported; the next entry starts a line of its own."""
        path = tmp_path / "journal"
        path.write_bytes(b'{"event":"block","user":"a"}\n{"event":"unbl')
        contents = read_journal(path)
        assert (len(contents.entries), contents.truncated_line) == (1, 2)
        Journal(path).append({"event": "reset", "user": "a"})
        contents = read_journal(path, user="a")
        assert [e["event"] for e in contents.entries] == ["block", "reset"]
        assert contents.truncated_line is None
        assert contents.damaged_lines == (2,)


class TestLatency:
    def test_percentiles_are_bucket_bounds(self) -> None:
        """p50 and p99 land on the bounds of the buckets holding them."""
        histogram = LatencyHistogram()
        assert percentiles(histogram.bounds, histogram.counts) == {}
        for _ in range(98):
            histogram.observe(0.0002)
        histogram.observe(0.004)
        histogram.observe(50.0)
        summary = percentiles(histogram.bounds, histogram.counts)
        assert summary["p50"] == 0.25  # 0.2 ms lies in the bucket up to 0.25 ms
        assert summary["p99"] == 5.0  # 4 ms in the bucket up to 5 ms
        assert summary["p99_9"] is None  # past the last bound
        assert sum(histogram.counts) == 100


class TestConfig:
    def test_admin_section(self, tmp_path: Path) -> None:
        """[admin] sets the socket, its mode and who may use it."""
        path = tmp_path / "c.toml"
        path.write_text(
            '[admin]\nsocket = "/run/x/admin.sock"\nsocket_mode = "0660"\n'
            'allowed_users = ["alice", 1001]\nallowed_groups = ["adm"]\n'
        )
        admin = Config.from_dict(_toml(path), source=str(path)).admin
        assert (str(admin.socket), admin.socket_mode) == ("/run/x/admin.sock", 0o660)
        assert (admin.allowed_users, admin.allowed_groups) == (("alice", 1001), ("adm",))
        assert Config().admin.socket_mode == 0o600

    def test_admin_mistakes_are_named(self) -> None:
        """Bad values in [admin] name the key."""
        with pytest.raises(ConfigError) as info:
            Config.from_dict({"admin": {"allowed_users": [True], "sockett": "x"}}, source="f.toml")
        assert info.value.problems == [
            (
                "f.toml: admin.sockett: unknown key (known: allowed_groups, allowed_users, socket, "
                "socket_group, socket_mode)"
            ),
            "f.toml: admin.allowed_users[0]: expected a name or a numeric id >= 0 (got True)",
        ]


def _toml(path: Path) -> dict[str, object]:
    import tomllib  # noqa: PLC0415

    return tomllib.loads(path.read_text())


def test_journal_lines_are_json(tmp_path: Path) -> None:
    """Each journal line is one JSON object (tools can read it with jq)."""
    journal = Journal(tmp_path / "j")
    journal.append({"event": "block", "user": "auth:\udcff"})
    (line,) = (tmp_path / "j").read_bytes().splitlines()
    assert json.loads(line)["user"] == "auth:\udcff"
