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
import socket
import time
from collections import Counter, OrderedDict
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
from spamguardd.daemon import fdlimit
from spamguardd.daemon.effects import EffectExecutor

if TYPE_CHECKING:
    from spamguardd.daemon.cluster import Cluster

log = structlog.get_logger("spamguardd.daemon.query_server")

BUSY: Final = Reply(Verdict.DEFER, "spamguardd busy: too many connections")
INTERNAL_ERROR: Final = Reply(Verdict.ERROR, "internal error in spamguardd; see its log")
TIMEOUT_MESSAGE: Final = "no complete request line before the read timeout"
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
    gets a task. Connections still waiting for their request are kept oldest first, to be shed
    in that order (:meth:`_shed_oldest`).
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
        #: Every connection a task owns (its descriptor is open until the task releases it).
        self._held: set[socket.socket] = set()
        #: The held connections that wait for the client (its request, or its hang-up after an
        #: error), oldest first; the value says whether it was answered already.
        self._waiting: OrderedDict[socket.socket, bool] = OrderedDict()
        #: The accept loop parks here while the budget is spent and nothing can be shed.
        self._room = trio.lowlevel.ParkingLot()
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
            open_connections=len(self._held),
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

    def _budget(self) -> int:
        return self.fd_budget if self.fd_budget is not None else fdlimit.MIN_BUDGET

    def _waiting_limit(self) -> int:
        return min(self.config.max_connections, self._budget())

    async def _accept_loop(self, listener: socket.socket, handlers: trio.Nursery) -> None:
        while True:
            # at the budget with nobody to shed, every held connection is a complete request
            # being answered: let the backlog hold new clients until one is done
            while self._full():
                await self._room.park()
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
                    if self._waiting:  # something else took descriptors: give back a slot
                        self._shed_oldest()
                        continue
                    log.error("accept_failed", error=os.strerror(exc.errno or 0))
                    await trio.sleep(_ACCEPT_RETRY_SLEEP)
                    break
                self._serve_accepted(conn, handlers)

    def _full(self) -> bool:
        """Whether the budget is spent with nothing to shed."""
        return len(self._held) >= self._budget() and not self._waiting

    def _shed_oldest(self) -> None:
        """Answer the connection that has waited longest ``defer`` (unless it was answered) and
        close it now; its task, woken by the close, just ends."""
        conn, answered = self._waiting.popitem(last=False)
        self._busy += 1
        if not answered:
            _send_nowait(conn, BUSY.to_bytes())
        trio.lowlevel.notify_closing(conn)
        self._release(conn)

    def _hold(self, conn: socket.socket, *, waiting: bool) -> None:
        """A task takes *conn* over; while *waiting* it may be shed.

        A new waiting connection past ``max_connections``, or any past the descriptor budget,
        takes the slot of the longest-waiting one (only a connection a task keeps is held: a
        complete request answered at once needs no slot; the reserve covers the moment).
        """
        if waiting and len(self._waiting) >= self._waiting_limit():
            self._shed_oldest()  # the slowest goes, never this fresh one
        if len(self._held) >= self._budget() and self._waiting:
            self._shed_oldest()
        self._held.add(conn)
        if waiting:
            self._waiting[conn] = False

    def _release(self, conn: socket.socket) -> None:
        """Close *conn* and give its slot back (idempotent: a shed connection's task calls it
        again on its way out)."""
        self._waiting.pop(conn, None)
        if conn in self._held:
            self._held.discard(conn)
            if self._room:
                self._room.unpark_all()
        conn.close()

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
            self._hold(conn, waiting=False)
            handlers.start_soon(self._send_error, conn, self._protocol_error(str(exc)))
            return
        except OSError as exc:
            self._client_gone(conn, exc)
            return
        cluster = self.cluster
        if (
            cluster is not None
            and request is not NEED_DATA
            and len(self._held) - len(self._waiting) < self.config.max_connections
            and (counted := cluster.to_count(request)) is not None
        ):
            conn.setblocking(False)
            self._hold(conn, waiting=False)
            handlers.start_soon(self._count_in_store, conn, request, counted, started)
            return
        if request is NEED_DATA:
            conn.setblocking(False)
            self._hold(conn, waiting=True)  # now: tasks started in this batch have not run yet
            handlers.start_soon(self._handle, conn, connection, started)
            return
        reply, generation = self._decide(request, started)
        durable = generation is None or self.effects.persister.durable_generation >= generation
        if durable and _send_nowait(conn, reply.to_bytes()):
            self.latency.observe(trio.current_time() - started)
            conn.close()
            return
        conn.setblocking(False)
        self._hold(conn, waiting=False)
        handlers.start_soon(self._finish, conn, reply, generation, started)

    async def _handle(
        self, conn: socket.socket, connection: PolicyConnection, started: float
    ) -> None:
        """Slow path: wait (bounded, from the accept) for the rest of the request, then answer.

        While it waits, the connection may be shed: closed under the task, which then just ends.
        """
        try:
            try:
                with trio.fail_at(started + self.config.read_timeout):
                    while (request := connection.next_request()) is NEED_DATA:
                        connection.receive_data(await _recv(conn))
            except RemoteProtocolError as exc:
                await self._reply_error(conn, self._protocol_error(str(exc)))
                return
            except trio.TooSlowError:
                await self._reply_error(conn, self._protocol_error(TIMEOUT_MESSAGE))
                return
            except trio.ClosedResourceError:
                return  # shed
            except OSError as exc:
                if conn.fileno() >= 0:  # else shed between two reads
                    self._client_gone(conn, exc)
                return
            self._waiting.pop(conn, None)  # a complete request is never shed
            if self.cluster is not None and (counted := self.cluster.to_count(request)):
                reply, generation = await self._decide_in_store(request, counted, started)
            else:
                reply, generation = self._decide(request, started)
            await self._reply(conn, reply, generation, started)
        finally:
            self._release(conn)

    async def _count_in_store(
        self, conn: socket.socket, request: Request, counted: RcptRequest, started: float
    ) -> None:
        """A complete request whose failure the fleet's store counts (fleet mode)."""
        try:
            reply, generation = await self._decide_in_store(request, counted, started)
            await self._reply(conn, reply, generation, started)
        finally:
            self._release(conn)

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

    async def _finish(
        self, conn: socket.socket, reply: Reply, generation: int | None, started: float
    ) -> None:
        """Slow path for a decided request whose reply waits for the disk (or a full buffer)."""
        try:
            await self._reply(conn, reply, generation, started)
        finally:
            self._release(conn)

    async def _reply(
        self, conn: socket.socket, reply: Reply, generation: int | None, started: float
    ) -> None:
        if generation is not None:
            # The block holds in memory even when the disk refuses it, and so does the verdict
            # (holding mail is the safe side); the next block or admin change retries the write.
            with contextlib.suppress(StoreError):  # logged and counted by the executor
                await self.effects.wait_durable(generation)
        with contextlib.suppress(OSError):  # the client gave up; nothing to tell it
            await _send_all(conn, reply.to_bytes())
        self.latency.observe(trio.current_time() - started)

    async def _send_error(self, conn: socket.socket, reply: Reply) -> None:
        try:
            await self._reply_error(conn, reply)
        finally:
            self._release(conn)

    async def _reply_error(self, conn: socket.socket, reply: Reply) -> None:
        """Send the error, then drain what the client still sends; the drain may be shed."""
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await _send_all(conn, reply.to_bytes())
            if conn in self._held:
                self._waiting[conn] = True  # answered: shedding it only closes it
            await _drain(conn)

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
