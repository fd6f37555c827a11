"""Fleet mode's query path to the store: script calls written and read by the calling task.

Every other exchange with the store (catching up, following the events stream, admin changes,
loading the script) goes through coredis, a well-kept client. The one call a failed recipient
makes does not: coredis hands each request to a writer task and each answer to a reader task,
two turns of trio's scheduler per call, and on a busy relay every turn waits for the others.
Measured on the same machine and store, one call cost 0.86 ms through coredis against 0.28 ms
written and read by the caller, and the failures that reach the store sit inside Exim's
readsocket timeout. So the query path keeps a few connections of its own: a caller takes an idle
one (or opens one, up to :data:`MAX_CONNECTIONS`), writes its command, reads its answer and puts
the connection back. A call cancelled half-way (its budget ran out) leaves its connection in an
unknown state: that connection is closed, never reused.

A call can also be started without leaving the caller (:meth:`StoreLink.start`): the command is
written at once and the answer waited for on the spot, in the kernel, while nothing else wants
the event loop (:meth:`PendingCall.read_now`); only if it is slow in coming does the caller wait
for it in the scheduler (:meth:`PendingCall.result`). A store on loopback answers in about a
tenth of a millisecond, less than a task, a scheduler turn and the epoll bookkeeping cost.

The protocol itself is pure code in :mod:`spamguardd.core.resp`.
"""

from __future__ import annotations

import errno
import math
import os
import re
import select
import socket
import ssl
import time
from typing import Any, Final

import trio

from spamguardd.core.resp import NEED_DATA, ErrorReply, Reply, RespProtocolError, RespReader
from spamguardd.core.resp import encode_command as encode
from spamguardd.core.storeurl import StoreAddress

#: Connections the query path keeps at most; more callers at once wait for one to be free.
MAX_CONNECTIONS: Final = 8
#: Bytes asked of the socket per read.
READ_SIZE: Final = 16384


class StoreLinkError(Exception):
    """The store could not be reached or did not answer in RESP; the message says which."""


