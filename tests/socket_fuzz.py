"""A socket-level fuzzer for the query socket, shared by ``bench/fuzz_socket.py`` and the tests.

Each case is one connection doing one bad (or good) thing: random bytes, non-UTF-8, NUL, lone
surrogates (UTF-8-encoded, which is not valid UTF-8), oversize lines, truncated lines ended by a
half-close, pipelined lines, a bare half-close, clients that vanish with or without a reset,
and mutated valid requests. Every case that waits for an answer must get exactly one line that
parses as a reply, then EOF, within the timeout; anything else is a *hang* or a *bad answer*.
Canary queries run between cases: a user blocked at a known limit must stay ``freeze``, a clean
user must stay ``accept``.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs

from spamguardd.core.errors import RemoteProtocolError
from spamguardd.core.protocol import MAX_REQUEST_SIZE, Verdict, parse_reply

#: The limit the daemon under test must be configured with (``limits.failed_recipients``).
LIMIT: Final = 20
BLOCKED: Final = "auth:canary-blocked@example.com"
CLEAN: Final = "auth:canary-clean@example.com"

_VALID: Final = (
    b"rcpt user=auth:u%d@example.com rcpt=r%d@example.org verify=%s ip=192.0.2.%d "
    b"sender=s@example.com"
)


@attrs.frozen
class Case:
    """One connection's behaviour."""

    kind: str
    payload: bytes
    #: Half-close after writing (readsocket's default).
    shutdown: bool = True
    #: Wait for and check the answer; False: hang up without reading.
    read: bool = True
    #: Hang up with a reset (SO_LINGER 0) rather than a FIN.
    reset: bool = False


def _valid(rng: random.Random) -> bytes:
    n = rng.randrange(1 << 20)
    verify = rng.choice((b"ok", b"ok", b"fail", b"defer"))
    return _VALID % (n % 5000, n, verify, n % 250)


def _mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randrange(1, 6)):
        pos = rng.randrange(len(data) + 1)
        what = rng.randrange(4)
        if what == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif what == 1:
            data[pos:pos] = rng.choice((b'"', b"\\", b"=", b" ", b"\t", b"\r", b"\x00", b"\xff"))
        elif what == 2 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        else:
            data[pos:pos] = rng.choice((b'"\\q"', b'"unterminated', b"ip=999.1.1.1", b"user="))
    return bytes(data)


def _kinds() -> dict[str, Callable[[random.Random], Case]]:
    return {
        "valid": lambda rng: Case("valid", _valid(rng) + b"\n"),
        "random": lambda rng: Case("random", rng.randbytes(rng.randrange(1, 300))),
        "non_utf8": lambda rng: Case(
            "non_utf8", b"rcpt user=auth:\xff\xfe%d rcpt=\xc3(@x verify=fail\n" % rng.randrange(99)
        ),
        "nul": lambda rng: Case(
            "nul", rng.choice((b"check user=a\x00b\n", b"rcpt user=x rcpt=\x00 verify=ok\n"))
        ),
        "surrogate": lambda rng: Case(
            "surrogate", b"rcpt user=auth:\xed\xa0\x80%d rcpt=r verify=fail\n" % rng.randrange(99)
        ),
        "oversize": lambda rng: Case(
            "oversize", b"rcpt user=" + b"u" * rng.randrange(MAX_REQUEST_SIZE, 3 * MAX_REQUEST_SIZE)
        ),
        "long_user": lambda rng: Case(
            "long_user", b"check user=" + b"k" * rng.randrange(1000, 1100) + b"\n"
        ),
        "truncated": lambda rng: Case("truncated", (_valid(rng) + b"\n")[: rng.randrange(0, 60)]),
        "pipelined": lambda rng: Case(
            "pipelined", b"".join(_valid(rng) + b"\n" for _ in range(rng.randrange(2, 6)))
        ),
        "half_closed": lambda _: Case("half_closed", b""),
        "vanished": lambda rng: Case(
            "vanished", (_valid(rng) + b"\n")[: rng.randrange(0, 80)], shutdown=False, read=False
        ),
        "reset": lambda rng: Case(
            "reset", (_valid(rng) + b"\n")[: rng.randrange(0, 80)], read=False, reset=True
        ),
        "mutated": lambda rng: Case("mutated", _mutate(rng, _valid(rng)) + b"\n"),
        "crlf": lambda rng: Case("crlf", _valid(rng) + b"\r\n"),
    }


