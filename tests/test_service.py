"""Running as a service, in process: sd_notify, inherited sockets, reload, snapshot, metrics.

Real sockets live in a short directory under /tmp (``sock_dir``); every test has a deadline.
The process-level tests (systemd-socket-activate, signals, SIGKILL) are in test_systemd.py.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import structlog
import structlog.testing
import trio
from prometheus_client.parser import text_string_to_metric_families

from spamguardd.core import buckets
from spamguardd.core.adminproto import StatsReply
from spamguardd.core.config import Config, load_config
from spamguardd.core.errors import StateLockedError, StoreError
from spamguardd.core.latency import LatencyHistogram
from spamguardd.core.policy import Block, PolicyStatistics
from spamguardd.core.statistics import (
    EffectStatistics,
    NoticeStatistics,
    ServerStatistics,
    Statistics,
)
from spamguardd.daemon.app import Daemon
from spamguardd.daemon.metrics import render_metrics
from spamguardd.daemon.metrics_http import serve_metrics
from spamguardd.daemon.systemd import SdNotify, listen_fds, watchdog_interval
from tests.helpers import T0, readsocket


def fail(n: int, user: str = "auth:a") -> bytes:
    return f"rcpt user={user} rcpt=r{n}@x verify=fail".encode()


@pytest.fixture(name="notify_socket")
def _notify_socket(sock_dir: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_dir / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every notification waiting on *sock*, in order."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(5)


class TestListenFds:
    def test_nothing_passed(self) -> None:
        """Without LISTEN_FDS there are no inherited sockets."""
        assert listen_fds({}) == {}

    def test_for_another_process(self) -> None:
        """Descriptors meant for another pid are left alone, and the variables removed."""
        environ = {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "query:admin"}
        assert listen_fds(environ, pid=4242) == {}
        assert environ == {}

    def test_named_sockets(self) -> None:
        """Descriptors from the first one on are adopted under their FileDescriptorName."""
        first, second = socket.socketpair()
        try:
            environ = {"LISTEN_FDS": "1", "LISTEN_PID": "7", "LISTEN_FDNAMES": "query"}
            sockets = listen_fds(environ, pid=7, start=first.fileno())
            assert list(sockets) == ["query"]
            assert sockets["query"].fileno() == first.fileno()
            assert not os.get_inheritable(first.fileno())
            sockets["query"].detach()
        finally:
            first.close()
            second.close()

    def test_descriptors_that_are_not_sockets_are_ignored(self, tmp_path: Path) -> None:
        """LISTEN_FDS naming a closed descriptor or a file is logged and skipped (the socket is
        then bound from the configuration), never a traceback."""
        with (tmp_path / "file").open("w") as plain:
            closed = os.dup(plain.fileno())
            os.close(closed)
            for fd in (plain.fileno(), closed):
                environ = {"LISTEN_FDS": "1", "LISTEN_PID": "7", "LISTEN_FDNAMES": "query"}
                with structlog.testing.capture_logs() as logs:
                    assert listen_fds(environ, pid=7, start=fd) == {}
                assert logs[0]["event"] == "listen_fd_ignored"
                assert logs[0]["fd"] == fd


class TestSdNotify:
    def test_messages(self, notify_socket: socket.socket) -> None:
        """Each state change is one datagram of KEY=VALUE lines."""
        notifier = SdNotify.from_environ({"NOTIFY_SOCKET": notify_socket.getsockname()})
        assert notifier is not None
        notifier.ready("serving")
        notifier.reloading()
        notifier.stopping()
        notifier.watchdog()
        notifier.watchdog("serving; 7 users counted, 1 blocked")
        notifier.close()
        messages = received(notify_socket)
        assert messages[0] == "READY=1\nSTATUS=serving"
        assert messages[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert messages[2:] == [
            "STOPPING=1\nSTATUS=stopping",
            "WATCHDOG=1",
            "WATCHDOG=1\nSTATUS=serving; 7 users counted, 1 blocked",  # the counts kept fresh
        ]

    def test_abstract_namespace(self) -> None:
        """An address starting with @ is an abstract socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0spamguardd-test-notify")
            notifier = SdNotify("@spamguardd-test-notify")
            assert notifier.watchdog()
            assert sock.recv(100) == b"WATCHDOG=1"
            notifier.close()

    def test_not_asked(self) -> None:
        """No NOTIFY_SOCKET, no notifier."""
        assert SdNotify.from_environ({}) is None

    def test_send_failure_is_not_fatal(self, sock_dir: Path) -> None:
        """Nobody listening: the failure is logged and reported, not raised."""
        notifier = SdNotify(str(sock_dir / "nobody"))
        with structlog.testing.capture_logs() as logs:
            assert not notifier.ready("x")
        assert logs[0]["event"] == "sd_notify_failed"
        notifier.close()

    @pytest.mark.parametrize(
        ("environ", "interval"),
        [
            ({"WATCHDOG_USEC": "20000000"}, 10.0),
            ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, 10.0),
            ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "8"}, None),
            ({}, None),
        ],
    )
    def test_watchdog_interval(self, environ: dict[str, str], interval: float | None) -> None:
        """Pings go at half the watchdog timeout, and only for the watched process."""
        assert watchdog_interval(environ, pid=7) == interval


