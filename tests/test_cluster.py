"""Fleet mode's pure side: the store URL, the [cluster] section, records, events, catching up."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.cluster import (
    Event,
    Keys,
    Op,
    count_call,
    decode_record,
    encode_record,
    event_fields,
    parse_count,
    parse_event,
    plan_catch_up,
    policy_digest,
)
from spamguardd.core.config import Config, Mode, PolicyConfig
from spamguardd.core.errors import ConfigError
from spamguardd.core.policy import (
    ACCEPT,
    Block,
    Blocked,
    Policy,
    StoreCount,
    StoreCountStatus,
    WouldBlock,
)
from spamguardd.core.protocol import (
    CheckRequest,
    PingRequest,
    RcptRequest,
    ReportRequest,
    Verdict,
    Verify,
)
from spamguardd.core.rate import Rate
from spamguardd.core.storeurl import StoreAddress, parse_store_url
from tests.helpers import T0
from tests.strategies import blocks, user_keys, wire_text

RATES = (Rate(5, 3600), Rate(20, 86400))


class TestStoreUrl:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("redis://10.0.0.5", StoreAddress("redis", "10.0.0.5")),
            ("redis://store.example:6380/3", StoreAddress("redis", "store.example", 6380, db=3)),
            ("rediss://store.example/1", StoreAddress("rediss", "store.example", db=1)),
            ("redis://[2001:db8::5]:7000", StoreAddress("redis", "2001:db8::5", 7000)),
            (
                "redis://spamguardd@10.0.0.5",
                StoreAddress("redis", "10.0.0.5", username="spamguardd"),
            ),
            ("unix:///run/redis/redis.sock", StoreAddress("unix", path="/run/redis/redis.sock")),
            ("unix:///run/r.sock?db=2", StoreAddress("unix", path="/run/r.sock", db=2)),
        ],
    )
    def test_accepted(self, text: str, expected: StoreAddress) -> None:
        """The three schemes, with a port, a database, an ACL user, an IPv6 address."""
        assert parse_store_url(text) == expected

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("http://10.0.0.5", "expected a URL"),
            ("10.0.0.5:6379", "expected a URL"),
            ("redis://:secret@10.0.0.5", "password_file"),
            ("redis://user:secret@10.0.0.5", "password_file"),
            ("redis://10.0.0.5:99999", "expected a URL"),
            ("redis://10.0.0.5/x", "database number"),
            ("redis://10.0.0.5/0?ssl_cert_reqs=none", "no query options"),
            ("redis:///0", "expected a host"),
            ("unix://host/run/r.sock", "names no host"),
            ("unix://relative", "names no host"),
            ("unix:///run/r.sock?timeout=1", "unknown query option"),
        ],
    )
    def test_refused(self, text: str, problem: str) -> None:
        """Anything else is refused with a message that says what is wrong."""
        with pytest.raises(ValueError, match=problem):
            parse_store_url(text)

    def test_shown_without_secrets(self) -> None:
        """The address as logs and stats show it."""
        assert str(parse_store_url("redis://u@10.0.0.5/2")) == "redis://u@10.0.0.5:6379/2"
        assert str(parse_store_url("unix:///r.sock?db=1")) == "unix:///r.sock?db=1"


class TestClusterSection:
    def test_absent_is_a_single_host(self) -> None:
        """Without [cluster] the daemon is today's single host."""
        assert not Config().cluster.enabled

    def test_settings(self) -> None:
        """Every key read, the budget in milliseconds or seconds."""
        config = Config.from_dict(
            {
                "cluster": {
                    "url": "redis://10.0.0.5/1",
                    "password_file": "/etc/spamguardd/store-password",
                    "key_prefix": "fleet1:",
                    "timeout": "20ms",
                    "name": "relay-2",
                    "tls_ca_file": "/etc/ssl/certs/store-ca.pem",
                }
            },
            source="t",
        ).cluster
        assert config.enabled
        assert config.timeout == 0.02
        assert config.name == "relay-2"
        assert config.key_prefix == "fleet1:"
        assert Config.from_dict({"cluster": {"timeout": 0.1}}, source="t").cluster.timeout == 0.1

    def test_problems_named(self) -> None:
        """Each bad key is named, all of them at once."""
        with pytest.raises(ConfigError) as info:
            Config.from_dict(
                {
                    "cluster": {
                        "url": "redis://:pw@h",
                        "timeout": "10s",
                        "name": "relay 2",
                        "key_prefix": "has space",
                        "password": "x",
                    }
                },
                source="t",
            )
        text = "\n".join(info.value.problems)
        for key in ("url", "timeout", "name", "key_prefix", "password"):
            assert f"cluster.{key}:" in text


