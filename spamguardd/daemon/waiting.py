"""Connections that have not sent a whole request yet: one epoll, one deadline queue, no tasks.

Exim writes its request in the same moment it connects, so a connection that has to wait is
rare in normal traffic and common under attack: idle clients that connect and say nothing,
slowloris clients that send a byte a second. Each must cost next to nothing, because there may
be tens of thousands of them. So a waiting connection is not given a trio task and a cancel
scope: it is registered in one private epoll set and one queue ordered by arrival, and a
single task watches both (measured: ``docs/reliability.md``, ## Connections).

Every connection is given ``read_timeout`` from its accept, so arrival order is deadline
order: the watcher sleeps until the oldest deadline or until the epoll set has input. It is
also shedding order: the room is bounded, and the connection that has waited longest is the
one that makes room for a new one. Timeouts are paced (:data:`EXPIRY_PACE`): a flood of
silent clients is told a hundred a second, not all at once, so they do not all come back.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import attrs
import trio

from spamguardd.core.errors import RemoteProtocolError
from spamguardd.core.protocol import MAX_REQUEST_SIZE, NEED_DATA, PolicyConnection, Request

#: Readiness events handled in one pass before the watcher yields to the accept loop: a burst
#: of input (a thousand slowloris clients each sending its byte in the same second) is read in
#: slices, and a real query accepted in between.
EVENTS_PER_PASS: Final = 64
#: Timeouts handed over in one pass, and the seconds between two such passes while more are
#: due: at most 100 timeouts a second. A silent client that is closed costs nothing to keep
#: but a good deal to lose: an attacker reconnects it at once, and each reconnection is an
#: accept, a read, a timeout and a close for the daemon and a place in the listen backlog ahead
#: of real queries. Unpaced, 10,000 idle clients that timed out together reconnected together
#: and put a query behind 1.7 s of them; at 3,200 a second they still came back 2,000 a second
#: and cost the daemon, the attacker and the kernel some 13 % of a core between them (measured:
#: ``docs/reliability.md``, ## Connections). A new connection that needs a slot still gets one
#: at once, by shedding the longest-waiting; the pace only decides how soon a silent one is
#: told. Under a flood a connection may so wait past ``read_timeout``: at most the room's size
#: / 100 seconds (164 s at the default ``max_connections``), never forever.
EXPIRED_PER_PASS: Final = 4
EXPIRY_PACE: Final = 0.04


@attrs.define(slots=True)
class _Entry:
    sock: socket.socket
    connection: PolicyConnection
    started: float
    deadline: float


@attrs.frozen
class RoomHandlers:
    """What the server does with a connection that leaves the room (each takes it over)."""

    #: The request is complete: answer it (accept time passed along for the latency).
    request: Callable[[socket.socket, Request, float], None]
    #: The request is malformed: answer ``error`` with the message.
    invalid: Callable[[socket.socket, str], None]
    #: No whole request before the deadline.
    timed_out: Callable[[socket.socket], None]
    #: Shed to make room for a newer connection.
    shed: Callable[[socket.socket], None]
    #: The peer's socket failed (reset): nothing to answer.
    gone: Callable[[socket.socket, OSError], None]


class WaitingRoom:
    """Connections waiting for their request line, oldest first, watched by one task."""

    def __init__(self, read_timeout: float, handlers: RoomHandlers) -> None:
        self.read_timeout = read_timeout
        self.handlers = handlers
        self._epoll = select.epoll()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._arrived = trio.Event()
        self._closing = False
        #: When expiry may run again (paced while more are due than a pass takes).
        self._next_expiry = -math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, sock: socket.socket, connection: PolicyConnection, started: float) -> None:
        """Let *sock* wait (the room owns it from now on)."""
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._entries[fd] = _Entry(sock, connection, started, started + self.read_timeout)
        if len(self._entries) == 1:
            self._arrived.set()

    def shed_oldest(self) -> bool:
        """Hand the longest-waiting connection to ``handlers.shed``; False if the room is empty."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        self._forget(entry)
        self.handlers.shed(entry.sock)
        return True

    def close(self) -> None:
        """Stop: the watcher returns once the room is empty (``read_timeout`` unless timeouts
        are being paced; the server abandons what is left after its grace)."""
        self._closing = True
        self._arrived.set()

    def abandon(self) -> None:
        """Close every connection still waiting, and the epoll set (the end of the server)."""
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            self._forget(entry)
            entry.sock.close()
        self._epoll.close()

    async def run(self) -> None:
        """Watch the room: read what arrives, hand over what is complete or too late."""
        try:
            while True:
                if not self._entries:
                    if self._closing:
                        return
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                    continue
                first = next(iter(self._entries.values()))
                with trio.move_on_at(max(first.deadline, self._next_expiry)):
                    await trio.lowlevel.wait_readable(self._epoll)
                self._read_ready()
                now = trio.current_time()
                if now >= self._next_expiry and self._expire(now):
                    self._next_expiry = now + EXPIRY_PACE
                await trio.lowlevel.checkpoint()
        finally:
            self.abandon()

    def _forget(self, entry: _Entry) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed already: nothing registered
            self._epoll.unregister(entry.sock.fileno())

    def _leave(self, fd: int) -> _Entry:
        entry = self._entries.pop(fd)
        self._forget(entry)
        return entry

    def _read_ready(self) -> None:
        for fd, _ in self._epoll.poll(0, EVENTS_PER_PASS):
            entry = self._entries.get(fd)
            if entry is None:  # pragma: no cover - left the room earlier in this pass
                continue
            try:
                request = entry.connection.next_request()
                while request is NEED_DATA:
                    data = entry.sock.recv(MAX_REQUEST_SIZE, socket.MSG_DONTWAIT)
                    entry.connection.receive_data(data)
                    request = entry.connection.next_request()
            except BlockingIOError:
                continue  # all read; wait for more
            except RemoteProtocolError as exc:
                self._leave(fd)
                self.handlers.invalid(entry.sock, str(exc))
                continue
            except OSError as exc:
                self._leave(fd)
                self.handlers.gone(entry.sock, exc)
                continue
            self._leave(fd)
            self.handlers.request(entry.sock, request, entry.started)

    def _expire(self, now: float) -> bool:
        """Hand over up to a pass's worth of connections past their deadline; whether more may
        be due."""
        for _ in range(EXPIRED_PER_PASS):
            if not self._entries:
                return False
            fd, entry = next(iter(self._entries.items()))
            if entry.deadline > now:
                return False
            self._leave(fd)
            self.handlers.timed_out(entry.sock)
        return True