class _Connection:
    """One connection, written and read by the task that holds it."""

    def __init__(self) -> None:
        self.reader = RespReader()

    async def exchange(self, payload: bytes, replies: int) -> list[Reply]:
        """Send *payload* and read *replies* replies."""
        await self._send(payload)
        answers: list[Reply] = []
        while len(answers) < replies:
            reply = self.reader.next_reply()
            if isinstance(reply, type):  # NEED_DATA: read more
                data = await self._receive()
                if not data:
                    raise StoreLinkError("the store closed the connection")
                self.reader.feed(data)
                continue
            answers.append(reply)
        return answers

    async def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def _receive(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Close at once (a connection whose state is unknown is never reused)."""
        raise NotImplementedError

    def fileno(self) -> int:
        """The descriptor of the socket underneath (-1 once closed)."""
        raise NotImplementedError

    def closed_by_store(self) -> bool:
        """Whether this idle connection must not be used: the store closed it (its
        ``timeout`` setting closes clients idle that long; or it restarted) or sent something
        nobody asked for. An idle connection has nothing to read; one that has input, an error
        or a hang-up is done.
        """
        fd = self.fileno()
        if fd < 0:
            return True
        check = select.poll()
        check.register(fd, select.POLLIN)
        return bool(check.poll(0))


class _SocketConnection(_Connection):
    """A plain TCP or Unix connection on a non-blocking socket.

    Not a trio stream: each of a stream's operations is also a turn of the scheduler, and a
    call here makes exactly one wait (for the answer to become readable) when the command fits
    in the socket's buffer, which a script call always does.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]

    async def _receive(self) -> bytes:
        while True:
            try:
                return self.sock.recv(READ_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()


class _StreamConnection(_Connection):
    """A TLS connection (``rediss://``), through trio's SSL stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__()
        self.stream = stream

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _receive(self) -> bytes:
        return bytes(await self.stream.receive_some(READ_SIZE))

    def close(self) -> None:
        # at once, without awaiting: no TLS goodbye to a peer whose state is unknown
        sock = self._socket()
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def fileno(self) -> int:
        sock = self._socket()
        return -1 if sock is None else sock.fileno()

    def _socket(self) -> Any:
        transport = getattr(self.stream, "transport_stream", self.stream)
        return getattr(transport, "socket", None)


async def _connect_socket(address: StoreAddress) -> socket.socket:
    """A connected non-blocking socket to *address* (a Unix path, or a TCP host and port)."""
    if address.path is not None:
        return await _connect_one(socket.AF_UNIX, socket.SOCK_STREAM, 0, address.path)
    if address.host is None:
        raise StoreLinkError("no host in cluster.url")
    failure: OSError = OSError(f"no address for {address}")
    for family, kind, proto, _, target in await trio.socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM
    ):
        try:
            sock = await _connect_one(family, kind, proto, target)
        except OSError as exc:
            failure = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise failure


async def _connect_one(
    family: socket.AddressFamily, kind: socket.SocketKind, proto: int, target: str | tuple[Any, ...]
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        error = sock.connect_ex(target)
        if error == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        _raise_for(error)
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock


def _raise_for(error: int) -> None:
    if error:
        raise OSError(error, os.strerror(error))


class PendingCall:
    """A call whose command is written and whose answer is still to come; it holds its
    connection and its slot until :meth:`read_now` has the answer or :meth:`result` returns.
    """

    def __init__(self, link: StoreLink, connection: _Connection, rest: bytes) -> None:
        self._link = link
        self._connection = connection
        #: What the socket did not take at once (normally nothing).
        self._rest = rest

    def read_now(self, timeout: float, watching: select.poll) -> Reply | type[NEED_DATA]:
        """Wait for the answer here, in the kernel, without a turn of the scheduler: for up to
        *timeout* seconds, and only while none of the descriptors in *watching* has input
        (something else wants the event loop). Returns the reply (the call is done) or
        NEED_DATA (finish with :meth:`result`).

        Raises:
            StoreLinkError: the store closed the connection or broke the protocol (the call
                is done; the connection is closed).
        """
        connection = self._connection
        if self._rest or not isinstance(connection, _SocketConnection):
            return NEED_DATA
        sock, reader = connection.sock, connection.reader
        fd = sock.fileno()
        until = time.monotonic() + timeout
        watching.register(fd, select.POLLIN)
        try:
            while True:
                try:
                    data = sock.recv(READ_SIZE)
                except BlockingIOError:
                    left = until - time.monotonic()
                    if left <= 0:
                        return NEED_DATA
                    ready = watching.poll(math.ceil(left * 1000))
                    if not ready or any(ready_fd != fd for ready_fd, _ in ready):
                        return NEED_DATA
                    continue
                except OSError as exc:
                    self._done(ok=False)
                    raise StoreLinkError(str(exc)) from exc
                if not data:
                    self._done(ok=False)
                    raise StoreLinkError("the store closed the connection")
                try:
                    reader.feed(data)
                    reply = reader.next_reply()
                except RespProtocolError as exc:
                    self._done(ok=False)
                    raise StoreLinkError(f"not a RESP answer: {exc}") from exc
                if not isinstance(reply, type):  # not NEED_DATA
                    self._done(ok=True)
                    return reply
        finally:
            watching.unregister(fd)

    async def result(self) -> Reply:
        """Wait for the answer in the scheduler (see :meth:`StoreLink.call` for the errors)."""
        done = False
        try:
            (reply,) = await self._connection.exchange(self._rest, 1)
            done = True
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise StoreLinkError(str(exc) or type(exc).__name__) from exc
        except RespProtocolError as exc:
            raise StoreLinkError(f"not a RESP answer: {exc}") from exc
        finally:
            self._done(ok=done)
        return reply

    def _done(self, *, ok: bool) -> None:
        if ok:
            self._link._idle.append(self._connection)  # noqa: SLF001 - the link's own helper
        else:
            self._connection.close()
        self._link._slots.release()  # noqa: SLF001


class StoreLink:
    """A small pool of direct connections to the store for :meth:`call`.

    Args:
        address: the store (``cluster.url``).
        username: the ACL user, if any.
        password: the password, if any.
        tls: the TLS context for ``rediss://`` (None otherwise).
        client_name: what ``CLIENT LIST`` shows for these connections.
    """

    def __init__(
        self,
        address: StoreAddress,
        *,
        password: str | None,
        tls: ssl.SSLContext | None,
        client_name: str,
    ) -> None:
        self.address = address
        self.password = password
        self.tls = tls
        self.client_name = client_name
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self.connections_opened = 0

    async def call(self, *args: bytes) -> Reply:
        """Send one command and return its reply (an :class:`ErrorReply` is returned, not
        raised: the connection is fine).

        Raises:
            StoreLinkError: the store cannot be reached, closed the connection or broke the
                protocol. A cancellation (the caller's budget) closes the connection it used.
        """
        payload = encode(*args)
        try:  # a free slot is taken without a turn of the scheduler
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            connection = self._take_idle() or await self._connect()
        except BaseException:
            self._slots.release()
            raise
        return await PendingCall(self, connection, payload).result()

    def start(self, *args: bytes) -> PendingCall | None:
        """Write one command now, on an idle plain connection, without a turn of the scheduler.

        Returns the call, to be finished with :meth:`PendingCall.read_now` or
        :meth:`PendingCall.result`; None when no idle connection can take it at once (none
        open yet, all busy, or TLS): then use :meth:`call`.
        """
        if self.tls is not None:  # a TLS stream reads through trio's stream: no waiting here
            return None
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        connection = self._take_idle()
        if connection is None:  # none open: call() opens one
            self._slots.release()
            return None
        assert isinstance(connection, _SocketConnection)  # noqa: S101 - plain unless TLS
        payload = encode(*args)
        try:
            sent = connection.sock.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError:
            # a connection the store closed while it sat idle: drop it, let call() open another
            connection.close()
            self._slots.release()
            return None
        return PendingCall(self, connection, payload[sent:])

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection the store has not closed, if any (those it
        closed are dropped on the way)."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed_by_store():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        address = self.address
        connection: _Connection
        try:
            if self.tls is None:
                connection = _SocketConnection(await _connect_socket(address))
            else:
                if address.host is None:
                    raise StoreLinkError("no host in cluster.url")
                stream = await trio.open_tcp_stream(address.host, address.port)
                tls = trio.SSLStream(stream, self.tls, server_hostname=address.host)
                connection = _StreamConnection(tls)
        except (OSError, ssl.SSLError) as exc:
            raise StoreLinkError(f"cannot connect to {address}: {exc}") from exc
        return await self._handshake(connection)

    async def _handshake(self, connection: _Connection) -> _Connection:
        """Authenticate, select the database and name the connection, in one round trip."""
        address = self.address
        commands = []
        if self.password is not None:
            credentials = [self.password.encode()]
            if address.username:
                credentials.insert(0, address.username.encode())
            commands.append(encode(b"AUTH", *credentials))
        if address.db:
            commands.append(encode(b"SELECT", b"%d" % address.db))
        # a client name has no spaces: anything but letters, digits, '.', '_' and '-' becomes '-'
        name = re.sub(r"[^A-Za-z0-9._-]", "-", self.client_name).encode()
        commands.append(encode(b"CLIENT", b"SETNAME", name))
        try:
            answers = await connection.exchange(b"".join(commands), len(commands))
        except BaseException as exc:
            connection.close()
            if isinstance(exc, (OSError, trio.BrokenResourceError, RespProtocolError)):
                raise StoreLinkError(f"cannot talk to {address}: {exc}") from exc
            raise
        for answer in answers:
            if isinstance(answer, ErrorReply):
                connection.close()
                raise StoreLinkError(f"the store refused the connection: {answer.message}")
        self.connections_opened += 1
        return connection

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        await trio.lowlevel.checkpoint()
