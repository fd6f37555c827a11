"""The waiting room's timeouts: on time for a few silent clients, paced for a flood of them.

Real socket pairs stand for the clients; the room is driven by trio's autojump clock.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import attrs
import pytest
import trio
import trio.testing

from spamguardd.core.protocol import PolicyConnection, Request
from spamguardd.daemon.waiting import RoomHandlers, WaitingRoom

READ_TIMEOUT = 5.0


@attrs.define
class Told:
    """What the room handed over, and when (trio time)."""

    timed_out: list[tuple[float, int]] = attrs.field(factory=list)
    shed: list[int] = attrs.field(factory=list)
    requests: list[tuple[float, Request]] = attrs.field(factory=list)

    def handlers(self, ids: dict[int, int]) -> RoomHandlers:
        def timed_out(sock: socket.socket) -> None:
            self.timed_out.append((trio.current_time(), ids[sock.fileno()]))
            sock.close()

        def shed(sock: socket.socket) -> None:
            self.shed.append(ids[sock.fileno()])
            sock.close()

        def request(sock: socket.socket, request: Request, started: float) -> None:
            self.requests.append((trio.current_time(), request))
            sock.close()

        def unexpected(sock: socket.socket, *_: object) -> None:  # pragma: no cover
            raise AssertionError("no client here sends garbage or vanishes")

        return RoomHandlers(
            request=request, invalid=unexpected, timed_out=timed_out, shed=shed, gone=unexpected
        )


@contextmanager
def clients(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    pairs = [socket.socketpair(socket.AF_UNIX) for _ in range(count)]
    try:
        yield pairs
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@asynccontextmanager
async def running(told: Told, ids: dict[int, int]) -> AsyncIterator[WaitingRoom]:
    room = WaitingRoom(READ_TIMEOUT, told.handlers(ids))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(room.run)
        yield room
        room.close()


def admit(
    room: WaitingRoom, pairs: list[tuple[socket.socket, socket.socket]], first: int = 0
) -> dict[int, int]:
    """Let the server ends of *pairs* wait, in order; their fds mapped to their numbers."""
    ids = {}
    for number, (server_end, _) in enumerate(pairs, start=first):
        ids[server_end.fileno()] = number
        room.add(server_end, PolicyConnection(), trio.current_time())
    return ids


async def test_a_few_silent_clients_are_told_at_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """In normal traffic the promise holds to the moment: a silent client is told at
    ``read_timeout`` from its accept, and a client that sends its line is answered."""
    told = Told()
    ids: dict[int, int] = {}
    with clients(4) as pairs:
        async with running(told, ids) as room:
            ids.update(admit(room, pairs[:3]))
            await trio.sleep(1.0)
            ids.update(admit(room, pairs[3:], 3))
            pairs[1][1].sendall(b"ping\n")
            await trio.sleep(10.0)
    assert [number for _, number in told.timed_out] == [0, 2, 3]
    assert [when for when, _ in told.timed_out] == pytest.approx([5.0, 5.0, 6.0])
    assert [when for when, _ in told.requests] == pytest.approx([1.0])


async def test_a_flood_of_silent_clients_is_told_at_a_pace_oldest_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,000 silent clients that connected together are not closed together (an attacker would
    reconnect them together): at most 100 a second, oldest first, each within the room's size
    / 100 seconds past ``read_timeout``."""
    told = Told()
    ids: dict[int, int] = {}
    with clients(1000) as pairs:
        async with running(told, ids) as room:
            ids.update(admit(room, pairs))
            await trio.sleep(READ_TIMEOUT + 20.0)
    times = [when for when, _ in told.timed_out]
    assert [number for _, number in told.timed_out] == list(range(1000))
    assert times[0] == pytest.approx(READ_TIMEOUT)
    # any 101 timeouts in a row span at least a second
    assert min(b - a for a, b in zip(times, times[100:], strict=False)) >= 1.0 - 1e-9
    assert times[-1] <= READ_TIMEOUT + 1000 / 100


async def test_a_paced_room_still_makes_room_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While timeouts are paced, the longest-waiting connection can still be shed for a new
    one at any moment, and a line that arrives is still read at once."""
    told = Told()
    ids: dict[int, int] = {}
    with clients(300) as pairs:
        async with running(told, ids) as room:
            ids.update(admit(room, pairs[:299]))
            await trio.sleep(READ_TIMEOUT + 0.5)
            timed_out = len(told.timed_out)
            assert timed_out < 299  # the pace holds the rest back
            assert room.shed_oldest()
            assert told.shed == [timed_out]  # the oldest of those still waiting
            ids.update(admit(room, pairs[299:], 299))
            pairs[299][1].sendall(b"ping\n")
            asked = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert [when for when, _ in told.requests] == [asked]
            await trio.sleep(READ_TIMEOUT)
