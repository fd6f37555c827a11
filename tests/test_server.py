"""The query socket, over real Unix sockets, spoken to exactly as Exim's readsocket speaks.

Rules for these tests:

* sockets live in a short directory under /tmp (``sock_dir``): sun_path holds 107 bytes;
* every test that could hang runs under ``trio.fail_after``;
* time-dependent tests use ``autojump_clock``: Unix-socket I/O completes in the kernel before
  every task blocks, so autojump never fires while a request is in flight; the one thread (the
  fsync) runs with nothing else waiting on a deadline;
* no sleeps: synchronise with ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.testing

from spamguardd.core.config import PolicyConfig, ServerConfig
from spamguardd.core.errors import StoreError
from spamguardd.core.latency import percentiles
from spamguardd.core.policy import Block, Policy
from spamguardd.core.protocol import Reply, Verdict, parse_reply
from spamguardd.core.rate import Rate
from spamguardd.daemon.listeners import bind_unix_listener
from spamguardd.daemon.persist import BlockPersister
from spamguardd.daemon.query_server import QueryServer
from spamguardd.state.blockfile import BlockStore
from tests.helpers import T0, readsocket, wire

FIVE = PolicyConfig(failed_recipients=(Rate(5, 3600),))


@attrs.define
class Running:
    server: QueryServer
    policy: Policy
    store: BlockStore
    path: Path

    async def ask(self, request: bytes, *, shutdown: bool = True) -> Reply:
        return parse_reply(await readsocket(self.path, request, shutdown=shutdown))


async def start(
    nursery: trio.Nursery,
    sock_dir: Path,
    policy_config: PolicyConfig = FIVE,
    store: BlockStore | None = None,
    *,
    fd_budget: int | None = None,
    **server_options: Any,
) -> Running:
    store = store or BlockStore(sock_dir / "state")
    store.prepare()
    policy = Policy(policy_config, store.load())
    config = attrs.evolve(ServerConfig(query_socket=sock_dir / "q.sock"), **server_options)
    wired = wire(config, policy, store, fd_budget=fd_budget)
    sock = bind_unix_listener(config.query_socket, mode=0o660, group=None, backlog=1024)
    await nursery.start(wired.serve, [sock])
    return Running(wired.server, policy, store, config.query_socket)


@pytest.fixture(name="running")
async def _running(nursery: trio.Nursery, sock_dir: Path) -> AsyncIterator[Running]:
    running = await start(nursery, sock_dir)
    yield running
    running.server.stop()


def fail(user: str, rcpt: str) -> bytes:
    return f"rcpt user={user} rcpt={rcpt} verify=fail".encode()


class TestReadsocketFraming:
    async def test_default_half_close(self, running: Running) -> None:
        """readsocket's default: request without newline, half-close, reply read until EOF."""
        with trio.fail_after(5):
            assert await readsocket(running.path, b"ping") == b"pong\n"

    async def test_shutdown_no(self, running: Running) -> None:
        """readsocket shutdown=no: the newline ends the request and we close after answering."""
        with trio.fail_after(5):
            assert await readsocket(running.path, b"ping\n", shutdown=False) == b"pong\n"

    async def test_reply_then_close_even_with_more_data(self, running: Running) -> None:
        """A second line on the same connection is ignored: one request, one reply, EOF."""
        with trio.fail_after(5):
            assert await readsocket(running.path, b"ping\nping\n", shutdown=False) == b"pong\n"

    async def test_socket_mode(self, running: Running) -> None:
        """The socket is created 0660 so that only Exim's group can connect."""
        assert stat.S_ISSOCK(running.path.stat().st_mode)
        assert stat.S_IMODE(running.path.stat().st_mode) == 0o660


