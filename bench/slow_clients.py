"""Slow and idle clients against spamguardd: normal queries with and without them, same run.

A real ``spamguardd`` process is started the way the shipped unit starts it as far as
descriptors go: under ``prlimit --nofile=SOFT:HARD`` (default ``1024:HARD``, systemd's default
soft limit below whatever hard limit this machine allows), so it has to raise its own soft limit.
Its snapshot is taken every second, so the state files are written while the attack runs.

Each round measures the same normal load twice, first alone (the baseline), then beside

* ``--idle`` clients (10,000) that connect and never write, reconnecting whenever the daemon
  closes them (shed or timed out), and
* ``--slow`` clients (1,000) that write a request one byte a second (slowloris), reconnecting
  likewise.

The normal load is Exim's readsocket: a new connection per query, one write, a half-close, read
until EOF, at a fixed offered rate (``--rate``); latency is taken from the moment the query was
due (so a stalled client counts its queueing too) to the EOF. After the load, a canary user
fails enough recipients to be blocked: its ``freeze`` needs the block file written. Printed per
phase: p50/p99/max of the normal queries, their verdicts, where their time went (the p99 of
each step of :data:`STEPS`, and the mean steps of the queries that were slow on their own
account), the attack's connects and what the daemon told the attackers, the CPU of the daemon
and of the attacking clients, how long the daemon and the generator were ready to run but
waiting for a CPU (``schedstat``: on a shared machine, the others' load shows there), the
daemon's own ``stats`` and its peak descriptors, and its log's
``accept_failed``/``snapshot_failed``/``block_not_persisted`` counts.

``--code DIR`` runs the daemon from another source tree (``git archive REV | tar -x -C DIR``), to
compare designs under the same attack; ``--max-connections`` sets ``server.max_connections``;
``--attacker-nice 19`` runs the attacking clients at the lowest priority, as a stand-in for
attackers on other machines (on a relay, their own CPU is not the relay's); ``--daemon-nice
-5`` runs the daemon above everything else, as a unit's ``Nice=-5`` would.

Run: ``python bench/slow_clients.py [--rounds 2] [--seconds 20] [--idle 10000] [--slow 1000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scale_load import ask

REPO = Path(__file__).resolve().parent.parent
LIMIT = 100
#: The daemon's server.read_timeout (the default).
READ_TIMEOUT = 5.0
#: The normal queries' p99 under attack must stay within this many milliseconds.
TARGET_MS = 5.0
CANARY = "auth:canary@example.com"
SLOW_LINE = b"rcpt user=auth:slow@example.com rcpt=x@example.org verify=ok\n"


# ---------------------------------------------------------------------------------------------
# the normal load (a process of its own)

#: The steps of one query as the client sees them: from the moment it was due until the query
#: before it was done (``behind``: one slow answer delays the next few too), then until the
#: generator started it (``late``: the generator waiting for a CPU), the connect, the write and
#: half-close, the wait for the first byte of the answer (the listen backlog, the accept, the
#: daemon's work), and the rest of the answer up to EOF.
STEPS = ("behind", "late", "connect", "write", "wait", "read")


def _ask_timed(path: str, request: bytes) -> tuple[bytes, list[float]]:
    """:func:`scale_load.ask`, with the time at the end of each of :data:`STEPS`."""
    clock = time.perf_counter
    marks = [clock()]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10.0)
        sock.connect(path)
        marks.append(clock())
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        marks.append(clock())
        chunks = [sock.recv(4096)]
        marks.append(clock())
        while chunks[-1] and (chunk := sock.recv(4096)):
            chunks.append(chunk)
        marks.append(clock())
    return b"".join(chunks), marks


def _generate(path: str, rate: float, seconds: float, seed: int) -> None:
    latencies: list[float] = []
    #: per query, the time spent in each of :data:`STEPS`
    steps: list[list[float]] = []
    verdicts: dict[str, int] = {}
    interval = 1.0 / rate
    waited = _runqueue_seconds("self")
    start = time.perf_counter()
    n = 0
    previous_end = start
    while (due := start + n * interval) < start + seconds:
        if (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        user = (seed * 7919 + n) % 5000
        verify = "fail" if n % 10 == 0 else "ok"
        request = (
            f"rcpt user=auth:user{user}@example.com rcpt=r{n}@example.org verify={verify} "
            f"ip=192.0.2.{user % 250} sender=user{user}@example.com\n"
        ).encode()
        try:
            reply, marks = _ask_timed(path, request)
            verdict = reply.split(b" ", 1)[0].strip().decode() or "empty"
            behind = max(due, previous_end)  # the previous query was still running at ``due``
            steps.append([b - a for a, b in itertools.pairwise([due, behind, *marks])])
            previous_end = marks[-1]
        except OSError as exc:
            verdict = f"oserror:{exc.errno}"
        latencies.append(time.perf_counter() - due)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        n += 1
    canary = []
    for i in range(LIMIT + 1):
        line = f"rcpt user={CANARY} rcpt=c{seed}-{i}@example.org verify=fail\n".encode()
        canary.append(ask(path, line).split(b" ", 1)[0].strip().decode())
    waited = _runqueue_seconds("self") - waited
    latencies.sort()
    # the queries that were slow on their own account (not only behind a slow one): where
    # their time went, step by step
    stalled = [s for s in steps if sum(s[1:]) > TARGET_MS / 1000] or [[0.0] * len(STEPS)]
    print(
        json.dumps(
            {
                "steps_p99_ms": {
                    name: 1000 * sorted(s[i] for s in steps)[int(len(steps) * 0.99)]
                    for i, name in enumerate(STEPS)
                },
                "stalled": len(stalled) if any(stalled[0]) else 0,
                "steps_stalled_ms": {
                    name: 1000 * statistics.fmean(s[i] for s in stalled)
                    for i, name in enumerate(STEPS)
                },
                "queries": len(latencies),
                "generator_runqueue_share": waited / seconds,
                "p50_ms": 1000 * latencies[len(latencies) // 2],
                "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
                "max_ms": 1000 * latencies[-1],
                "mean_ms": 1000 * statistics.fmean(latencies),
                "verdicts": verdicts,
                "canary_last": canary[-1],
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# the attackers (a process each): one epoll loop holding many connections


def _attack(path: str, count: int, *, slow: bool) -> None:  # noqa: C901
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selector = selectors.DefaultSelector()
    # fd -> [socket, bytes sent, next send time]
    conns: dict[int, list[Any]] = {}
    tally = {"connects": 0, "refused": 0, "defer": 0, "error": 0, "closed": 0}
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    backoff_until = 0.0
    while not stop:
        now = time.monotonic()
        opened = 0
        while len(conns) < count and opened < 500 and now >= backoff_until:
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                    raise
                tally["refused"] += 1
                backoff_until = now + 0.01
                break
            tally["connects"] += 1
            opened += 1
            conns[sock.fileno()] = [sock, 0, now + 1.0]
            selector.register(sock, selectors.EVENT_READ)
        for key, _ in selector.select(timeout=0.05):
            ready = conns[key.fd][0]
            try:
                data = ready.recv(4096)
            except OSError:
                data = b""
            word = data.split(b" ", 1)[0].strip().decode(errors="replace")
            tally[word if word in tally else "closed"] += 1
            selector.unregister(ready)
            del conns[key.fd]
            ready.close()
        if slow:
            now = time.monotonic()
            for entry in conns.values():
                if entry[2] <= now:
                    with contextlib.suppress(OSError):
                        entry[0].send(SLOW_LINE[entry[1] : entry[1] + 1])
                    entry[1] = min(entry[1] + 1, len(SLOW_LINE) - 2)  # never the newline
                    entry[2] += 1.0
    tally["open_at_end"] = len(conns)
    print(json.dumps(tally), flush=True)


# ---------------------------------------------------------------------------------------------
# the daemon and the rounds


def _daemon(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    query = workdir / "q.sock"
    config = workdir / "spamguardd.toml"
    config.write_text(
        f'[limits]\nfailed_recipients = ["{LIMIT}/1h"]\n'
        f'[server]\nquery_socket = "{query}"\nbacklog = 4096\n'
        f"max_connections = {args.max_connections}\n"
        f'[state]\ndir = "{workdir / "state"}"\nsnapshot_interval = 1.0\n'
        f'[admin]\nsocket = "{workdir / "admin.sock"}"\n'
        '[log]\nformat = "json"\n'
    )
    log = workdir / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(args.code)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *("nice", "-n", str(args.daemon_nice)),
                *("prlimit", f"--nofile={args.nofile}", sys.executable),
                *("-m", "spamguardd", "--config", str(config)),
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    for _ in range(600):
        with contextlib.suppress(OSError):
            if ask(str(query), b"ping\n", timeout=5) == b"pong\n":
                return process, query, log
        time.sleep(0.05)
    raise RuntimeError("the daemon did not answer")


def _stats(workdir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            *(sys.executable, "-m", "spamguardd.ctl"),
            *("--json", "--socket", workdir / "admin.sock", "stats"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    reply: dict[str, Any] = json.loads(out)
    return reply


def _descriptors(pid: int) -> int:
    """The daemon's open descriptors: the size Linux (6.2 on) gives its ``/proc/PID/fd``, else
    a listing. The listing of 11,000 descriptors takes 18 ms of CPU, five times a second, and
    only in the attacked phases: it made the attack look dearer than it was."""
    directory = Path(f"/proc/{pid}/fd")
    try:
        return directory.stat().st_size or sum(1 for _ in directory.iterdir())
    except OSError:
        return -1


def _runqueue_seconds(pid: int | str) -> float:
    """How long *pid* has waited for a CPU while it was ready to run (``schedstat``)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _log_counts(log: Path) -> dict[str, int]:
    names = ("accept_failed", "snapshot_failed", "block_not_persisted")
    tally = dict.fromkeys(names, 0)
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line).get("event")
            if event in tally:
                tally[event] += 1
    return tally