KINDS: Final = _kinds()


def make_case(rng: random.Random) -> Case:
    """A case of a kind picked uniformly."""
    return KINDS[rng.choice(sorted(KINDS))](rng)


def run_case(path: Path, case: Case, *, timeout: float = 10.0) -> str:
    """Play *case* against the socket; ``answered``, ``gone``, ``hang`` or ``bad:...``."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            if case.payload:
                sock.sendall(case.payload)
        except OSError:
            return "gone" if not case.read else "bad:write refused"
        if case.reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if not case.read:
            return "gone"
        if case.shutdown:
            sock.shutdown(socket.SHUT_WR)
        data = _read_to_eof(sock)
    return "hang" if data is None else _check_answer(data)


def _read_to_eof(sock: socket.socket) -> bytes | None:
    """All the daemon sent until EOF; None when it went silent before EOF."""
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except TimeoutError:
        return None
    except ConnectionResetError:
        # an oversize line is answered, then the rest is drained for a while: a client that
        # keeps writing past that may see a reset after the answer
        pass
    return b"".join(chunks)


def _check_answer(data: bytes) -> str:
    if data.count(b"\n") != 1 or not data.endswith(b"\n"):
        return f"bad:not one line: {data[:80]!r}"
    try:
        parse_reply(data)
    except RemoteProtocolError as exc:
        return f"bad:{exc}"
    return "answered"


def ask(path: Path, line: bytes, *, timeout: float = 10.0) -> bytes:
    """One readsocket-style exchange; the answer's first word."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).split(b" ", 1)[0].strip()


def block_canary(path: Path) -> list[bytes]:
    """Fail LIMIT distinct recipients for the blocked canary; the verdicts, in order."""
    return [
        ask(path, b"rcpt user=%s rcpt=c%d@example.org verify=fail\n" % (BLOCKED.encode(), i))
        for i in range(LIMIT)
    ]


def canaries_right(path: Path) -> bool:
    """The blocked canary is still ``freeze`` and the clean one still ``accept``."""
    blocked = ask(path, b"check user=%s\n" % BLOCKED.encode())
    clean = ask(path, b"rcpt user=%s rcpt=ok@example.org verify=ok\n" % CLEAN.encode())
    return blocked == Verdict.FREEZE.encode() and clean == Verdict.ACCEPT.encode()


def fuzz(path: Path, count: int, *, seed: int, canary_every: int = 500) -> dict[str, Any]:
    """Run *count* cases; tallies of outcomes by kind, canary checks and their failures."""
    rng = random.Random(seed)  # noqa: S311 - reproducible cases, not secrets
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    bad: list[str] = []
    canary_checks = canary_failures = 0
    for i in range(count):
        case = make_case(rng)
        kinds[case.kind] += 1
        try:
            outcome = run_case(path, case)
        except OSError as exc:
            outcome = f"bad:connect failed: {exc}"
        outcomes[outcome.split(":", 1)[0]] += 1
        if outcome.startswith("bad") or outcome == "hang":
            bad.append(f"{case.kind} {case.payload[:60]!r}: {outcome}")
        if i % canary_every == 0:
            canary_checks += 1
            canary_failures += not canaries_right(path)
    return {
        "cases": count,
        "outcomes": dict(outcomes),
        "kinds": dict(kinds),
        "bad": bad[:20],
        "bad_total": len(bad),
        "canary_checks": canary_checks,
        "canary_failures": canary_failures,
    }
