"""The store's script against a real redis-server: it counts exactly as the local buckets do,
makes one block, and keeps the store's memory bounded."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from spamguardd.core import buckets
from spamguardd.core.cluster import Keys, count_call, parse_count
from spamguardd.core.config import ClusterConfig, Mode
from spamguardd.core.policy import Block, StoreCountStatus
from spamguardd.core.rate import Rate
from spamguardd.core.storeurl import parse_store_url
from spamguardd.daemon.cluster import Store, make_client, make_link
from tests.redislab import RedisLab, running_redis

_prefixes = itertools.count()


@pytest.fixture(name="redis", scope="module")
def _redis() -> Iterator[RedisLab]:
    root = Path(tempfile.mkdtemp(prefix="sg-redis-", dir="/tmp"))
    try:
        with running_redis(root) as lab:
            yield lab
    finally:
        shutil.rmtree(root, ignore_errors=True)


def with_store(lab: RedisLab, body: Callable[[Store], Awaitable[None]]) -> None:
    """Run *body* with a store client under a key prefix of its own."""

    async def main() -> None:
        config = ClusterConfig(url=parse_store_url(lab.url))
        client = make_client(config, password=None, relay="r1")
        async with client:
            prefix = f"t{next(_prefixes)}:"
            link = make_link(config, password=None, relay="r1")
            store = Store(client, link, Keys.for_prefix(prefix), relay="r1", origin="o1")
            try:
                await body(store)
            finally:
                await store.aclose()

    trio.run(main)


#: Round periods and round gaps as well as any: a retry exactly one period later is the edge.
_periods = st.one_of(st.sampled_from([60, 600, 3600]), st.integers(60, 5000))
rate_sets = st.lists(
    st.builds(Rate, count=st.integers(1, 8), period=_periods),
    min_size=1,
    max_size=3,
    unique_by=lambda rate: rate.period,
).map(tuple)

steps = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([0.0, 60.0, 600.0]), st.floats(0, 2000, allow_nan=False)),
        st.integers(0, 6),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rates=rate_sets, later=rate_sets, switch=st.integers(0, 40), steps=steps)
def test_script_counts_like_the_local_buckets(
    redis: RedisLab,
    rates: tuple[Rate, ...],
    later: tuple[Rate, ...],
    switch: int,
    steps: list[tuple[float, int]],
) -> None:
    """For any limits, any failures at any times, and limits that change on the way (a reload),
    the store's script counts, de-duplicates, refills and trips exactly as core/buckets.py.

    Monitor mode, so that counting goes on past a trip and whole sequences are compared.
    """

    async def body(store: Store) -> None:
        now = 1_000_000.0
        current = rates
        state = buckets.new_state(current, now)
        for index, (dt, rcpt_number) in enumerate(steps):
            now += dt
            if index == switch and later != current:
                limit = max(buckets.MIN_RECENT, *(rate.count for rate in later))
                state = buckets.remap(state, current, later, now, limit)
                current = later
            rcpt = f"r{rcpt_number}@example.org"
            limit = max(buckets.MIN_RECENT, *(rate.count for rate in current))
            counted, tripped = buckets.count_failure(state, current, rcpt, now, limit)
            call = count_call(
                store.keys,
                "auth:u",
                rcpt,
                current,
                mode=Mode.MONITOR,
                relay="r1",
                origin="o1",
                now=now,
            )
            answer = parse_count("auth:u", current, await store.count(call))
            assert (answer.counted, answer.tripped) == (counted, tripped), index
            assert answer.tokens_left == buckets.tokens_left(state, current), index
            # what show reads, then and a while later, is what the local buckets say
            for later_by in (0.0, dt):
                seen = await store.peek("auth:u", current, now=now + later_by)
                assert seen.counted == buckets.window_counts(state, current, now + later_by)
                # (to a billionth of a token: the store subtracts epoch times, a second apart)
                assert seen.tokens_left == pytest.approx(
                    tuple(
                        buckets.refilled(tokens, later_by, rate)
                        for tokens, rate in zip(
                            buckets.tokens_left(state, current), current, strict=True
                        )
                    ),
                    abs=1e-9,
                ), index

    with_store(redis, body)


def test_one_block_under_concurrent_counting(redis: RedisLab) -> None:
    """Many relays' failures for one user at once: exactly one call makes the block, the
    calls after it find the user blocked, and the block is announced once."""
    rates = (Rate(5, 3600),)

    async def body(store: Store) -> None:
        answers = []

        async def one(n: int) -> None:
            call = count_call(
                store.keys, "auth:m", f"r{n}@x", rates, mode=Mode.ENFORCE, relay="r1", origin="o1"
            )
            answers.append(parse_count("auth:m", rates, await store.count(call)))

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(one, n)
        statuses = sorted(answer.status for answer in answers)
        assert statuses.count(StoreCountStatus.BLOCK) == 1
        assert statuses.count(StoreCountStatus.COUNTED) == 4
        assert statuses.count(StoreCountStatus.BLOCKED) == 45
        events = await store.read_events(b"0-0")
        assert [fields[b"op"] for _, fields in events] == [b"block"]
        blocks, _ = await store.fleet_blocks()
        assert blocks["auth:m"].block.reason == "5 failed recipients within 1h"
        assert blocks["auth:m"].relay == "r1"

    with_store(redis, body)


def test_keys_expire_with_the_longest_window(redis: RedisLab) -> None:
    """A counted user's key lives as long as its longest window, not forever."""
    rates = (Rate(5, 60), Rate(50, 7200))

    async def body(store: Store) -> None:
        call = count_call(
            store.keys, "auth:e", "r@x", rates, mode=Mode.MONITOR, relay="r1", origin="o1"
        )
        await store.count(call)
        ttl = await store.client.pttl(store.keys.count("auth:e"))
        assert 7_000_000 < ttl <= 7_200_000

    with_store(redis, body)


