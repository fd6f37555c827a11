"""The query socket: accept, read one request, decide, make blocks durable, answer, close.

This is the hot path (Exim opens one connection per RCPT), so it works on plain non-blocking
sockets with ``trio.lowlevel.wait_readable`` rather than on trio's Stream or socket wrappers, and
answers a complete request inside the accept loop without starting a task: measured on the
2-core reference machine, that serves more queries per second than a bare trio server doing the
accept/recv/send/close dance with nothing to decide (``docs/performance.md``).

Rules every connection follows:

* one request, one reply, then close at once: Exim's readsocket reads until EOF and throws away a
  reply that is followed by silence;
* the read is bounded in size (the protocol's cap) and in time (``server.read_timeout``);
* past ``server.max_connections`` a new connection still gets an answer, ``defer``, instead of
  waiting or being refused: a refused connect poisons the Exim process (docs/exim-facts.md §1.4);
* a failure while serving one client is logged and answered ``error``; every other client is
  served as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import structlog
import trio

from spamguardd.core.config import ServerConfig
from spamguardd.core.errors import RemoteProtocolError, StoreError
from spamguardd.core.latency import LatencyHistogram
from spamguardd.core.policy import Decision, Policy
from spamguardd.core.protocol import (
    MAX_REQUEST_SIZE,
    NEED_DATA,
    CheckRequest,
    PingRequest,
    PolicyConnection,
    RcptRequest,
    Reply,
    ReportRequest,
    Request,
    Verdict,
)
from spamguardd.core.statistics import ServerStatistics
from spamguardd.daemon.effects import EffectExecutor

if TYPE_CHECKING:
    from spamguardd.daemon.cluster import Cluster

log = structlog.get_logger("spamguardd.daemon.query_server")

BUSY: Final = Reply(Verdict.DEFER, "spamguardd busy: too many connections")
INTERNAL_ERROR: Final = Reply(Verdict.ERROR, "internal error in spamguardd; see its log")
#: The answer to a block verdict while the block file cannot be written: nothing is accepted,
#: nothing is lost (Exim answers 4xx and the client retries), and the block holds in memory.
NOT_SAVED: Final = Reply(Verdict.DEFER, "spamguardd cannot save its block list; try again later")
TIMEOUT_MESSAGE: Final = "no complete request line before the read timeout"
#: How long a connection turned away as busy may take to send its request before the answer.
BUSY_READ_TIMEOUT: Final = 1.0
#: Connections accepted in one go before the accept loop yields to other tasks.
ACCEPT_BATCH: Final = 64
#: After an error reply, how long and how much input is drained before closing.
DRAIN_TIMEOUT: Final = 1.0
DRAIN_LIMIT: Final = 64 * 1024
#: accept() errors that mean "out of a resource for now": wait and retry rather than die (as
#: trio.serve_listeners does).
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SLEEP: Final = 0.1

_VERBS: Final = {
    RcptRequest: "rcpt",
    ReportRequest: "report",
    CheckRequest: "check",
    PingRequest: "ping",
}


class QueryServer:
    """Serves the query protocol on any number of listening sockets.

    A connection whose request is already complete when it is accepted (the common case: Exim
    connects and writes at once) is answered right there, without a task of its own. Only a
    connection that must wait, for more of its request or for a new block to reach the disk,
    gets a task, and only those count against ``max_connections``.
    """

    def __init__(  # noqa: PLR0913 - keyword-only seams, one per collaborator
        self,
        config: ServerConfig,
        policy: Policy,
        effects: EffectExecutor,
        *,
        wall_clock: Callable[[], float] = time.time,
        log_decisions: bool = False,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        #: Fleet mode: failed recipients are counted in the shared store, in a task each (the
        #: only queries that wait for it); everything else is answered here as before.
        self.cluster = cluster
        #: Carries out what each decision implies (log, journal, notices, durable blocks).
        self.effects = effects
        self.wall_clock = wall_clock
        #: Log every decision (at debug level). Off by default, because even a filtered log
        #: call builds its arguments, and that is measurable at thousands of queries a second.
        self.log_decisions = log_decisions
        self._queries: Counter[tuple[str, str]] = Counter()
        self._protocol_errors = 0
        self._internal_errors = 0
        self._busy = 0
        self._open = 0
        self._stopping = trio.Event()
        #: Time from accept to decision of every query, for the metrics.
        self.latency = LatencyHistogram()

    def statistics(self) -> ServerStatistics:
        """Current counters."""
        return ServerStatistics(
            queries=dict(self._queries),
            protocol_errors=self._protocol_errors,
            internal_errors=self._internal_errors,
            busy=self._busy,
            open_connections=self._open,
        )

    def stop(self) -> None:
        """Stop accepting; :meth:`serve` returns once in-flight answers are sent."""
        self._stopping.set()

    async def serve(
        self,
        listeners: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and answer on *listeners* until :meth:`stop`, then drain and return.

        The listeners are closed on return (the server owns them from here on). In-flight
        connections get up to ``read_timeout`` + 1 s to finish after the stop.
        """
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        listener.setblocking(False)
                        acceptors.start_soon(self._accept_loop, listener, handlers)
                    task_status.started()
                    await self._stopping.wait()
                    acceptors.cancel_scope.cancel()
                grace = self.config.read_timeout + 1.0
                handlers.cancel_scope.deadline = trio.current_time() + grace
        finally:
            for listener in listeners:
                listener.close()

    async def _accept_loop(self, listener: socket.socket, handlers: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept_failed", error=os.strerror(exc.errno or 0))
                    await trio.sleep(_ACCEPT_RETRY_SLEEP)
                    break
                self._serve_accepted(conn, handlers)

    def _serve_accepted(self, conn: socket.socket, handlers: trio.Nursery) -> None:
        """Answer *conn* now if its request is complete, else give it a task (or turn it away).

        *conn* is still a blocking socket here: every call passes MSG_DONTWAIT, which saves the
        two fcntl calls of making it non-blocking, and only a connection handed to a task is.
        """
        started = trio.current_time()
        connection = PolicyConnection()
        try:
            # Usually the whole request is already here, and with readsocket's default
            # half-close so is the EOF that ends it: read until the request is complete or the
            # socket has nothing more for now.
            while (request := connection.next_request()) is NEED_DATA:
                connection.receive_data(conn.recv(MAX_REQUEST_SIZE, socket.MSG_DONTWAIT))
        except BlockingIOError:
            request = NEED_DATA
        except RemoteProtocolError as exc:
            conn.setblocking(False)
            handlers.start_soon(self._send_error, conn, self._protocol_error(str(exc)))
            return
        except OSError as exc:
            self._client_gone(conn, exc)
            return
        cluster = self.cluster
        if (
            cluster is not None
            and request is not NEED_DATA
            and self._open < self.config.max_connections
            and (counted := cluster.to_count(request)) is not None
        ):
            conn.setblocking(False)
            self._open += 1
            handlers.start_soon(self._count_in_store, conn, request, counted, started)
            return
        if request is NEED_DATA:
            conn.setblocking(False)
            if self._open >= self.config.max_connections:
                self._busy += 1
                handlers.start_soon(self._turn_away, conn, connection)
            else:
                self._open += 1  # counted now: tasks started in this batch have not run yet
                handlers.start_soon(self._handle, conn, connection, started)
            return
        reply, generation = self._decide(request, started)
        durable = generation is None or self.effects.persister.durable_generation >= generation
        if durable and _send_nowait(conn, reply.to_bytes()):
            conn.close()
            return
        conn.setblocking(False)
        handlers.start_soon(self._finish, conn, reply, generation)

    async def _handle(
        self, conn: socket.socket, connection: PolicyConnection, started: float
    ) -> None:
        """Slow path: wait (bounded) for the rest of the request, then answer."""
        try:
            with conn:
                try:
                    with trio.fail_after(self.config.read_timeout):
                        while (request := connection.next_request()) is NEED_DATA:
                            connection.receive_data(await _recv(conn))
                except RemoteProtocolError as exc:
                    await self._reply_error(conn, self._protocol_error(str(exc)))
                    return
                except trio.TooSlowError:
                    await self._reply_error(conn, self._protocol_error(TIMEOUT_MESSAGE))
                    return
                except OSError as exc:
                    self._client_gone(conn, exc)
                    return
                if self.cluster is not None and (counted := self.cluster.to_count(request)):
                    reply, generation = await self._decide_in_store(request, counted, started)
                else:
                    reply, generation = self._decide(request, started)
                await self._reply(conn, reply, generation)
        finally:
            self._open -= 1

    async def _count_in_store(
        self, conn: socket.socket, request: Request, counted: RcptRequest, started: float
    ) -> None:
        """A complete request whose failure the fleet's store counts (fleet mode)."""
        try:
            with conn:
                reply, generation = await self._decide_in_store(request, counted, started)
                await self._reply(conn, reply, generation)
        finally:
            self._open -= 1

    async def _decide_in_store(
        self, request: Request, counted: RcptRequest, started: float
    ) -> tuple[Reply, int | None]:
        assert self.cluster is not None  # noqa: S101 - only called in fleet mode
        try:
            decision = await self.cluster.decide(counted)
        except Exception:  # the one place a bug in one query must not take down the others
            self._internal_errors += 1
            log.exception("internal_error", request=repr(request))
            return INTERNAL_ERROR, None
        return self._decided(request, decision, started)

    async def _finish(self, conn: socket.socket, reply: Reply, generation: int | None) -> None:
        """Slow path for a decided request whose reply waits for the disk (or a full buffer)."""
        with conn:
            await self._reply(conn, reply, generation)

    async def _reply(self, conn: socket.socket, reply: Reply, generation: int | None) -> None:
        if generation is not None:
            # A block verdict goes out only once the block is on disk. While the disk refuses,
            # the block holds in memory and the answer is defer: the mail is held either way,
            # and no restart can lose a block that was announced (the persister retries).
            try:
                await self.effects.wait_durable(generation)
            except StoreError:  # logged and counted by the persister and the executor
                reply = NOT_SAVED
        with contextlib.suppress(OSError):  # the client gave up; nothing to tell it
            await _send_all(conn, reply.to_bytes())

    async def _send_error(self, conn: socket.socket, reply: Reply) -> None:
        with conn:
            await self._reply_error(conn, reply)

    async def _reply_error(self, conn: socket.socket, reply: Reply) -> None:
        with contextlib.suppress(OSError):
            await _send_all(conn, reply.to_bytes())
            await _drain(conn)

    async def _turn_away(self, conn: socket.socket, connection: PolicyConnection) -> None:
        with conn, contextlib.suppress(OSError):
            # read the rest of the request (whatever it is) so that the close is orderly
            with trio.move_on_after(BUSY_READ_TIMEOUT), contextlib.suppress(RemoteProtocolError):
                while connection.next_request() is NEED_DATA:
                    connection.receive_data(await _recv(conn))
            await _send_all(conn, BUSY.to_bytes())

    def _protocol_error(self, message: str) -> Reply:
        self._protocol_errors += 1
        log.info("bad_request", error=message)
        return Reply(Verdict.ERROR, message)

    def _client_gone(self, conn: socket.socket, exc: OSError) -> None:
        self._protocol_errors += 1
        log.info("client_gone", error=exc.strerror)
        conn.close()

    def _decide(self, request: Request, started: float) -> tuple[Reply, int | None]:
        """Run the policy, carry out its effects; returns the reply and the generation it needs."""
        try:
            decision = self.policy.decide(request, now=started, wall_now=self.wall_clock())
        except Exception:  # the one place a bug in one query must not take down the others
            self._internal_errors += 1
            log.exception("internal_error", request=repr(request))
            return INTERNAL_ERROR, None
        return self._decided(request, decision, started)

    def _decided(
        self, request: Request, decision: Decision, started: float
    ) -> tuple[Reply, int | None]:
        """Carry out a decision's effects and count it; the reply and the generation it needs."""
        self.effects.carry_out(decision.effects)
        verb = _VERBS[type(request)]
        self._queries[verb, decision.reply.verdict.value] += 1
        self.latency.observe(trio.current_time() - started)
        if self.log_decisions:
            log.debug(
                "policy_decision",
                verb=verb,
                user=getattr(request, "user", None),
                verdict=str(decision.reply.verdict),
                counted=decision.counted,
                tokens_left=decision.tokens_left,
                elapsed_ms=round((trio.current_time() - started) * 1000, 3),
            )
        return decision.reply, decision.needs_generation


def _send_nowait(conn: socket.socket, data: bytes) -> bool:
    """Send *data* without waiting; True when all of it went (always, for a fresh socket)."""
    try:
        return conn.send(data, socket.MSG_DONTWAIT) == len(data)
    except BlockingIOError:
        return False
    except OSError:
        return True  # the client is gone: nothing more to send, the connection can close


async def _recv(conn: socket.socket) -> bytes:
    while True:
        try:
            return conn.recv(MAX_REQUEST_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(conn)


async def _drain(conn: socket.socket) -> None:
    """After an error reply, read and drop what the client still sends, then let it go.

    Closing a Unix socket with unread input resets the connection, and the peer may then lose
    the reply it has not read yet; an orderly shutdown and a bounded drain let it read the error.
    """
    conn.shutdown(socket.SHUT_WR)
    budget = DRAIN_LIMIT
    with trio.move_on_after(DRAIN_TIMEOUT):
        while budget > 0 and (chunk := await _recv(conn)):
            budget -= len(chunk)


async def _send_all(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(conn)