def write_config(path: Path, sock_dir: Path, limits: str, extra: str = "") -> None:
    path.write_text(
        f'[limits]\nfailed_recipients = "{limits}"\n'
        f'[server]\nquery_socket = "{sock_dir / "q.sock"}"\n'
        f'[state]\ndir = "{sock_dir / "state"}"\n'
        f'[admin]\nsocket = "{sock_dir / "admin.sock"}"\n{extra}'
    )


class TestDaemon:
    async def test_reload_keeps_counters_and_notifies(
        self, sock_dir: Path, notify_socket: socket.socket
    ) -> None:
        """After 3 failures under 10/1h a reload to 4/1h blocks at the 4th; sd_notify in order."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "10/1h")
        sd_notify = SdNotify(notify_socket.getsockname())
        daemon = Daemon(
            load_config(path), sd_notify=sd_notify, load_config=lambda: load_config(path)
        )
        query = sock_dir / "q.sock"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                for i in range(3):
                    assert await readsocket(query, fail(i)) == b"accept\n"
                write_config(path, sock_dir, "4/1h")
                result = daemon.reload()
                assert result.ok
                assert result.carried_users == 1
                assert (await readsocket(query, fail(3))).startswith(b"freeze ")
                daemon.stop()
        messages = [m.split("\n")[0] for m in received(notify_socket)]
        assert messages == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
        sd_notify.close()

    async def test_a_stop_removes_the_socket_files_it_bound_and_no_other(
        self, sock_dir: Path
    ) -> None:
        """A stopped daemon leaves no socket file for Exim to be refused on; a socket another
        process put at the path meanwhile (a successor) is left alone."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "3/1h")
        query, admin = sock_dir / "q.sock", sock_dir / "admin.sock"
        daemon = Daemon(load_config(path), load_config=lambda: load_config(path))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                assert await readsocket(query, b"ping\n") == b"pong\n"
                daemon.stop()
        assert not query.exists()
        assert not admin.exists()
        daemon = Daemon(load_config(path), load_config=lambda: load_config(path))
        with trio.fail_after(10), socket.socket(socket.AF_UNIX) as successor:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                admin.unlink()
                successor.bind(str(admin))
                daemon.stop()
            assert not query.exists()
            assert admin.exists()  # not ours any more

    async def test_a_refusing_block_file_is_said_loudly_and_retried(
        self, sock_dir: Path, notify_socket: socket.socket
    ) -> None:
        """Disk full: the block is answered defer, and the log, stats, the metrics and
        systemd's status line say why; once the disk takes it, freeze again and all clear."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "2/1h")
        sd_notify = SdNotify(notify_socket.getsockname())
        daemon = Daemon(load_config(path), sd_notify=sd_notify)
        apply = daemon.store.apply
        refusing = True

        def full(changes: Iterable[tuple[str, Block | None]]) -> None:
            if refusing:
                raise StoreError(f"{daemon.store.path}: cannot write: No space left on device")
            apply(changes)

        daemon.store.apply = full  # type: ignore[method-assign]
        daemon.persister.retry_min = daemon.persister.retry_max = 0.05
        recovered = trio.Event()
        report = daemon.persister.on_state

        def on_state(error: str | None) -> None:
            report(error)
            if error is None:
                recovered.set()

        daemon.persister.on_state = on_state
        query = sock_dir / "q.sock"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                await readsocket(query, fail(0))
                assert (await readsocket(query, fail(1))).startswith(b"defer ")
                stats = StatsReply.from_statistics(daemon.statistics())
                assert not stats.block_file.ok
                assert stats.block_file.unsaved_users == 1
                assert "No space left on device" in (stats.block_file.error or "")
                assert "spamguardd_block_file_ok 0.0" in daemon.render_metrics()
                refusing = False
                await recovered.wait()
                assert (await readsocket(query, b"check user=auth:a")).startswith(b"freeze ")
                assert "spamguardd_block_file_ok 1.0" in daemon.render_metrics()
                daemon.stop()
        statuses = [m for m in received(notify_socket) if m.startswith("STATUS=")]
        assert statuses[0].startswith("STATUS=BLOCK FILE NOT WRITABLE (")
        assert statuses[1].startswith("STATUS=serving; ")
        sd_notify.close()

    async def test_the_state_directory_is_taken_whole(self, sock_dir: Path) -> None:
        """A start takes the state directory's lock (a second daemon on it is refused) and
        removes the temporary files an interrupted write left; the lock goes with the run."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "2/1h")
        (sock_dir / "state").mkdir()
        stale = sock_dir / "state" / ".blocked.k3j4h2.tmp"
        stale.write_bytes(b'"auth:half')
        with structlog.testing.capture_logs() as logs:
            daemon = Daemon(load_config(path))
        assert not stale.exists()
        assert {"event": "stale_temporary_removed", "path": str(stale), "log_level": "warning"} in (
            logs
        )
        with pytest.raises(StateLockedError, match=rf"pid {os.getpid()} holds"):
            Daemon(load_config(path))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                daemon.stop()
        Daemon(load_config(path)).close()  # free again once the first has stopped

    async def test_broken_file_keeps_the_running_config(self, sock_dir: Path) -> None:
        """A reload from a bad file logs every problem and changes nothing."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "3/1h")
        daemon = Daemon(load_config(path), load_config=lambda: load_config(path))
        query = sock_dir / "q.sock"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                assert await readsocket(query, fail(0)) == b"accept\n"
                path.write_text('mode = "x"\n[limits]\nfailed_recipients = "5"\n')
                with structlog.testing.capture_logs() as logs:
                    result = daemon.reload()
                assert not result.ok
                assert len(result.problems) == 2
                assert logs[0]["event"] == "reload_failed"
                assert logs[0]["problems"] == list(result.problems)
                assert await readsocket(query, fail(1)) == b"accept\n"
                assert (await readsocket(query, fail(2))).startswith(b"freeze ")
                daemon.stop()

    async def test_snapshot_at_shutdown_and_restore(self, sock_dir: Path) -> None:
        """Counters saved at shutdown are there at the next start."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "3/1h")
        query = sock_dir / "q.sock"
        for attempt in range(2):
            daemon = Daemon(load_config(path))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        lambda task_status, d=daemon: d.run(
                            handle_signals=False, task_status=task_status
                        )
                    )
                    await daemon.counters.loaded.wait()
                    reply = await readsocket(query, fail(attempt))
                    daemon.stop()
            assert reply == b"accept\n"
        assert daemon.policy.statistics().tracked_users == 1
        state = daemon.policy.user_state("auth:a")
        assert state is not None
        (tokens,) = buckets.tokens_left(state, daemon.config.policy.failed_recipients)
        assert tokens == pytest.approx(1.0, abs=0.01)

    async def test_inherited_sockets_are_adopted_by_name(self, sock_dir: Path) -> None:
        """An inherited query socket is served; the admin one is kept for the admin server."""
        query = socket.socket(socket.AF_UNIX)
        query.bind(str(sock_dir / "inherited.sock"))
        query.listen(16)
        admin = socket.socket(socket.AF_UNIX)
        admin.bind(str(sock_dir / "inherited-admin.sock"))
        admin.listen(16)
        config = Config()
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "3/1h")
        daemon = Daemon(load_config(path), inherited={"query": query, "admin": admin})
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                assert await readsocket(sock_dir / "inherited.sock", b"ping") == b"pong\n"
                assert not (sock_dir / "q.sock").exists()
                assert daemon.inherited == {}  # both taken: query served, admin by the admin server
                assert not (sock_dir / "admin.sock").exists()
                daemon.stop()
        assert config.metrics.listen is None

    async def test_metrics_count_what_was_served(self, sock_dir: Path) -> None:
        """The daemon's metrics reflect its queries and its policy."""
        path = sock_dir / "c.toml"
        write_config(path, sock_dir, "2/1h")
        daemon = Daemon(load_config(path))
        query = sock_dir / "q.sock"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                await readsocket(query, fail(0))
                await readsocket(query, fail(1))
                await readsocket(query, fail(0, "auth:b"))
                text = daemon.render_metrics()
                daemon.stop()
        assert 'spamguardd_queries_total{verb="rcpt",verdict="accept"} 2.0' in text
        assert 'spamguardd_queries_total{verb="rcpt",verdict="freeze"} 1.0' in text
        assert "spamguardd_blocks_total 1.0" in text
        assert "spamguardd_blocked_users 1.0" in text
        assert "spamguardd_tracked_users 1.0" in text
        assert "spamguardd_query_duration_seconds_count 3.0" in text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(port: int, path: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    return data


class TestMetrics:
    async def test_daemon_serves_metrics_when_configured(self, sock_dir: Path) -> None:
        """With [metrics] listen, the daemon answers GET /metrics with its own counters."""
        path = sock_dir / "c.toml"
        port = free_port()
        write_config(path, sock_dir, "2/1h", f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        daemon = Daemon(load_config(path))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: daemon.run(handle_signals=False, task_status=task_status)
                )
                assert await readsocket(sock_dir / "q.sock", b"ping") == b"pong\n"
                reply = await http_get(port, b"/metrics")
                daemon.stop()
        assert reply.startswith(b"HTTP/1.0 200 OK")
        assert b'spamguardd_queries_total{verb="ping",verdict="pong"} 1.0' in reply

    def test_render(self) -> None:
        """Every family is present, parseable, and zero where nothing happened yet."""
        latency = LatencyHistogram()
        latency.observe(0.00005)
        latency.observe(0.003)
        text = render_metrics(
            Statistics(
                version="0",
                started_at=T0,
                now=T0 + 60,
                mode="enforce",
                policy=PolicyStatistics(
                    tracked_users=4, blocked_users=2, would_block_users=0, generation=1
                ),
                server=ServerStatistics(
                    queries={("rcpt", "accept"): 7, ("rcpt", "freeze"): 1},
                    protocol_errors=3,
                    internal_errors=0,
                    busy=0,
                    open_connections=1,
                ),
                effects=EffectStatistics(
                    auto_blocks=1,
                    admin_blocks=0,
                    unblocks=0,
                    resets=0,
                    would_blocks=0,
                    store_failures=0,
                    journal_failures=0,
                ),
                notices=NoticeStatistics(
                    queued=2,
                    sent=2,
                    failed=0,
                    dropped=0,
                    unsent=0,
                    retries=0,
                    hooks_ok=1,
                    hooks_failed=1,
                ),
                latency=latency.snapshot(),
                admin_errors=0,
            )
        )
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert samples["spamguardd_queries_total", (("verb", "rcpt"), ("verdict", "accept"))] == 7
        assert samples["spamguardd_blocks_total", ()] == 1
        assert samples["spamguardd_unblocks_total", ()] == 0
        assert samples["spamguardd_notices_sent_total", ()] == 2
        assert samples["spamguardd_notices_dropped_total", ()] == 0
        assert samples["spamguardd_hooks_ok_total", ()] == 1
        assert samples["spamguardd_hooks_failed_total", ()] == 1  # an alert needs it
        assert samples["spamguardd_protocol_errors_total", ()] == 3
        assert samples["spamguardd_tracked_users", ()] == 4
        assert samples["spamguardd_blocked_users", ()] == 2
        assert samples["spamguardd_open_connections", ()] == 1
        assert samples["spamguardd_query_duration_seconds_bucket", (("le", "0.0001"),)] == 1
        assert samples["spamguardd_query_duration_seconds_bucket", (("le", "0.005"),)] == 2
        assert samples["spamguardd_query_duration_seconds_count", ()] == 2

    async def test_http_endpoint(self) -> None:
        """GET /metrics answers the exposition; other paths get 404."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(serve_metrics, "127.0.0.1", 0, lambda: "m 1\n")
                port = listeners[0].socket.getsockname()[1]
                replies = [await http_get(port, path) for path in (b"/metrics", b"/other")]
                nursery.cancel_scope.cancel()
        assert replies[0].startswith(b"HTTP/1.0 200 OK\r\n")
        assert b"text/plain; version=0.0.4" in replies[0]
        assert replies[0].endswith(b"\r\n\r\nm 1\n")
        assert replies[1].startswith(b"HTTP/1.0 404 ")
