"""The query socket: accept, read one request, decide, make blocks durable, answer, close.

This is the hot path (Exim opens one connection per RCPT), so it works on plain non-blocking
sockets with ``trio.lowlevel.wait_readable`` rather than on trio's Stream or socket wrappers, and
answers a complete request inside the accept loop without starting a task: measured on the
2-core reference machine, that serves more queries per second than a bare trio server doing the
accept/recv/send/close dance with nothing to decide (``docs/performance.md``).

Rules every connection follows:

* one request, one reply, then close at once: Exim's readsocket reads until EOF and throws away a
  reply that is followed by silence;
* the read is bounded in size (the protocol's cap) and in time (``server.read_timeout``, from
  the accept);
* connections that have not sent a whole request are *waiting*; at most
  ``server.max_connections`` of them are kept, and a new one past that is let in by shedding
  the one that has waited longest (answered ``defer``, closed): a slow or idle client loses its
  slot to a fresh one that is about to send its line, never the other way round, and nobody is
  refused (a refused connect poisons the Exim process, docs/exim-facts.md §1.4);
* query connections never hold more descriptors than :func:`fdlimit.query_budget` leaves: at
  the budget the longest-waiting connection is shed, and with none to shed the accept loop waits
  (new clients queue in the listen backlog) while the reserve stays free for the block file, the
  snapshot, the journal, notices and the admin socket;
* the latency recorded is from the accept to the answer written, waits included;
* a failure while serving one client is logged and answered ``error``; every other client is
  served as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

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
from spamguardd.daemon import fdlimit
from spamguardd.daemon.effects import EffectExecutor
from spamguardd.daemon.waiting import RoomHandlers, WaitingRoom

if TYPE_CHECKING:
    from spamguardd.daemon.cluster import Cluster

log = structlog.get_logger("spamguardd.daemon.query_server")

BUSY: Final = Reply(Verdict.DEFER, "spamguardd busy: too many connections")
INTERNAL_ERROR: Final = Reply(Verdict.ERROR, "internal error in spamguardd; see its log")
#: The answer to a block verdict while the block file cannot be written: nothing is accepted,
#: nothing is lost (Exim answers 4xx and the client retries), and the block holds in memory.
NOT_SAVED: Final = Reply(Verdict.DEFER, "spamguardd cannot save its block list; try again later")
TIMEOUT_MESSAGE: Final = "no complete request line before the read timeout"
_TIMEOUT_REPLY: Final = Reply(Verdict.ERROR, TIMEOUT_MESSAGE).to_bytes()
_BUSY_REPLY: Final = BUSY.to_bytes()
#: Connections accepted in one go before the accept loop yields to other tasks.
ACCEPT_BATCH: Final = 64
#: After an error reply, how long and how much input is drained before closing.
DRAIN_TIMEOUT: Final = 1.0
DRAIN_LIMIT: Final = 64 * 1024
#: accept() errors that mean "out of a resource for now": wait and retry rather than die (as
#: trio.serve_listeners does).
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SLEEP: Final = 0.1
#: Seconds between two log lines about slow or shed clients (each is counted all the same).
QUIET_LOG_INTERVAL: Final = 10.0

_VERBS: Final = {
    RcptRequest: "rcpt",
    ReportRequest: "report",
    CheckRequest: "check",
    PingRequest: "ping",
}


class QueryServer:
    """Serves the query protocol on any number of listening sockets.

    A connection whose request is already complete when it is accepted (the common case: Exim
    connects and writes at once) is answered right there, without a task of its own. One that
    must wait for the rest of its request goes to the :class:`~spamguardd.daemon.waiting.
    WaitingRoom` (no task either); one that must wait for a block to reach the disk, for the
    fleet's store, or to drain after an error gets a task.
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
        fd_budget: int | None = None,
    ) -> None:
        self.config = config
        #: Query connections that may be open at once; None: :func:`fdlimit.query_budget` when
        #: :meth:`serve` starts, from the limit and the descriptors open then.
        self.fd_budget = fd_budget
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
        #: Connections a task owns (each descriptor is open until the task is done with it).
        self._tasks = 0
        #: Connections waiting for their request line, oldest first, in one epoll set.
        self._room = WaitingRoom(
            config.read_timeout,
            RoomHandlers(
                request=self._answer,
                invalid=self._room_invalid,
                timed_out=self._room_timed_out,
                shed=self._room_shed,
                gone=self._client_gone,
            ),
        )
        #: The accept loop parks here while the budget is spent and nothing can be shed.
        self._no_room = trio.lowlevel.ParkingLot()
        #: Slow clients and shed ones are counted each, but logged at most once per interval.
        self._quiet_log = _QuietLog()
        self._handlers: trio.Nursery | None = None
        #: The listening sockets: a count that waits for the store on the spot stops waiting
        #: there as soon as one of them has a new connection.
        self._listening = select.poll()
        self._stopping = trio.Event()
        #: Time from accept to answer written of every query, for ``stats`` and the metrics.
        self.latency = LatencyHistogram()

    def statistics(self) -> ServerStatistics:
        """Current counters."""
        return ServerStatistics(
            queries=dict(self._queries),
            protocol_errors=self._protocol_errors,
            internal_errors=self._internal_errors,
            busy=self._busy,
            open_connections=self._held(),
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
        if self.fd_budget is None:
            self.fd_budget = fdlimit.query_budget()
        try:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                handlers.start_soon(self._room.run)
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        listener.setblocking(False)
                        self._listening.register(listener, select.POLLIN)
                        acceptors.start_soon(self._accept_loop, listener)
                    task_status.started()
                    await self._stopping.wait()
                    acceptors.cancel_scope.cancel()
                self._room.close()
                grace = self.config.read_timeout + 1.0
                handlers.cancel_scope.deadline = trio.current_time() + grace
        finally:
            self._room.abandon()
            for listener in listeners:
                listener.close()

    # -- slots and descriptors ---------------------------------------------------------------

    def _budget(self) -> int:
        return self.fd_budget if self.fd_budget is not None else fdlimit.MIN_BUDGET

    def _held(self) -> int:
        return self._tasks + len(self._room)

    def _full(self) -> bool:
        """Whether the descriptor budget is spent with nothing to shed."""
        return self._held() >= self._budget() and not len(self._room)

    def _task_started(self) -> None:
        self._tasks += 1

    def _task_done(self, conn: socket.socket) -> None:
        conn.close()
        self._tasks -= 1
        if self._no_room:
            self._no_room.unpark_all()

    def _spawn(self, fn: Callable[..., Awaitable[None]], conn: socket.socket, *args: Any) -> None:
        """Give *conn* to a task running ``fn(conn, *args)``; the task closes it."""
        assert self._handlers is not None  # noqa: S101 - only called while serving
        conn.setblocking(False)
        self._task_started()
        self._handlers.start_soon(self._owned, fn, conn, *args)

    async def _owned(
        self, fn: Callable[..., Awaitable[None]], conn: socket.socket, *args: Any
    ) -> None:
        try:
            await fn(conn, *args)
        finally:
            self._task_done(conn)

    # -- accepting ---------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            # at the budget with nobody to shed, every held connection is a complete request
            # being answered: let the backlog hold new clients until one is done
            while self._full():
                await self._no_room.park()
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                if self._full():
                    break
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if self._room.shed_oldest():  # something else took descriptors
                        continue
                    log.error("accept_failed", error=os.strerror(exc.errno or 0))
                    await trio.sleep(_ACCEPT_RETRY_SLEEP)
                    break
                self._serve_accepted(conn)

    def _serve_accepted(self, conn: socket.socket) -> None:
        """Answer *conn* now if its request is complete, else let it wait in the room.

        *conn* stays a blocking socket unless a task takes it over: every call here and in the
        room passes MSG_DONTWAIT, which saves the two fcntl calls of making it non-blocking.
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
            self._wait(conn, connection, started)
            return
        except RemoteProtocolError as exc:
            self._spawn(self._reply_error, conn, self._protocol_error(str(exc)))
            return
        except OSError as exc:
            self._client_gone(conn, exc)
            return
        self._answer(conn, request, started)

    def _wait(self, conn: socket.socket, connection: PolicyConnection, started: float) -> None:
        """Let *conn* wait for the rest of its request, shedding the longest-waiting first when
        the room holds ``max_connections`` or the descriptors are spent (never this fresh one,
        which is likely about to send its line)."""
        if len(self._room) >= self.config.max_connections or self._held() >= self._budget():
            self._room.shed_oldest()
        self._room.add(conn, connection, started)

    def _answer(self, conn: socket.socket, request: Request, started: float) -> None:
        """Decide a complete request and answer it, at once if the answer can go now."""
        cluster = self.cluster
        if (
            cluster is not None
            and self._tasks < self.config.max_connections
            and (counted := cluster.to_count(request)) is not None
        ):
            try:
                counting = cluster.start_count(counted, watching=self._listening)
            except Exception:  # the one place a bug in one query must not take down the others
                self._internal_errors += 1
                log.exception("internal_error", request=repr(request))
                reply, generation = INTERNAL_ERROR, None
            else:
                if not isinstance(counting, Decision):
                    self._spawn(self._count_in_store, conn, request, counting, started)
                    return
                reply, generation = self._decided(request, counting, started)
        else:
            reply, generation = self._decide(request, started)
        durable = generation is None or self.effects.persister.durable_generation >= generation
        if durable and _send_nowait(conn, reply.to_bytes()):
            self.latency.observe(trio.current_time() - started)
            conn.close()
            return
        self._spawn(self._reply, conn, reply, generation, started)

    # -- leaving the waiting room ------------------------------------------------------------

    def _room_invalid(self, conn: socket.socket, message: str) -> None:
        self._spawn(self._reply_error, conn, self._protocol_error(message))

    def _room_timed_out(self, conn: socket.socket) -> None:
        """No whole request in ``read_timeout``: say so and close, without a drain (everything
        it sent was read; a client this slow gets no more of our time)."""
        self._protocol_errors += 1
        self._quiet_log.note("bad_request", error=TIMEOUT_MESSAGE)
        _send_nowait(conn, _TIMEOUT_REPLY)
        _close_gently(conn)

    def _room_shed(self, conn: socket.socket) -> None:
        self._busy += 1
        self._quiet_log.note("connection_shed", reason="a newer connection needed its slot")
        _send_nowait(conn, _BUSY_REPLY)
        _close_gently(conn)

    # -- tasks -------------------------------------------------------------------------------

    async def _count_in_store(
        self,
        conn: socket.socket,
        request: Request,
        counting: Callable[[], Awaitable[Decision]],
        started: float,
    ) -> None:
        """A complete request whose failure the fleet's store counts (fleet mode), when the
        store's answer did not come on the spot."""
        try:
            decision = await counting()
        except Exception:  # the one place a bug in one query must not take down the others
            self._internal_errors += 1
            log.exception("internal_error", request=repr(request))
            reply, generation = INTERNAL_ERROR, None
        else:
            reply, generation = self._decided(request, decision, started)
        await self._reply(conn, reply, generation, started)

    async def _reply(
        self, conn: socket.socket, reply: Reply, generation: int | None, started: float
    ) -> None:
        """A decided request whose reply waits for the disk (or a full buffer, or the store)."""
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
        self.latency.observe(trio.current_time() - started)

    async def _reply_error(self, conn: socket.socket, reply: Reply) -> None:
        with contextlib.suppress(OSError):
            await _send_all(conn, reply.to_bytes())
            await _drain(conn)

    # -- counting ----------------------------------------------------------------------------

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


class _QuietLog:
    """Log an event that may come thousands of times a second at most once per interval, with
    how many were not logged since (each is counted in ``stats`` anyway)."""

    __slots__ = ("_next", "_unlogged")

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def note(self, event: str, **fields: str) -> None:
        now = trio.current_time()
        if now < self._next.get(event, -1.0):
            self._unlogged[event] += 1
            return
        self._next[event] = now + QUIET_LOG_INTERVAL
        log.info(event, not_logged_since=self._unlogged.pop(event, 0), **fields)


def _close_gently(conn: socket.socket) -> None:
    """Close after an answer: the half-close first, so the peer reads the answer, then EOF."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    conn.close()


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