def test_unblock_then_push(redis: RedisLab) -> None:
    """An unblock is remembered: a relay pushing an older copy of the block is told so, a
    newer block (made after the unblock) is taken."""

    async def body(store: Store) -> None:
        old = Block("auth:p", 1000.0, "made while away")
        assert (await store.block(old, pushed=False))[0] == "new"
        assert (await store.unblock("auth:p", by="admin:0", at=2000.0))[0] == "lifted"
        assert (await store.block(old, pushed=True))[0] == "unblocked"
        newer = Block("auth:p", 3000.0, "again")
        assert (await store.block(newer, pushed=True))[0] == "new"
        status, record = await store.block(newer, pushed=False)
        assert status == "exists"
        assert b"again" in record
        # an unblock older than the block it meets leaves that block alone
        assert (await store.unblock("auth:p", by="admin:0", at=2500.0))[0] == "newer"

    with_store(redis, body)


def test_show_reads_an_8bit_key_as_it_was_counted(redis: RedisLab) -> None:
    """A user key that is not UTF-8 (an 8-bit login, kept as surrogate escapes) is counted and
    read back for ``show`` under the same key in the store, and nobody else's counts."""
    user = b"auth:\xe9t\xe9@example.com".decode("utf-8", "surrogateescape")
    rates = (Rate(5, 3600),)

    async def body(store: Store) -> None:
        for n in range(2):
            call = count_call(
                store.keys, user, f"r{n}@x", rates, mode=Mode.ENFORCE, relay="r1", origin="o1"
            )
            await store.count(call)
        seen = await store.peek(user, rates)
        assert seen.counted == (2,)
        assert seen.tokens_left[0] == pytest.approx(3.0, abs=0.01)
        other = await store.peek("auth:\u00e9t\u00e9@example.com", rates)  # the UTF-8 spelling
        assert (other.counted, other.tokens_left) == ((0,), (5.0,))

    with_store(redis, body)
