"""Time per RCPT inside a real Exim: what asking spamguardd adds, against what asking costs at all.

Three Exim 4.96 daemons run side by side (``tests/eximlab.py``: each with its own spool, logs
and fake remote MX), all configured with the shipped ACL (``contrib/exim/spamguardd.conf``)
and differing only in whom the ``${readsocket}`` asks:

* ``verify only``: nobody. The connect ACL marks the daemon as down (``acl_c_sg_down``), so
  the shipped ACL skips the readsocket; what remains is the user key, the recipient's
  verification, the fallback's look for a block file (there is none) and the verdict.
* ``minimal server``: a bare Unix-socket server in a process of its own, which reads the
  request and answers ``accept`` at once: the cost of a readsocket as such.
* ``spamguardd``: the daemon, counting every failure (limit 1000/1h; each SMTP session
  authenticates as a new user, so nobody is blocked).

A client process opens 1 or 4 SMTP connections; each authenticates, sends ``MAIL FROM`` and
then RCPTs one at a time, alternately a local user (verified, accepted) and an unroutable
local part (verification fails: rejected, and counted by spamguardd), twenty per session. Each
RCPT is timed from the write of the command to the read of its answer. The three daemons are
measured in turns, round after round, so that a busy moment of the machine hits all three.

Run as root (Exim is run with ``-C``): ``python bench/exim_rcpt.py [--rcpts N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.eximlab import PASSWORD, EximLab, exim_binary, wait_for

CONFIGS = ("verify only", "minimal server", "spamguardd")
PER_SESSION = 20
LIMIT = "1000/1h"


# ---------------------------------------------------------------------------------------------
# The minimal server, in a process of its own


def _serve_minimal(path: str) -> None:
    """Accept, read the request up to its newline (or EOF), answer ``accept``, close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        Path(path).chmod(0o666)
        server.listen(4096)
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"accept\n")


# ---------------------------------------------------------------------------------------------
# The labs


@contextlib.contextmanager
def _lab(config: str) -> Iterator[EximLab]:
    """An Exim with the shipped ACL, asking *config*'s server."""
    lab = EximLab(limit=LIMIT)
    server: subprocess.Popen[str] | None = None
    try:
        lab.build_config()
        if config == "verify only":
            text = lab.config.read_text()
            text = text.replace(
                "acl_smtp_rcpt = acl_check_rcpt\n",
                "acl_smtp_rcpt = acl_check_rcpt\nacl_smtp_connect = bench_connect\n",
            )
            text = text.replace(
                "begin acl\n",
                "begin acl\n\nbench_connect:\n  warn set acl_c_sg_down = 1\n  accept\n",
            )
            lab.config.write_text(text)
        lab.mx.start()
        if config == "spamguardd":
            lab.spamguard.start()
        elif config == "minimal server":
            run = lab.spamguard.socket.parent
            run.mkdir(exist_ok=True)
            run.chmod(0o755)
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(lab.spamguard.socket)],
                stdout=subprocess.PIPE,
                text=True,
            )
            if server.stdout is None or not server.stdout.readline():
                raise RuntimeError("the minimal server did not start")
        lab.run_exim("-bd", "-oX", str(lab.port), "-oP", str(lab.pidfile))
        wait_for("Exim to listen", lab._exim_listens)  # noqa: SLF001 - the lab's own probe
        yield lab
    finally:
        lab.stop()
        if server is not None:
            server.kill()
            server.wait()


# ---------------------------------------------------------------------------------------------
# The client


