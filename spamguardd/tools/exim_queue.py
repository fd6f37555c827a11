"""A user's frozen messages in Exim's queue, found by what the ACL stored, thawed or removed by
Exim itself.

The shipped ACL freezes a blocked user's message, sets ``acl_m_sg_frozen`` and keeps the user's
key in ``acl_m_sg_user``; Exim stores both in the message's spool header file, where the sender
cannot write. (It also adds an ``X-Spamguard-User: KEY`` header for people reading the message,
but a header can be forged by whoever wrote the message, so it is never used to pick messages.)
To release (``exim -Mt``) or remove (``exim -Mrm``) that user's mail, ``spamguardctl`` lists the
queue (``exim -bp``), reads the spool header file of each frozen message (``exim -Mvh``) and
picks those the ACL froze for that user. Every call goes through one configurable command
(``exim`` by default, or ``exim -C /etc/exim4/other.conf`` for another instance), split into an
argv list: no shell ever sees a user key, and only message ids that match Exim's id syntax are
passed on.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from typing import Final

import attrs

HEADER: Final = "X-Spamguard-User"
#: Seconds one Exim call may take; listing a huge queue is the slowest.
TIMEOUT: Final = 300.0
#: Exim message ids: the 4.97+ form (6-11-4) and the classic one (6-6-2).
_ID: Final = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}"
_ID_RE: Final = re.compile(_ID)
#: A message line of ``exim -bp``: age, size, id, <sender>, maybe "*** frozen ***".
_QUEUE_LINE: Final = re.compile(rf"^\s*\S+\s+\S+\s+({_ID})\s+<.*?>(\s+\*\*\* frozen \*\*\*)?\s*$")
#: An ACL variable in the spool header file: ``-aclm _sg_user 12`` (``--aclm`` when tainted), its
#: value in the next that many bytes.
_ACL_VARIABLE: Final = re.compile(rb"-{1,2}acl([cm]) (\S+) (\d+)")
#: A header in the spool header file (``exim -Mvh``): length, flag, space, text. The flag ``*``
#: marks a header Exim has deleted.
_SPOOL_HEADER: Final = re.compile(r"^(\d{3,})(.) (.*)$", re.DOTALL)


class EximError(Exception):
    """An Exim command could not be run or failed; the message names the command."""


@attrs.frozen
class QueuedMessage:
    """One message in the queue, as ``exim -bp`` lists it."""

    id: str
    frozen: bool


@attrs.frozen
class Outcome:
    """What happened to one message."""

    id: str
    ok: bool
    #: Exim's own words (its last line of output), for the admin.
    message: str


class EximQueue:
    """Exim's queue, through one Exim command line."""

    def __init__(self, command: str = "exim", *, timeout: float = TIMEOUT) -> None:
        """*command* is split like a shell would split it (quotes honoured), never run by one.

        Raises:
            ValueError: *command* is empty or has unbalanced quotes.
        """
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("the Exim command is empty")
        self.timeout = timeout

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        argv = [*self.argv, *args]
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EximError(f"cannot run {shlex.join(argv)}: {exc}") from exc

    def messages(self) -> list[QueuedMessage]:
        """Every message in the queue.

        Raises:
            EximError: ``exim -bp`` failed.
        """
        result = self._run("-bp")
        if result.returncode != 0:
            raise EximError(f"{shlex.join([*self.argv, '-bp'])} failed: {_last_line(result)}")
        return list(parse_queue(_text(result.stdout)))

    def headers(self, message_id: str) -> list[tuple[str, str]] | None:
        """The headers of one message (name, value), or None if it has left the queue."""
        result = self._run("-Mvh", _checked_id(message_id))
        if result.returncode != 0:
            return None
        return parse_spool_headers(_text(result.stdout))

    def acl_variables(self, message_id: str) -> dict[str, bytes] | None:
        """The ACL variables stored with one message, or None if it has left the queue."""
        result = self._run("-Mvh", _checked_id(message_id))
        if result.returncode != 0:
            return None
        return parse_acl_variables(result.stdout)

    def frozen_messages_of(self, user: str) -> list[str]:
        """Ids of the frozen messages the ACL froze for *user* (``acl_m_sg_frozen`` set and
        ``acl_m_sg_user`` exactly *user*).

        Raises:
            EximError: the queue cannot be listed.
        """
        key = os.fsencode(user)
        found = []
        for message in self.messages():
            if not message.frozen:
                continue
            variables = self.acl_variables(message.id)
            if (
                variables
                and variables.get("acl_m_sg_frozen") == b"1"
                and variables.get("acl_m_sg_user") == key
            ):
                found.append(message.id)
        return found

    def thaw(self, message_id: str) -> Outcome:
        """Thaw one message (``exim -Mt``): it is delivered at the next queue run."""
        return self._act("-Mt", message_id)

    def remove(self, message_id: str) -> Outcome:
        """Remove one message (``exim -Mrm``) without a bounce."""
        return self._act("-Mrm", message_id)

    def _act(self, option: str, message_id: str) -> Outcome:
        result = self._run(option, _checked_id(message_id))
        return Outcome(message_id, result.returncode == 0, _last_line(result))


def parse_queue(text: str) -> Iterator[QueuedMessage]:
    """The messages in ``exim -bp`` output."""
    for line in text.splitlines():
        match = _QUEUE_LINE.match(line)
        if match:
            yield QueuedMessage(match.group(1), frozen=match.group(2) is not None)


def parse_acl_variables(data: bytes) -> dict[str, bytes]:
    """The ACL variables (``acl_c...``, ``acl_m...``) in ``exim -Mvh`` output.

    Each is a line ``-aclm NAME LENGTH`` (``--aclm`` when Exim marks the value tainted) followed
    by exactly LENGTH bytes of value and a newline; the value may hold newlines itself. They come
    before the recipients; the first empty line ends them.
    """
    variables: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        end = data.find(b"\n", position)
        if end < 0:
            break
        line = data[position:end]
        position = end + 1
        if not line:
            break
        match = _ACL_VARIABLE.fullmatch(line)
        if match:
            kind, name, length = match.group(1), match.group(2), int(match.group(3))
            variables[("acl_" + kind.decode() + name.decode("ascii", "replace"))] = data[
                position : position + length
            ]
            position += length + 1
    return variables


def parse_spool_headers(text: str) -> list[tuple[str, str]]:
    """The live headers in ``exim -Mvh`` output (deleted ones, flag ``*``, are left out).

    The output is the spool header file: envelope lines, a blank line after the recipients,
    then each header as ``NNNf text`` with continuation lines indented.
    """
    _, _, section = text.partition("\n\n")
    raw_headers: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        match = _SPOOL_HEADER.match(line)
        if match:
            raw_headers.append((match.group(2), [match.group(3)]))
        elif raw_headers and line[:1] in {" ", "\t"}:
            raw_headers[-1][1].append(line)
    out = []
    for flag, lines in raw_headers:
        if flag == "*":
            continue
        name, colon, value = " ".join(part.strip() for part in lines).partition(":")
        if colon:
            out.append((name.strip(), value.strip()))
    return out


def _checked_id(message_id: str) -> str:
    if not _ID_RE.fullmatch(message_id):
        raise ValueError(f"not an Exim message id: {message_id!r}")
    return message_id


def _text(data: bytes) -> str:
    # as Python decodes argv, so a user key given on the command line compares byte for byte
    return os.fsdecode(data)


def _last_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = _text(result.stdout + result.stderr).strip().splitlines()
    return lines[-1].strip() if lines else f"exit status {result.returncode}"
