"""The admin protocol: one JSON object per line each way. Pure: values in, bytes out.

A request names its command and, where the command needs them, the user and a reason::

    {"command": "block", "user": "auth:mallory@example.com", "reason": "phished"}

Every reply is one object with ``"ok"``: ``{"ok": true, ...}`` with the command's fields, or
``{"ok": false, "error": "what went wrong"}``. Both sides write ASCII-only JSON, so a user key
that is not valid UTF-8 (kept with surrogate escapes, as the query protocol keeps it) survives the
round trip byte for byte. ``docs/protocol.md`` is the reference; ``docs/admin.md`` lists the
fields of every reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

#: Longest request or reply line accepted, newline included. Replies of ``show`` and ``list``
#: are the largest; a block list of many thousands of users still fits.
MAX_LINE: Final = 16 * 1024 * 1024
#: Longest request line the daemon reads: requests are small.
MAX_REQUEST: Final = 64 * 1024
#: Longest user key, as on the query socket.
MAX_USER: Final = 1024
#: Longest admin-given reason (it is written into the block file Exim reads).
MAX_REASON: Final = 512

#: Commands that take a user key.
USER_COMMANDS: Final = frozenset({"show", "block", "unblock", "reset"})
COMMANDS: Final = ("list", "show", "block", "unblock", "reset", "stats", "metrics", "reload")


class AdminRequestError(ValueError):
    """A request line the daemon cannot serve; the message is the reply's ``error``."""


class AdminReplyError(ValueError):
    """A reply line the client cannot read (not a daemon speaking this protocol)."""


@attrs.frozen
class Command:
    """One admin request."""

    command: str
    user: str | None = None
    reason: str | None = None


def parse_command(line: bytes) -> Command:
    """Parse one request line (without or with its newline).

    Raises:
        AdminRequestError: not JSON, not an object, an unknown command, or a missing or invalid
            field; the message says which.
    """
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdminRequestError(f"request is not a JSON object: {exc}") from None
    if not isinstance(raw, dict):
        raise AdminRequestError("request is not a JSON object")
    command = raw.get("command")
    if command not in COMMANDS:
        raise AdminRequestError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    unknown = sorted(set(raw) - {"command", "user", "reason"})
    if unknown:
        raise AdminRequestError(f"unknown field {unknown[0]!r} in {command} request")
    return Command(command, _user_field(command, raw.get("user")), _reason_field(command, raw))


def _user_field(command: str, user: Any) -> str | None:
    if command not in USER_COMMANDS:
        if user is not None:
            raise AdminRequestError(f"{command} takes no user")
        return None
    if not isinstance(user, str) or not user:
        raise AdminRequestError(f"{command} needs a user key")
    if len(user.encode("utf-8", "surrogateescape")) > MAX_USER or "\x00" in user:
        raise AdminRequestError(f"user key must be 1 to {MAX_USER} bytes without NUL")
    return user


def _reason_field(command: str, raw: Mapping[str, Any]) -> str | None:
    reason = raw.get("reason")
    if reason is None:
        return None
    if command != "block":
        raise AdminRequestError(f"{command} takes no reason")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise AdminRequestError(f"reason must be a string of at most {MAX_REASON} characters")
    return reason


def encode_command(command: Command) -> bytes:
    """The request line for *command*, newline included."""
    fields: dict[str, str] = {"command": command.command}
    if command.user is not None:
        fields["user"] = command.user
    if command.reason is not None:
        fields["reason"] = command.reason
    return _line(fields)


def ok(**fields: Any) -> dict[str, Any]:
    """A success reply with *fields*."""
    return {"ok": True, **fields}


def error(message: str) -> dict[str, Any]:
    """A failure reply."""
    return {"ok": False, "error": message}


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """The reply line, newline included. Keys are sorted so the output is stable."""
    return _line(reply)


def decode_reply(line: bytes) -> dict[str, Any]:
    """Parse one reply line.

    Raises:
        AdminReplyError: not a JSON object with a boolean ``ok``.
    """
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdminReplyError(f"reply is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool):
        raise AdminReplyError('reply is not a JSON object with "ok"')
    if not raw["ok"] and not isinstance(raw.get("error"), str):
        raise AdminReplyError('failed reply without an "error" message')
    return raw


def _line(value: Mapping[str, Any]) -> bytes:
    text = json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"
