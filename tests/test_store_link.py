"""Fleet mode's own connections for the script calls, against a real redis-server: they log in,
pick the database, survive a server that vanishes or hangs, and never reuse a connection whose
answer was not read."""

from __future__ import annotations

import secrets
import select
import socket
import time
from pathlib import Path

import pytest
import trio

from spamguardd.core.resp import ErrorReply
from spamguardd.core.storeurl import parse_store_url
from spamguardd.daemon.store_link import StoreLink, StoreLinkError
from tests.redislab import running_redis


@pytest.fixture(name="store_dir")
def _store_dir(sock_dir: Path) -> Path:
    path = sock_dir / "store"
    path.mkdir()
    return path


def link_to(url: str, password: str | None = None) -> StoreLink:
    return StoreLink(parse_store_url(url), password=password, tls=None, client_name="test relay")


async def test_logs_in_names_itself_and_uses_its_database(store_dir: Path) -> None:
    password = secrets.token_hex(8)
    with running_redis(store_dir, password=password) as lab:
        link = link_to(f"{lab.url}?db=3", password)
        assert await link.call(b"SET", b"k", b"in three") == b"OK"
        assert await link.call(b"CLIENT", b"GETNAME") == b"test-relay"
        other = link_to(lab.url, password)
        assert await other.call(b"GET", b"k") is None  # database 0 does not hold it
        assert await other.call(b"SELECT", b"3") == b"OK"
        assert await other.call(b"GET", b"k") == b"in three"
        await link.aclose()
        await other.aclose()


async def test_a_wrong_password_is_a_clear_error(store_dir: Path) -> None:
    right, wrong = secrets.token_hex(8), secrets.token_hex(8)
    with (
        running_redis(store_dir, password=right) as lab,
        pytest.raises(StoreLinkError, match="refused the connection"),
    ):
        await link_to(lab.url, wrong).call(b"PING")


async def test_an_error_reply_is_an_answer_and_the_connection_stays(store_dir: Path) -> None:
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        reply = await link.call(b"EVALSHA", b"0" * 40, b"0")
        assert isinstance(reply, ErrorReply)
        assert reply.code == "NOSCRIPT"
        assert await link.call(b"PING") == b"PONG"
        assert link.connections_opened == 1
        await link.aclose()


async def test_a_call_cut_short_never_leaves_its_answer_to_the_next(store_dir: Path) -> None:
    """A hung server and a budget that runs out: the connection is dropped, so the late answer
    to the first call can never be taken for the answer to the next one."""
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        assert await link.call(b"SET", b"k", b"first") == b"OK"
        lab.pause()
        with trio.move_on_after(0.2) as scope:
            await link.call(b"INCR", b"n")
        assert scope.cancelled_caught
        lab.resume()
        assert await link.call(b"GET", b"k") == b"first"
        assert link.connections_opened == 2  # the cut one was closed, a new one opened
        await link.aclose()


async def test_a_vanished_server_is_an_error_then_the_link_comes_back(store_dir: Path) -> None:
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        assert await link.call(b"PING") == b"PONG"
        lab.kill()
        with pytest.raises(StoreLinkError):
            await link.call(b"PING")
        with pytest.raises(StoreLinkError, match="cannot connect"):
            await link.call(b"PING")
        lab.start()
        assert await link.call(b"PING") == b"PONG"
        await link.aclose()


async def test_a_call_started_on_the_spot_is_answered_there(store_dir: Path) -> None:
    """The count's way on a quiet relay: written and answered without a turn of the scheduler,
    and the connection is free again for the next call."""
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        assert link.start(b"PING") is None  # no connection open yet: call() opens one
        assert await link.call(b"PING") == b"PONG"
        for value in (b"1", b"2"):
            pending = link.start(b"SET", b"k", value)
            assert pending is not None
            assert pending.read_now(5.0, select.poll()) == b"OK"
        assert await link.call(b"GET", b"k") == b"2"
        assert link.connections_opened == 1
        await link.aclose()


async def test_a_slow_answer_is_awaited_in_the_scheduler_instead(store_dir: Path) -> None:
    """A store that does not answer on the spot: the caller stops waiting there and finishes
    the same call in the scheduler; the answer is the call's own, the connection kept."""
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        assert await link.call(b"SET", b"n", b"41") == b"OK"
        lab.pause()
        pending = link.start(b"INCR", b"n")
        assert pending is not None
        assert isinstance(pending.read_now(0.05, select.poll()), type)  # NEED_DATA
        assert link.start(b"PING") is None  # its connection is still taken
        lab.resume()
        assert await pending.result() == 42
        assert await link.call(b"GET", b"n") == b"42"
        assert link.connections_opened == 1
        await link.aclose()


async def test_the_wait_on_the_spot_gives_way_to_other_input(store_dir: Path) -> None:
    """While the caller waits on the spot, a watched descriptor with input (a listener with a
    new connection) ends the wait at once, however long the store would take."""
    with running_redis(store_dir) as lab:
        link = link_to(lab.url)
        assert await link.call(b"PING") == b"PONG"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(store_dir / "listener"))
        listener.listen()
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(store_dir / "listener"))  # a new connection waits to be accepted
        watching = select.poll()
        watching.register(listener, select.POLLIN)
        lab.pause()
        pending = link.start(b"PING")
        assert pending is not None
        # with the listener ready, a minute's allowance returns at once, not after the minute
        # (the bound is loose on purpose: it tells "at once" from "the whole allowance")
        began = time.monotonic()
        assert isinstance(pending.read_now(60.0, watching), type)  # NEED_DATA
        assert time.monotonic() - began < 30.0
        assert watching.poll(0) == [(listener.fileno(), select.POLLIN)]  # left as it was
        lab.resume()
        assert await pending.result() == b"PONG"
        client.close()
        listener.close()
        await link.aclose()


async def test_an_idle_connection_the_store_closed_is_not_used(store_dir: Path) -> None:
    """A store with ``timeout`` set closes connections idle that long: the next call, or the
    next count started on the spot, opens a new connection instead of failing (a failure would
    put the relay in degraded mode)."""
    with running_redis(store_dir) as lab:
        link = StoreLink(
            parse_store_url(lab.url), password=None, tls=None, client_name="idle relay"
        )
        watcher = link_to(lab.url)
        assert await watcher.call(b"CONFIG", b"SET", b"timeout", b"1") == b"OK"

        async def dropped_by_the_store() -> None:
            with trio.fail_after(30):  # the store drops idle clients on its next timer run
                while b"name=idle-relay" in await watcher.call(b"CLIENT", b"LIST"):  # type: ignore[operator]  # noqa: ASYNC110 - polling the server, nothing to wait on
                    await trio.sleep(0.1)

        assert await link.call(b"SET", b"k", b"v") == b"OK"
        await dropped_by_the_store()
        assert await link.call(b"GET", b"k") == b"v"
        assert link.connections_opened == 2
        await dropped_by_the_store()
        assert link.start(b"GET", b"k") is None  # the closed one is dropped, not written to
        assert await link.call(b"GET", b"k") == b"v"
        pending = link.start(b"GET", b"k")
        assert pending is not None
        assert pending.read_now(5.0, select.poll()) == b"v"
        assert link.connections_opened == 3
        await link.aclose()
        await watcher.aclose()