class TestRecords:
    @given(blocks, st.sampled_from(["relay-1", "mx.example.net"]))
    def test_round_trip(self, block: Block, relay: str) -> None:
        """A block survives the store whatever its user key and reason (8-bit, quotes, ...)."""
        stored = decode_record(block.user, encode_record(block, relay))
        assert stored.block == block
        assert stored.relay == relay

    @pytest.mark.parametrize("record", [b"", b"reason=x", b"blocked_at=soon", b'blocked_at=1 r="'])
    def test_damaged(self, record: bytes) -> None:
        """A damaged record is an error naming the user, not a crash or a half block."""
        with pytest.raises(ValueError, match="auth:u"):
            decode_record("auth:u", record)


class TestCountAnswers:
    def test_arguments(self) -> None:
        """One call names the user's keys and carries every window, with its block reason."""
        call = count_call(
            Keys.for_prefix("p:"), "auth:u", "x@y", RATES, mode=Mode.ENFORCE, relay="r", origin="o"
        )
        assert call.keys == (b"p:count:auth:u", b"p:blocks", b"p:events", b"p:would:auth:u")
        assert call.args[0] == b"count"
        assert call.args[4] == b"enforce"
        assert call.args[9] == b"2"
        assert call.args[10:13] == (
            b"5",
            b"3600",
            b'reason="5 failed recipients within 1h" by=auto relay=r origin=o limit=5/1h',
        )

    def test_block(self) -> None:
        """The call that made the block says which window emptied, and the block."""
        record = b'blocked_at=1795824000 reason="5 failed recipients within 1h" by=auto relay=r'
        count = parse_count("auth:u", RATES, [b"block", 1, 1, record, b"0.5", b"15"])
        assert count.status is StoreCountStatus.BLOCK
        assert count.tripped == RATES[0]
        assert count.tokens_left == (0.5, 15.0)
        assert count.block == Block("auth:u", 1795824000.0, "5 failed recipients within 1h")

    @pytest.mark.parametrize(
        "reply",
        [
            None,
            b"OK",
            [b"counted", 1, 0],
            [b"maybe", 1, 0, b"", b"1", b"2"],
            [b"counted", 1, 3, b"", b"1", b"2"],
            [b"counted", 1, 0, b"", b"1"],
            [b"counted", 1, 0, b"", b"x", b"2"],
            [b"blocked", 0, 0, None],
            [b"counted", b"1", 0, b"", b"1", b"2"],
        ],
    )
    def test_unexpected(self, reply: object) -> None:
        """Whatever else comes back is a ValueError (the daemon then counts locally)."""
        with pytest.raises(ValueError, match="count"):
            parse_count("auth:u", RATES, reply)


