"""The parts behind the admin socket: protocol, policy changes, journal, latency, config."""

from __future__ import annotations

import ipaddress
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core import adminproto
from spamguardd.core.adminproto import (
    AdminConnection,
    AdminReplyError,
    AdminRequestError,
    Command,
    Role,
    Verb,
)
from spamguardd.core.config import Config, PolicyConfig
from spamguardd.core.errors import ConfigError, StoreError
from spamguardd.core.latency import LatencyHistogram, percentiles
from spamguardd.core.policy import Blocked, Change, Policy, Reset, Unblocked
from spamguardd.core.protocol import RcptRequest, Verdict, Verify
from spamguardd.core.rate import Rate
from spamguardd.state.journal import Journal, read_journal
from tests.helpers import T0

FIVE = PolicyConfig(failed_recipients=(Rate(5, 3600), Rate(20, 86400)))


def fail(user: str, rcpt: str) -> RcptRequest:
    return RcptRequest(
        user=user, rcpt=rcpt, verify=Verify.FAIL, ip=ipaddress.ip_address("192.0.2.7")
    )


def exchange(command: Command, reply: adminproto.Reply) -> tuple[object, object]:
    """*command* from a client connection to a server one, and *reply* back: what each read."""
    client = AdminConnection(Role.CLIENT)
    server = AdminConnection(Role.SERVER)
    server.receive_data(client.send(command))
    received = server.next_event()
    client.receive_data(server.send(reply))
    return received, client.next_event()


def serve_line(line: bytes) -> object:
    server = AdminConnection(Role.SERVER)
    server.receive_data(line + b"\n")
    return server.next_event()


class TestAdminProtocol:
    @given(
        verb=st.sampled_from(sorted(adminproto.USER_VERBS)),
        user=st.text(min_size=1, max_size=50).filter(lambda u: "\x00" not in u),
    )
    def test_round_trip_any_user(self, verb: Verb, user: str) -> None:
        """Any user key, including surrogate-escaped bytes, survives the trip unchanged."""
        sent = Command(verb, user)
        client = AdminConnection(Role.CLIENT)
        line = client.send(sent)
        assert line.endswith(b"\n")
        assert line.isascii()
        server = AdminConnection(Role.SERVER)
        server.receive_data(line)
        assert server.next_event() == sent

    def test_non_utf8_user_key(self) -> None:
        """A key that is not UTF-8 (kept with surrogate escapes) is carried byte for byte."""
        user = b"auth:\xff\xfe".decode("utf-8", "surrogateescape")
        sent = Command(Verb.RESET, user)
        received, reply = exchange(sent, adminproto.ResetReply(user=user))
        assert received == sent
        assert reply == adminproto.ResetReply(user=user)

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b"block auth:x", "not a JSON object"),
            (b"[1]", "not a JSON object"),
            (b"[" * 50_000, "nested too deeply"),
            (b'{"command": "frob"}', "unknown command 'frob'"),
            (b'{"command": 7}', "unknown command 7"),
            (b'{"command": "block"}', "block needs a user key"),
            (b'{"command": "show", "user": ""}', "show needs a user key"),
            (b'{"command": "list", "user": "a"}', "list takes no user"),
            (b'{"command": "reset", "user": "a", "reason": "x"}', "reset takes no reason"),
            (b'{"command": "list", "force": true}', "unknown field 'force'"),
            (b'{"command": "block", "user": "a", "reason": 5}', "reason must be a string"),
            (b'{"command": "show", "user": "auth:\\ud800"}', "lone surrogate"),
            (b'{"command": "show", "user": "auth:\\udc7f"}', "lone surrogate"),
            (b'{"command": "block", "user": "a", "reason": "\\udfff"}', "lone surrogate"),
        ],
    )
    def test_bad_requests_say_why(self, line: bytes, message: str) -> None:
        """Every refused request names its problem."""
        with pytest.raises(AdminRequestError, match=message):
            serve_line(line)

    def test_a_bad_line_does_not_end_the_connection(self) -> None:
        """After a refused line the next one is read; an over-long line closes the connection."""
        server = AdminConnection(Role.SERVER)
        server.receive_data(b'nonsense\n{"command": "list"}\n')
        with pytest.raises(AdminRequestError):
            server.next_event()
        assert server.next_event() == Command(Verb.LIST)
        assert server.next_event() is adminproto.NEED_DATA
        server.receive_data(b"x" * adminproto.MAX_REQUEST)
        with pytest.raises(AdminRequestError, match="longer than 65536 bytes"):
            server.next_event()
        server.receive_data(b'\n{"command": "list"}\n')
        assert server.next_event() is adminproto.CLOSED

    def test_replies(self) -> None:
        """Replies are one sorted ASCII JSON line; optional fields are left out when unset."""
        server = AdminConnection(Role.SERVER)
        line = server.send(adminproto.ResetReply(user="auth:é"))
        assert line == b'{"ok":true,"reset":true,"user":"auth:\\u00e9"}\n'
        info = adminproto.BlockInfo(user="u", since="s", reason="r", by="b", verdict="freeze")
        line = server.send(adminproto.UnblockReply(user="u", unblocked=info))
        assert b'"exim"' not in line
        assert server.send(adminproto.ErrorReply(error="no")) == b'{"error":"no","ok":false}\n'

    @pytest.mark.parametrize(
        "line",
        [
            b"pong",
            b"{}",
            b'{"ok": false}',
            b'{"ok": true}',
            b'{"ok": true, "user": "a", "reset": "yes"}',
            b'{"ok": true, "user": 5, "reset": true}',
        ],
    )
    def test_a_reply_that_does_not_fit_is_refused(self, line: bytes) -> None:
        """The client reads a reply into its class, and says which field did not fit."""
        client = AdminConnection(Role.CLIENT)
        client.send(Command(Verb.RESET, "a"))
        client.receive_data(line + b"\n")
        with pytest.raises(AdminReplyError):
            client.next_event()

    def test_replies_come_back_typed_in_order(self) -> None:
        """Several commands on one connection get their replies, each read as its own type."""
        client = AdminConnection(Role.CLIENT)
        server = AdminConnection(Role.SERVER)
        server.receive_data(client.send(Command(Verb.METRICS)) + client.send(Command(Verb.LIST)))
        assert server.next_event() == Command(Verb.METRICS)
        assert server.next_event() == Command(Verb.LIST)
        client.receive_data(
            server.send(adminproto.MetricsReply(text="x 1\n"))
            + server.send(adminproto.ListReply(blocked=()))
        )
        assert client.next_event() == adminproto.MetricsReply(text="x 1\n")
        assert client.next_event() == adminproto.ListReply(blocked=())
        client.receive_data(b"")
        assert client.next_event() is adminproto.CLOSED


