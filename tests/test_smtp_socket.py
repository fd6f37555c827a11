"""Notices over SMTP on a Unix socket: how the hardened unit reaches the local MTA."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from spamguardd.core.config import Config, NotifyConfig
from spamguardd.core.errors import ConfigError, NotifyError
from spamguardd.core.notice import build_message
from spamguardd.daemon.notices import NoticeQueue
from spamguardd.daemon.transports import SmtpTransport
from tests.test_notify import BLOCKED, TO, SmtpReceiver, body_of, parse


async def serve_unix(path: Path, receiver: SmtpReceiver, nursery: trio.Nursery) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    await nursery.start(trio.serve_listeners, receiver.handle, [listener])


async def test_delivers_over_a_unix_socket(sock_dir: Path, nursery: trio.Nursery) -> None:
    """A socket path as notify.smtp: the notice is spoken as SMTP over that socket."""
    receiver = SmtpReceiver()
    path = sock_dir / "submit.sock"
    await serve_unix(path, receiver, nursery)
    config = Config.from_dict({"notify": {"to": list(TO), "smtp": str(path)}}, source="t")
    assert config.notify.smtp == path
    notices = NoticeQueue(config.notify)
    assert notices.transport == SmtpTransport(path, None, config.notify.send_timeout)
    message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
    with trio.fail_after(10):
        await notices.transport.send(message)
    [(sender, rcpts, data)] = receiver.received
    assert sender == "<s@example.com>"
    assert rcpts == [f"<{a}>" for a in TO]
    assert "Client IPs: 192.0.2.7, 198.51.100.9" in body_of(parse(data))


async def test_no_socket_is_a_notify_error_naming_it(sock_dir: Path) -> None:
    """Nothing listening (the submit socket unit not started) is retried like any failure."""
    transport = SmtpTransport(sock_dir / "none.sock", None, timeout=5)
    message = build_message(BLOCKED, NotifyConfig(to=TO), sender="s@example.com")
    with trio.fail_after(10), pytest.raises(NotifyError, match=f"SMTP {sock_dir}/none.sock: "):
        await transport.send(message)


def test_relative_paths_are_host_names() -> None:
    """Only an absolute path is a socket; anything else must still be host:port."""
    with pytest.raises(ConfigError, match="absolute path of a Unix socket"):
        Config.from_dict({"notify": {"smtp": "run/submit.sock"}}, source="t")
