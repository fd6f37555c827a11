"""A minimal HTTP/1.0 responder for Prometheus scrapes on a loopback address.

One request per connection, ``GET /metrics`` only, bounded in size and time; anything else gets
404 or 400. A scraper is a trusted local client, so this is all the HTTP it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

import structlog
import trio

from spamguardd.daemon.metrics import CONTENT_TYPE

log = structlog.get_logger("spamguardd.daemon.metrics")

MAX_REQUEST: Final = 8192
READ_TIMEOUT: Final = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _handle(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(READ_TIMEOUT):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) < 2:
            response = _response("400 Bad Request", b"bad request\n")
        elif parts[0] not in {b"GET", b"HEAD"} or parts[1].split(b"?")[0] != b"/metrics":
            response = _response("404 Not Found", b"only GET /metrics is served here\n")
        else:
            body = render().encode()
            response = _response("200 OK", body if parts[0] == b"GET" else b"", CONTENT_TYPE)
        with contextlib.suppress(trio.BrokenResourceError):  # the scraper gave up
            await stream.send_all(response)


async def bind_metrics(host: str, port: int) -> list[trio.SocketListener]:
    """The metrics listeners, bound before the daemon starts serving.

    Raises:
        OSError: the address cannot be bound; the message names ``metrics.listen``.
    """
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(
            exc.errno, f"metrics.listen {host}:{port}: cannot listen: {exc.strerror}"
        ) from exc


async def serve_metrics(
    host: str,
    port: int,
    render: Callable[[], str],
    *,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on *host*:*port* (or on *listeners* already bound) until
    cancelled.

    Raises:
        OSError: the address cannot be bound.
    """
    if listeners is None:
        listeners = await bind_metrics(host, port)
    log.info("metrics_listening", address=f"{host}:{port}")

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, render)

    await trio.serve_listeners(handler, listeners, task_status=task_status)