class TestEvents:
    @given(user_keys, wire_text, st.floats(min_value=0, max_value=2e9))
    def test_unblock_round_trip(self, user: str, by: str, at: float) -> None:
        """What the script writes for an unblock reads back as the same event."""
        fields = {
            b"op": b"unblock",
            b"user": user.encode("utf-8", "surrogateescape"),
            b"by": by.encode("utf-8", "surrogateescape"),
            b"at": repr(at).encode(),
            b"origin": b"o1",
            b"relay": b"r1",
        }
        assert parse_event(fields) == Event(Op.UNBLOCK, user, "o1", "r1", by=by, at=at)

    def test_reload(self) -> None:
        """A reload carries the sender's digest."""
        event = Event(Op.RELOAD, "", "o1", "r1", digest="abc")
        assert parse_event(event_fields(event)) == event

    @pytest.mark.parametrize(
        "fields",
        [
            {},
            {b"op": b"explode", b"user": b"u", b"origin": b"o", b"relay": b"r"},
            {b"op": b"block", b"user": b"u", b"origin": b"o", b"relay": b"r"},
            {b"op": b"reset", b"user": b"u", b"origin": b"o", b"relay": b"r", b"by": b"b"},
            {b"op": b"reset", b"user": b"u", b"origin": b"o", b"relay": b"r", b"at": b"x"},
        ],
    )
    def test_damaged(self, fields: dict[bytes, bytes]) -> None:
        """A damaged event is a ValueError (logged and skipped by the follower)."""
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            parse_event(fields)


def _block(user: str, at: float) -> Block:
    return Block(user, at, "r")


class TestCatchUp:
    def test_cases(self) -> None:
        """Adopt what the fleet made, lift what it lifted, push what it never saw."""
        local = {u: _block(u, 100.0) for u in ("both", "lifted", "mine", "lifted-before")}
        remote = {u: _block(u, 100.0) for u in ("both", "theirs")}
        unblocked = {"lifted": 150.0, "lifted-before": 50.0, "never-blocked": 10.0}
        plan = plan_catch_up(local, remote, unblocked)
        assert plan.adopt == (remote["theirs"],)
        assert plan.lift == (("lifted", 150.0),)
        assert plan.push == (local["lifted-before"], local["mine"])

    @given(
        st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 9)),
        st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 9)),
        st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 9)),
    )
    def test_everyone_accounted_for(
        self, local_at: dict[str, int], remote_at: dict[str, int], lifted: dict[str, int]
    ) -> None:
        """Every user ends in exactly one place, and applying the plan makes the two lists
        agree except where the store itself refuses a push (an unblock after the block)."""
        local = {u: _block(u, at) for u, at in local_at.items()}
        remote = {u: _block(u, at) for u, at in remote_at.items()}
        unblocked = {u: float(at) for u, at in lifted.items()}
        plan = plan_catch_up(local, remote, unblocked)
        after = dict(local)
        for block in plan.adopt:
            assert block.user not in after
            after[block.user] = block
        for user, _ in plan.lift:
            del after[user]
        pushed = {block.user for block in plan.push}
        assert set(after) == set(remote) | pushed
        assert not pushed & set(remote)
        assert all(unblocked.get(u, -1.0) < local[u].blocked_at for u in pushed)


class TestDigest:
    def test_tells_limits_apart(self) -> None:
        """Relays with other limits, overrides or mode have other digests; order does not
        matter."""
        base = PolicyConfig(failed_recipients=RATES)
        same = PolicyConfig(failed_recipients=RATES, exempt_users=frozenset({"auth:x"}))
        assert policy_digest(base) == policy_digest(same)
        others = [
            PolicyConfig(failed_recipients=(Rate(6, 3600),)),
            PolicyConfig(failed_recipients=RATES, mode=Mode.MONITOR),
            PolicyConfig(failed_recipients=RATES, overrides={"auth:n": (Rate(1000, 3600),)}),
        ]
        assert len({policy_digest(c) for c in [base, *others]}) == 4


FIVE = PolicyConfig(failed_recipients=(Rate(5, 3600),))


def _fail(user: str, rcpt: str = "r@x", verify: Verify = Verify.FAIL) -> RcptRequest:
    return RcptRequest(user=user, rcpt=rcpt, verify=verify)