class TestBlocking:
    async def test_blocked_at_exactly_n_and_on_disk_before_the_answer(
        self, running: Running
    ) -> None:
        """Failures 1-4 accepted, the 5th frozen, and the block file already holds the user."""
        with trio.fail_after(10):
            replies = [await running.ask(fail("auth:m@x", f"r{i}@y")) for i in range(5)]
            assert [r.verdict for r in replies] == [Verdict.ACCEPT] * 4 + [Verdict.FREEZE]
            assert [b.user for b in running.store.load()] == ["auth:m@x"]
            assert (
                await running.ask(b"rcpt user=auth:m@x rcpt=ok@y verify=ok")
            ).verdict is Verdict.FREEZE
            assert (await running.ask(b"check user=auth:m@x")).verdict is Verdict.FREEZE
            assert (await running.ask(b"check user=auth:other")).verdict is Verdict.ACCEPT

    async def test_freeze_waits_for_the_fsync(self, nursery: trio.Nursery, sock_dir: Path) -> None:
        """No freeze goes out while the block is still on its way to disk."""
        gate = threading.Event()

        class SlowStore(BlockStore):
            def apply(self, changes: Iterable[tuple[str, Block | None]]) -> None:
                gate.wait(10)
                super().apply(changes)

        running = await start(nursery, sock_dir, store=SlowStore(sock_dir / "state"))
        with trio.fail_after(10):
            for i in range(4):
                await running.ask(fail("auth:m", f"r{i}"))
            answer: list[Reply] = []
            answered = trio.Event()

            async def fifth() -> None:
                answer.append(await running.ask(fail("auth:m", "r4")))
                answered.set()

            nursery.start_soon(fifth)
            await trio.testing.wait_all_tasks_blocked()
            assert answer == []  # the write is held at the gate, and so is the verdict
            assert not running.store.path.exists()
            gate.set()
            await answered.wait()
            assert answer[0].verdict is Verdict.FREEZE
            assert running.store.path.exists()
        running.server.stop()

    async def test_concurrent_queries_at_the_limit_block_once(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """50 simultaneous failures past the limit: one block, one log line, all frozen after."""
        running = await start(nursery, sock_dir)
        replies: list[Reply] = []
        with structlog.testing.capture_logs() as logs, trio.fail_after(20):

            async def one(i: int) -> None:
                replies.append(await running.ask(fail("auth:burst", f"r{i}")))

            async with trio.open_nursery() as clients:
                for i in range(50):
                    clients.start_soon(one, i)
        assert sum(r.verdict is Verdict.FREEZE for r in replies) == 46
        assert [e["user"] for e in logs if e["event"] == "user_blocked"] == ["auth:burst"]
        assert len(running.store.load()) == 1
        running.server.stop()

    async def test_store_failure_defers_until_the_block_is_on_disk(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """A disk that refuses the block: no freeze is announced (defer holds the mail), the
        failure is logged and counted, the block holds in memory and is written by the retry
        once the disk takes it again; then the verdict is freeze."""
        refusing = True

        class FullDisk(BlockStore):
            def apply(self, changes: Iterable[tuple[str, Block | None]]) -> None:
                if refusing:
                    raise StoreError(f"{self.path}: cannot write: No space left on device")
                super().apply(changes)

        running = await start(nursery, sock_dir, store=FullDisk(sock_dir / "state"))
        persister = running.server.effects.persister
        persister.retry_min = persister.retry_max = 0.05  # the real clock: threads write
        recovered = trio.Event()
        persister.on_state = lambda error: None if error else recovered.set()
        with structlog.testing.capture_logs() as logs:
            with trio.fail_after(10):
                replies = [await running.ask(fail("auth:m", f"r{i}")) for i in range(5)]
                assert replies[-1] == Reply(
                    Verdict.DEFER, "spamguardd cannot save its block list; try again later"
                )
                assert (await running.ask(b"check user=auth:m")).verdict is Verdict.DEFER
            assert "auth:m" in running.policy.blocks
            assert any(
                e["event"] == "block_not_persisted" and "No space" in e["error"] for e in logs
            )
            assert persister.last_error is not None
            assert running.server.effects.statistics().store_failures == 2
            refusing = False
            with trio.fail_after(10):
                await recovered.wait()  # the retry, after its backoff
            assert running.server.effects.statistics().store_error is None
            assert [b.user for b in BlockStore(sock_dir / "state").load()] == ["auth:m"]
            with trio.fail_after(10):
                assert (await running.ask(b"check user=auth:m")).verdict is Verdict.FREEZE
            assert any(e["event"] == "block_persisted_again" for e in logs)
        running.server.stop()

    async def test_blocks_the_disk_refused_are_written_at_shutdown(self, sock_dir: Path) -> None:
        """A block still unsaved when the daemon stops is written by the stop's last attempt."""
        refusing = True

        class FullDisk(BlockStore):
            def apply(self, changes: Iterable[tuple[str, Block | None]]) -> None:
                if refusing:
                    raise StoreError(f"{self.path}: cannot write: No space left on device")
                super().apply(changes)

        async with trio.open_nursery() as run:
            running = await start(run, sock_dir, store=FullDisk(sock_dir / "state"))
            for i in range(5):
                await running.ask(fail("auth:m", f"r{i}"))
            refusing = False  # before the first retry is due
            running.server.stop()
        assert [b.user for b in BlockStore(sock_dir / "state").load()] == ["auth:m"]

    async def test_restart_keeps_the_block(self, nursery: trio.Nursery, sock_dir: Path) -> None:
        """A new server on the same state directory freezes the user blocked by the old one."""
        async with trio.open_nursery() as first_run:
            first = await start(first_run, sock_dir)
            with trio.fail_after(10):
                for i in range(5):
                    await first.ask(fail("auth:m", f"r{i}"))
            first.server.stop()
        second = await start(nursery, sock_dir)
        with trio.fail_after(10):
            assert (await second.ask(b"check user=auth:m")).verdict is Verdict.FREEZE
        second.server.stop()


class TestBadClients:
    async def test_malformed_requests_get_errors_and_others_are_served(
        self, running: Running
    ) -> None:
        """A malformed line gets ``error`` naming the problem; a stuck client holds nobody up."""
        with trio.fail_after(10), trio.socket.socket(trio.socket.AF_UNIX) as stuck:
            await stuck.connect(str(running.path))
            await stuck.send(b"rcpt user=")  # ... and nothing more for now
            reply = await running.ask(b"rcpt rcpt=x verify=fail")
            assert reply == Reply(Verdict.ERROR, "missing required key user")
            assert (await running.ask(b"frobnicate")).reason == (
                "unknown verb 'frobnicate' on the query socket (rcpt, report, check, ping)"
            )
            assert (await running.ask(b"x" * 5000)).reason == "request longer than 4096 bytes"
            assert (await running.ask(b"ping")).verdict is Verdict.PONG
            assert running.server.statistics().protocol_errors == 3

    async def test_client_that_vanishes(self, running: Running) -> None:
        """A client that connects and hangs up costs nothing but a counter."""
        with trio.fail_after(10):
            for _ in range(3):
                sock = trio.socket.socket(trio.socket.AF_UNIX)
                await sock.connect(str(running.path))
                sock.close()
            assert (await running.ask(b"ping")).verdict is Verdict.PONG

    async def test_slow_client_times_out(
        self, nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A client that never finishes its line is answered ``error`` after read_timeout."""
        running = await start(nursery, sock_dir, read_timeout=5.0)
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.connect(str(running.path))
        await sock.send(b"check user=x")
        started = trio.current_time()
        data = await sock.recv(100)
        assert trio.current_time() - started == pytest.approx(5.0)
        assert parse_reply(data).verdict is Verdict.ERROR
        assert await sock.recv(100) == b""
        sock.close()
        running.server.stop()

    async def test_the_longest_waiting_is_shed_for_a_new_one(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """Past max_connections waiting clients, the one that waited longest is answered
        ``defer`` and closed; the new one keeps its slot and is answered when its line comes."""
        running = await start(nursery, sock_dir, max_connections=2)
        with trio.fail_after(10):
            held = [trio.socket.socket(trio.socket.AF_UNIX) for _ in range(3)]
            for sock in held:
                await sock.connect(str(running.path))
                await trio.testing.wait_all_tasks_blocked()
            # the third connection had no request when accepted: the first made room for it
            assert parse_reply(await held[0].recv(100)) == Reply(
                Verdict.DEFER, "spamguardd busy: too many connections"
            )
            assert await held[0].recv(100) == b""
            await held[2].send(b"ping")
            held[2].shutdown(trio.socket.SHUT_WR)
            assert await held[2].recv(100) == b"pong\n"
            # a client whose request is complete on arrival needs no slot and is answered: like
            # Exim, connect, write and half-close before the server gets to run
            with socket.socket(socket.AF_UNIX) as eager:
                eager.connect(str(running.path))
                eager.sendall(b"ping")
                eager.shutdown(socket.SHUT_WR)
                eager.setblocking(False)
                await trio.lowlevel.wait_readable(eager)
                assert eager.recv(100) == b"pong\n"
            # the second still waits, untouched
            await held[1].send(b"check user=x\n")
            assert parse_reply(await held[1].recv(100)).verdict is Verdict.ACCEPT
            for sock in held:
                sock.close()
            await trio.testing.wait_all_tasks_blocked()
            assert running.server.statistics().open_connections == 0
        assert running.server.statistics().busy == 1
        running.server.stop()

    async def test_idle_clients_never_make_a_real_query_defer(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """Many idle clients against a few slots: every readsocket-style query is answered, even
        one accepted before its line arrived (it is the newest, so never the one shed)."""
        running = await start(nursery, sock_dir, max_connections=8)
        idle = []
        with trio.fail_after(20):
            for round_ in range(20):
                for _ in range(10):
                    sock = trio.socket.socket(trio.socket.AF_UNIX)
                    await sock.connect(str(running.path))
                    idle.append(sock)
                # connect, let the server accept it empty, then write the line and half-close
                with trio.socket.socket(trio.socket.AF_UNIX) as late:
                    await late.connect(str(running.path))
                    await trio.testing.wait_all_tasks_blocked()
                    await late.send(f"check user=u{round_}\n".encode())
                    late.shutdown(trio.socket.SHUT_WR)
                    assert parse_reply(await late.recv(100)).verdict is Verdict.ACCEPT
                assert (await running.ask(b"ping")).verdict is Verdict.PONG
            assert running.server.statistics().open_connections <= 8
        for sock in idle:
            sock.close()
        running.server.stop()

    async def test_descriptor_budget_bounds_held_connections(
        self, nursery: trio.Nursery, sock_dir: Path
    ) -> None:
        """However high max_connections, query connections never hold more descriptors than
        the budget: past it the longest-waiting is shed, and queries are still answered."""
        running = await start(nursery, sock_dir, max_connections=10_000, fd_budget=5)
        idle = []
        with trio.fail_after(10):
            for _ in range(30):
                sock = trio.socket.socket(trio.socket.AF_UNIX)
                await sock.connect(str(running.path))
                idle.append(sock)
                await trio.testing.wait_all_tasks_blocked()
                assert running.server.statistics().open_connections <= 5
            # complete on arrival: answered without taking a slot or shedding anyone
            with socket.socket(socket.AF_UNIX) as eager:
                eager.connect(str(running.path))
                eager.sendall(b"ping")
                eager.shutdown(socket.SHUT_WR)
                eager.setblocking(False)
                await trio.lowlevel.wait_readable(eager)
                assert eager.recv(100) == b"pong\n"
        assert running.server.statistics().busy == 25
        for sock in idle:
            sock.close()
        running.server.stop()

    async def test_stop_lets_a_waiting_client_finish_its_line(
        self, sock_dir: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """After a stop, a client that was still sending its line gets its answer, and the
        server returns once nobody waits (at most read_timeout later)."""
        async with trio.open_nursery() as nursery:
            running = await start(nursery, sock_dir, read_timeout=5.0)
            with trio.socket.socket(trio.socket.AF_UNIX) as sock:
                await sock.connect(str(running.path))
                await trio.testing.wait_all_tasks_blocked()
                running.server.stop()
                await trio.sleep(1)
                await sock.send(b"ping\n")
                assert await sock.recv(100) == b"pong\n"
            stopped = trio.current_time()
        assert trio.current_time() - stopped < 5.0

    async def test_latency_counts_the_wait_for_the_request(
        self, nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
    ) -> None:
        """``stats`` latency runs from the accept to the answer: a query that took 3 s to
        arrive shows 3 s, not the microseconds of deciding it."""
        running = await start(nursery, sock_dir, read_timeout=5.0)
        with trio.socket.socket(trio.socket.AF_UNIX) as sock:
            await sock.connect(str(running.path))
            await trio.sleep(3)
            await sock.send(b"ping\n")
            assert await sock.recv(100) == b"pong\n"
        snapshot = running.server.latency.snapshot()
        assert percentiles(snapshot.bounds, snapshot.counts)["p50"] == 5000.0  # 2.5-5 s bucket
        assert snapshot.total == pytest.approx(3.0)
        running.server.stop()

    async def test_internal_error_is_contained(self, running: Running) -> None:
        """A bug while deciding one query answers ``error`` and the next query is served."""
        original = running.policy.decide

        def explode(request: object, **kwargs: float) -> object:
            if getattr(request, "user", None) == "auth:bug":
                raise RuntimeError("boom")
            return original(request, **kwargs)  # type: ignore[arg-type]

        running.policy.decide = explode  # type: ignore[assignment,method-assign]
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            assert (await running.ask(b"check user=auth:bug")).verdict is Verdict.ERROR
            assert (await running.ask(b"check user=auth:ok")).verdict is Verdict.ACCEPT
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["internal_error"]


class TestSocketPath:
    async def test_refuses_to_replace_a_file(self, sock_dir: Path) -> None:
        """A regular file at the socket path is never deleted."""
        path = sock_dir / "q.sock"
        path.write_text("precious")
        with pytest.raises(FileExistsError, match="not a socket"):
            bind_unix_listener(path, mode=0o660, group=None, backlog=16)
        assert path.read_text() == "precious"

    async def test_refuses_to_steal_a_live_socket(self, running: Running) -> None:
        """A second daemon on the same path does not take the socket from a running one."""
        with pytest.raises(FileExistsError, match="another process is listening"):
            bind_unix_listener(running.path, mode=0o660, group=None, backlog=16)
        assert (await running.ask(b"ping")).verdict is Verdict.PONG

    async def test_replaces_a_stale_socket(self, sock_dir: Path) -> None:
        """A socket left by a crashed daemon is replaced."""
        path = sock_dir / "q.sock"
        old = bind_unix_listener(path, mode=0o660, group=None, backlog=16)
        old.close()
        new = bind_unix_listener(path, mode=0o600, group=None, backlog=16)
        new.close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(os.listdir(sock_dir)) == ["q.sock"]  # noqa: PTH208 (ASYNC240 bans Path.iterdir)

    async def test_unknown_group(self, sock_dir: Path) -> None:
        """A socket group that does not exist is named in the error."""
        with pytest.raises(LookupError, match="'no-such-group' does not exist"):
            bind_unix_listener(sock_dir / "q.sock", mode=0o660, group="no-such-group", backlog=16)


async def test_day_of_traffic_under_mock_clock(
    nursery: trio.Nursery, sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A simulated day through the real socket: typos never block, a spammer is frozen."""
    running = await start(nursery, sock_dir, PolicyConfig())
    frozen_at = None
    for minute in range(24 * 60):
        if minute % 3 == 0:
            await running.ask(fail("auth:sales", f"typo{minute}"))
        if minute >= 9 * 60 and frozen_at is None:
            for i in range(10):
                if (
                    await running.ask(fail("auth:spam", f"h{minute}.{i}"))
                ).verdict is Verdict.FREEZE:
                    frozen_at = trio.current_time()
                    break
        await trio.sleep(60)
    assert [b.user for b in running.store.load()] == ["auth:spam"]
    block = running.store.load()[0]
    assert block.blocked_at == int(T0 + frozen_at)  # type: ignore[operator]
    assert 9 * 3600 <= frozen_at <= 9 * 3600 + 15 * 60  # type: ignore[operator]
    assert running.server.statistics().queries[("rcpt", "freeze")] == 1
    running.server.stop()


class TestPersister:
    async def test_a_change_nobody_named_is_still_written(self, tmp_path: Path) -> None:
        """The executor names each changed user; a block made without it (a path that forgot)
        does not add up with the file, so the write covers every user."""
        store = BlockStore(tmp_path)
        policy = Policy(FIVE, store.open())
        persister = BlockPersister(policy, store)
        named = policy.block("auth:named", "r", by="admin", wall_now=T0)
        persister.changed("auth:named")
        unnamed = policy.block("auth:unnamed", "r", by="admin", wall_now=T0)
        assert named.needs_generation is not None
        assert unnamed.needs_generation is not None
        await persister.wait_durable(unnamed.needs_generation)
        assert sorted(b.user for b in BlockStore(tmp_path).load()) == [
            "auth:named",
            "auth:unnamed",
        ]
        assert persister.writes == 1

    async def test_one_write_for_a_burst_of_blocks(self, tmp_path: Path) -> None:
        """Group commit: blocks made while a write is in flight share the next one."""
        store = BlockStore(tmp_path)
        policy = Policy(FIVE, store.open())
        persister = BlockPersister(policy, store)
        changes = []
        for i in range(20):
            changes.append(policy.block(f"auth:u{i}", "r", by="admin", wall_now=T0))
            persister.changed(f"auth:u{i}")
        async with trio.open_nursery() as nursery:
            for change in changes:
                assert change.needs_generation is not None
                nursery.start_soon(persister.wait_durable, change.needs_generation)
        assert persister.writes == 1
        assert len(BlockStore(tmp_path).load()) == 20