class _Session:
    """One SMTP connection: set up (untimed), then RCPTs, each timed to its answer."""

    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self._expect(b"220")
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        for command, code in (
            ("EHLO client.test", b"250"),
            (f"AUTH PLAIN {token}", b"235"),
            (f"MAIL FROM:<{user}@example.test>", b"250"),
        ):
            self.sock.sendall(command.encode() + b"\r\n")
            self._expect(code)
        self.sent = 0
        self.started = 0
        self.failing = False

    def _expect(self, code: bytes) -> bytes:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise RuntimeError(f"expected {code!r}, got {line!r}")
                return line

    def send_rcpt(self, n: int) -> None:
        """Send the next RCPT: a local user, or an unroutable local part."""
        self.failing = n % 2 == 1
        rcpt = f"bad{n}@example.test" if self.failing else f"user{n}@example.test"
        self.started = time.perf_counter_ns()
        self.sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
        self.sent += 1

    def read_answer(self) -> int:
        """The answer to the last RCPT; returns nanoseconds since it was sent."""
        line = self.file.readline()
        elapsed = time.perf_counter_ns() - self.started
        expected = b"550" if self.failing else b"250"
        if not line.startswith(expected):
            raise RuntimeError(f"RCPT answered {line!r}")
        return elapsed

    def close(self) -> None:
        """QUIT without a message: nothing is queued."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.file.close()
            self.sock.close()


def _measure(port: int, connections: int, rcpts: int, first_user: int) -> dict[str, list[int]]:
    """*rcpts* RCPTs over *connections* concurrent sessions; times of ok and failing ones.

    Sessions are set up in waves, all of a wave before any RCPT is sent, so that setting up a
    session never delays reading another's answer.
    """
    times: dict[str, list[int]] = {"ok": [], "fail": []}
    user = first_user
    left = rcpts
    with selectors.DefaultSelector() as selector:
        while left > 0:
            wave = []
            for _ in range(min(connections, -(-left // PER_SESSION))):
                wave.append(_Session(port, f"bench{user}"))
                user += 1
            for session in wave:
                selector.register(session.sock, selectors.EVENT_READ, session)
                session.send_rcpt(left)
                left -= 1
            busy = len(wave)
            while busy:
                for key, _ in selector.select(timeout=30):
                    answered: _Session = key.data
                    times["fail" if answered.failing else "ok"].append(answered.read_answer())
                    if left > 0 and answered.sent < PER_SESSION:
                        answered.send_rcpt(left)
                        left -= 1
                    else:
                        selector.unregister(answered.sock)
                        busy -= 1
            for session in wave:
                session.close()
    return times


# ---------------------------------------------------------------------------------------------
# The run


def _cpu_busy() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _ms(values: list[int], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] / 1e6


def main() -> int:  # noqa: C901 - one straight script
    """Start the three labs, measure them in turns, print the table and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rcpts", type=int, default=2_000, help="RCPTs per round and load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_minimal(args.serve)
        return 0
    if os.geteuid() != 0:
        print("run as root: Exim is run with -C", file=sys.stderr)
        return 1
    version = subprocess.run(
        [exim_binary(), "-bV"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    print(__doc__.split("\n\n")[0])
    print(
        f"{args.rounds} rounds of {args.rcpts:,} RCPTs per daemon and load (half failing),"
        f" {PER_SESSION} per SMTP session; {version}; Python {sys.version.split()[0]}"
    )
    times: dict[tuple[str, int, str], list[int]] = {}
    idle0 = _cpu_busy()
    time.sleep(5)
    idle1 = _cpu_busy()
    print(
        f"before the run, the rest of the machine kept it"
        f" {(idle1[0] - idle0[0]) / (idle1[1] - idle0[1]):.0%} busy (5 s sample)"
    )
    with contextlib.ExitStack() as stack:
        labs = {config: stack.enter_context(_lab(config)) for config in CONFIGS}
        busy0, total0 = _cpu_busy()
        ours0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        user = 0
        for _ in range(args.rounds):
            for connections in (1, 4):
                for config, lab in labs.items():
                    measured = _measure(lab.port, connections, args.rcpts, user)
                    user += args.rcpts
                    for kind, values in measured.items():
                        times.setdefault((config, connections, kind), []).extend(values)
        wall = time.monotonic() - started
        busy1, total1 = _cpu_busy()
        ours1 = resource.getrusage(resource.RUSAGE_SELF)
        for lab in labs.values():
            if lab.paniclog.exists():
                raise RuntimeError(f"Exim panicked: {lab.paniclog.read_text()}")
    print(
        f"\n{'daemon asked':<16} {'conns':>5} {'ok p50':>8} {'ok p99':>8}"
        f" {'fail p50':>9} {'fail p99':>9}   (ms per RCPT)"
    )
    for connections in (1, 4):
        for config in CONFIGS:
            ok, fail = times[(config, connections, "ok")], times[(config, connections, "fail")]
            print(
                f"{config:<16} {connections:>5} {_ms(ok, 0.5):>8.3f} {_ms(ok, 0.99):>8.3f}"
                f" {_ms(fail, 0.5):>9.3f} {_ms(fail, 0.99):>9.3f}"
            )
    print("\nwhat asking adds to a failing RCPT, over verify only (medians, ms):")
    for connections in (1, 4):
        base = statistics.median(times[("verify only", connections, "fail")]) / 1e6
        minimal = statistics.median(times[("minimal server", connections, "fail")]) / 1e6 - base
        ours = statistics.median(times[("spamguardd", connections, "fail")]) / 1e6 - base
        print(
            f"  {connections} connection(s): minimal server +{minimal:.3f}, spamguardd"
            f" +{ours:.3f} ({ours / minimal if minimal > 0 else float('inf'):.2f}x the minimal)"
        )
    fail = times[("spamguardd", 4, "fail")]
    print(
        f"\ntargets at 4 connections: a failing RCPT with spamguardd {_ms(fail, 0.5):.3f} ms"
        f" median (<= 0.6), {_ms(fail, 0.99):.3f} ms p99 (<= 3)"
    )
    ours = (ours1.ru_utime + ours1.ru_stime) - (ours0.ru_utime + ours0.ru_stime)
    others = max(0.0, busy1 - busy0 - ours)
    print(
        f"machine: {os.cpu_count()} cores, {wall:.0f} s measured; everything but this client"
        f" (Exim, the servers, and whatever else ran) used {others:.0f} CPU s,"
        f" {others / max(total1 - total0, 1e-9):.0%} of the machine;"
        f" load average at the end {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