class TestPolicyInFleetMode:
    def test_what_the_store_counts(self) -> None:
        """Only failures that would count go to the store: not a verifying recipient, not a
        blocked user, not an exemption, not a check or a ping; a report counts as a recipient."""
        config = attrs.evolve(FIVE, exempt_users=frozenset({"auth:exempt"}))
        policy = Policy(config, [Block("auth:blocked", T0, "r")])
        assert policy.to_count(_fail("auth:m")) == _fail("auth:m")
        assert policy.to_count(_fail("auth:m", verify=Verify.OK)) is None
        assert policy.to_count(_fail("auth:m", verify=Verify.DEFER)) is None
        assert policy.to_count(_fail("auth:blocked")) is None
        assert policy.to_count(_fail("auth:exempt")) is None
        assert policy.to_count(CheckRequest("auth:m")) is None
        assert policy.to_count(PingRequest()) is None
        report = ReportRequest(user="auth:m", rcpt="r@x", event="msg:fail:delivery")
        assert policy.to_count(report) == report.as_rcpt()

    def test_settle_a_block_the_store_made(self) -> None:
        """The block the store made here is the policy's block: verdict, effect with the
        window and the evidence, durable before the answer; settled twice, blocked once."""
        policy = Policy(FIVE)
        block = Block("auth:m", T0, "5 failed recipients within 1h")
        count = StoreCount(StoreCountStatus.BLOCK, True, Rate(5, 3600), (0.0,), block)
        decision = policy.settle(_fail("auth:m", "last@x"), count, wall_now=T0)
        assert decision.reply.verdict is Verdict.FREEZE
        [effect] = decision.effects
        assert isinstance(effect, Blocked)
        assert (effect.block, effect.rate) == (block, Rate(5, 3600))
        assert [sample.rcpt for sample in effect.samples] == ["last@x"]
        assert decision.needs_generation == policy.generation == 1
        again = policy.settle(_fail("auth:m", "other@x"), count, wall_now=T0)
        assert again.effects == ()
        assert again.reply == decision.reply

    def test_settle_counted_and_would_block(self) -> None:
        """A plain count is an accept; monitor mode's first trip in the fleet is reported."""
        policy = Policy(attrs.evolve(FIVE, mode=Mode.MONITOR))
        counted = StoreCount(StoreCountStatus.COUNTED, True, None, (3.0,))
        assert policy.settle(_fail("auth:m"), counted, wall_now=T0).reply == ACCEPT
        would = StoreCount(StoreCountStatus.WOULD, True, Rate(5, 3600), (0.0,))
        decision = policy.settle(_fail("auth:m"), would, wall_now=T0)
        assert decision.reply == ACCEPT
        assert [type(effect) for effect in decision.effects] == [WouldBlock]
        assert policy.statistics().would_block_users == 1

    def test_adopt_and_own(self) -> None:
        """A block from elsewhere carries no evidence; one of ours does; a user blocked here
        keeps its block either way."""
        policy = Policy(FIVE)
        theirs = Block("auth:t", T0, "r")
        [adopted] = policy.adopt_block(theirs).effects
        assert isinstance(adopted, Blocked)
        assert (adopted.rate, adopted.samples) == (None, ())
        assert policy.adopt_block(Block("auth:t", T0 + 5, "other")).effects == ()
        assert policy.blocks["auth:t"] == theirs
        policy.decide(_fail("auth:o", "seen@x"), now=0.0, wall_now=T0)
        [own] = policy.own_block(Block("auth:o", T0, "r"), Rate(5, 3600)).effects
        assert isinstance(own, Blocked)
        assert [sample.rcpt for sample in own.samples] == ["seen@x"]
        assert policy.own_block(Block("auth:o", T0, "r"), None).effects == ()


class TestStoreUrlProperties:
    @given(st.text(max_size=80))
    def test_any_text_is_an_address_or_a_value_error(self, text: str) -> None:
        """Whatever an admin types, the answer is an address or a ValueError saying why."""
        try:
            address = parse_store_url(text)
        except ValueError:
            return
        assert address.scheme in {"redis", "rediss", "unix"}

    @given(
        st.sampled_from(["redis", "rediss"]),
        st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\Z"),
        st.integers(1, 65535),
        st.integers(0, 15),
    )
    def test_shown_form_reads_back(self, scheme: str, host: str, port: int, db: int) -> None:
        """The address as stats show it is a URL that reads back as the same address."""
        address = StoreAddress(scheme, host, port, db=db)
        assert parse_store_url(str(address)) == address