def _phase(
    args: argparse.Namespace, workdir: Path, daemon: subprocess.Popen[bytes], query: Path, seed: int
) -> dict[str, Any]:
    attackers = []
    me = [sys.executable, __file__]
    cpu_before = _cpu_seconds(daemon.pid)
    runqueue_before = _runqueue_seconds(daemon.pid)
    began = time.perf_counter()
    if args.attack:
        for kind, count in (("--idle-client", args.idle), ("--slow-client", args.slow)):
            attackers.append(
                subprocess.Popen(
                    ["nice", "-n", str(args.attacker_nice), *me, kind, str(query), str(count)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        time.sleep(args.ramp)
    generator = subprocess.Popen(
        [*me, "--generate", str(query), str(args.rate), str(args.seconds), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = rss = 0
    while generator.poll() is None:
        peak = max(peak, _descriptors(daemon.pid))
        rss = max(rss, _rss(daemon.pid))
        time.sleep(0.2)
    assert generator.stdout is not None  # noqa: S101
    result: dict[str, Any] = json.loads(generator.stdout.read())
    result["daemon_cpu_share"] = (_cpu_seconds(daemon.pid) - cpu_before) / (
        time.perf_counter() - began
    )
    result["daemon_runqueue_share"] = (_runqueue_seconds(daemon.pid) - runqueue_before) / (
        time.perf_counter() - began
    )
    result["daemon_fds_peak"] = peak
    result["daemon_rss_mib"] = rss / 2**20
    result["daemon_stats"] = _stats(workdir)
    # the attacking clients' own CPU (in Python, and the kernel's work for their connects)
    result["attackers_cpu_share"] = sum(_cpu_seconds(a.pid) for a in attackers) / (
        time.perf_counter() - began
    )
    for index, attacker in enumerate(attackers):
        attacker.send_signal(signal.SIGTERM)
        out, _ = attacker.communicate(timeout=30)
        result["idle" if index == 0 else "slow"] = json.loads(out)
    if attackers:
        time.sleep(READ_TIMEOUT + 1.0)  # their connections time out before the next phase
    result["daemon_alive"] = daemon.poll() is None
    return result


def _show(name: str, result: dict[str, Any]) -> None:
    stats = result["daemon_stats"]
    print(
        f"  {name:9} {result['queries']:6} queries  p50 {result['p50_ms']:7.2f} ms  "
        f"p99 {result['p99_ms']:7.2f} ms  max {result['max_ms']:8.2f} ms  "
        f"verdicts {result['verdicts']}  canary {result['canary_last']}"
    )
    print(
        f"            daemon: alive {result['daemon_alive']}, "
        f"CPU {100 * result['daemon_cpu_share']:.0f} % of a core, "
        f"ready but waiting for a CPU {100 * result['daemon_runqueue_share']:.1f} % of the time "
        f"(the generator {100 * result['generator_runqueue_share']:.1f} %), "
        f"peak fds {result['daemon_fds_peak']}, peak RSS {result['daemon_rss_mib']:.1f} MiB, "
        f"stats busy {stats['errors']['busy']} protocol {stats['errors']['protocol']} "
        f"latency_ms {stats['latency_ms']}"
        + (
            f"; attacking clients' CPU {100 * result['attackers_cpu_share']:.0f} % of a core"
            if "idle" in result
            else ""
        )
    )
    print(
        "            client steps p99 (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["steps_p99_ms"].items())
        + f"; {result['stalled']} over {TARGET_MS:g} ms on their own, mean: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["steps_stalled_ms"].items())
    )
    for kind in ("idle", "slow"):
        if kind in result:
            print(f"            {kind} clients: {result[kind]}")


def _bench(args: argparse.Namespace) -> int:
    print(
        f"slow clients: {args.idle} idle + {args.slow} slowloris, normal load {args.rate} q/s "
        f"for {args.seconds} s per phase, daemon under prlimit --nofile={args.nofile}, "
        f"max_connections {args.max_connections}, daemon nice {args.daemon_nice}, "
        f"attackers nice {args.attacker_nice}, code from {args.code}; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sg-slow-") as tmp:
        workdir = Path(tmp)
        daemon, query, log = _daemon(args, workdir)
        try:
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}:")
                for attack in (False, True):
                    args.attack = attack
                    seed = 2 * round_ + attack
                    result = _phase(args, workdir, daemon, query, seed)
                    _show("attacked" if attack else "baseline", result)
                    defers = result["verdicts"].get("defer", 0)
                    others = set(result["verdicts"]) - {"accept", "freeze", "reject"}
                    failures += bool(others) or not result["daemon_alive"] or defers > 0
                    if attack:
                        failures += result["p99_ms"] > args.p99_target
                    # the canary is blocked: lift it for the next phase
                    subprocess.run(
                        [
                            *(sys.executable, "-m", "spamguardd.ctl"),
                            *("--socket", workdir / "admin.sock", "unblock", CANARY),
                        ],
                        capture_output=True,
                        check=False,
                        env={**os.environ, "PYTHONPATH": str(REPO)},
                    )
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
        print(f"daemon log: {_log_counts(log)}; exit status {code}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("PASS" if failures == 0 else f"FAIL ({failures} checks)")
    return 0 if failures == 0 else 1


def main() -> int:
    """Run the benchmark, or one of its client processes."""
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        path, rate, seconds, seed = sys.argv[2:6]
        _generate(path, float(rate), float(seconds), int(seed))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] in ("--idle-client", "--slow-client"):
        _attack(sys.argv[2], int(sys.argv[3]), slow=sys.argv[1] == "--slow-client")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--slow", type=int, default=1_000)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds of attack before load")
    parser.add_argument("--p99-target", type=float, default=TARGET_MS, help="ms, under attack")
    parser.add_argument("--max-connections", type=int, default=16384)
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the idle and slow clients at this nice level: 19 stands for attackers on "
        "other machines, whose own CPU the relay does not pay (the kernel's work for their "
        "connections is still the relay's)",
    )
    parser.add_argument(
        "--daemon-nice",
        type=int,
        default=0,
        help="run the daemon at this nice level (below 0 needs root): a unit's Nice=",
    )
    parser.add_argument(
        "--code", type=Path, default=REPO, help="the daemon's source tree (e.g. an older commit)"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    parser.add_argument("--nofile", default=f"1024:{hard}", help="the daemon's SOFT:HARD")
    return _bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