class TestPolicyAdmin:
    def test_block_unblock_bump_generation(self) -> None:
        """Admin blocks and unblocks change the block list and its generation like auto blocks."""
        policy = Policy(FIVE)
        change = policy.block("auth:a", "phished", by="admin:0", wall_now=T0 + 0.7)
        (blocked,) = change.effects
        assert isinstance(blocked, Blocked)
        block = blocked.block
        assert (block.blocked_at, block.by, blocked.rate) == (T0, "admin:0", None)
        assert change.needs_generation == policy.generation == 1
        again = policy.block("auth:a", "other", by="admin:5", wall_now=T0 + 99)
        assert (again, policy.blocks["auth:a"], policy.generation) == (Change(), block, 1)
        reply = policy.decide(fail("auth:a", "x"), now=0.0, wall_now=T0).reply
        assert (reply.verdict, reply.reason) == (Verdict.FREEZE, "phished")
        lifted = policy.unblock("auth:a", by="admin:3", wall_now=T0 + 5)
        assert lifted == Change((Unblocked(block, "admin:3", T0 + 5),), needs_generation=2)
        assert policy.unblock("auth:a", by="admin:3", wall_now=T0 + 6) == Change()
        assert policy.generation == 2
        assert policy.decide(fail("auth:a", "x"), now=0.0, wall_now=T0).reply.verdict is (
            Verdict.ACCEPT
        )

    def test_admin_block_carries_the_evidence(self) -> None:
        """An admin's block brings the user's recent failures along, as an automatic one does."""
        policy = Policy(FIVE)
        policy.decide(fail("auth:a", "r1"), now=0.0, wall_now=T0)
        (blocked,) = policy.block("auth:a", "x", by="admin:0", wall_now=T0).effects
        assert isinstance(blocked, Blocked)
        assert [s.rcpt for s in blocked.samples] == ["r1"]

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
        assert policy.reset("auth:a", by="admin:0", wall_now=T0).effects == (
            Reset("auth:a", "admin:0", T0),
        )
        assert policy.reset("auth:a", by="admin:0", wall_now=T0) == Change()
        for i in range(4):
            assert policy.decide(fail("auth:a", f"s{i}"), now=1.0, wall_now=T0).reply.verdict is (
                Verdict.ACCEPT
            )
        policy.block("auth:b", "x", by="admin:0", wall_now=T0)
        assert policy.reset("auth:b", by="admin:0", wall_now=T0) == Change()
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

    def test_never_appends_through_a_symbolic_link(self, tmp_path: Path) -> None:
        """A link put in the journal's place while the daemon runs is refused, not followed:
        the daemon's rights must not write into whatever it points at."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(b"not ours\n")
        (tmp_path / "journal").symlink_to(elsewhere)
        with pytest.raises(StoreError, match="journal: cannot append: is a symbolic link"):
            Journal(tmp_path / "journal").append({"event": "reset", "user": "a"})
        assert elsewhere.read_bytes() == b"not ours\n"


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


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _json_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


class TestAdminFraming:
    @given(
        data=st.binary(max_size=2000)
        | st.lists(_JSON, max_size=4).map(lambda vs: b"\n".join(map(_json_bytes, vs))),
        cuts=st.lists(st.integers(0, 2000), max_size=6),
    )
    def test_any_bytes_in_any_chunks_give_commands_or_named_errors(
        self, data: bytes, cuts: list[int]
    ) -> None:
        """Whatever arrives on the admin socket, in whatever pieces, the daemon's side yields
        commands, NEED_DATA, CLOSED or an AdminRequestError naming the problem: nothing else."""
        server = AdminConnection(Role.SERVER)
        points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
        chunks = [data[a:b] for a, b in itertools.pairwise(points)] + [b""]
        for chunk in chunks:
            server.receive_data(chunk)
            for _ in range(len(data) + 2):
                try:
                    event: object = server.next_event()
                except AdminRequestError as exc:
                    event = str(exc)
                if event in (adminproto.NEED_DATA, adminproto.CLOSED):
                    break
                assert isinstance(event, Command) or (isinstance(event, str) and event)

    @given(
        command=st.sampled_from([*map(str, adminproto.Verb), "frob", ""]),
        fields=st.dictionaries(st.sampled_from(["user", "reason", "x"]), _JSON, max_size=3),
    )
    def test_any_json_object_is_a_command_or_a_named_error(
        self, command: str, fields: dict[str, object]
    ) -> None:
        """A JSON object with any fields of any types is either a valid command or refused
        with a message, never an exception of another kind."""
        try:
            event = serve_line(json.dumps({"command": command, **fields}).encode())
        except AdminRequestError as exc:
            event = str(exc)
        assert isinstance(event, Command) or (isinstance(event, str) and event)
