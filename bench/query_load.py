"""Query-path benchmark: spamguardd against a bare trio server, measured in the same run.

The load generator behaves like Exim's readsocket: a new Unix-socket connection per query, one
write, a half-close, read until EOF. It runs two loads against each server, each in its own
process so that server and generator get a core each (the reference machine has two):

* closed loop: N clients back to back (default 8), for queries/s and latency percentiles;
* open loop: a fixed offered rate (default 1,000 q/s), for latency at a realistic load.

The baseline is the cheapest server trio can be: ``trio.socket`` accept/recv/send/close with a
fixed answer. Then, in-process, the memory a tracked user costs (10^6 users by default).

Run: ``make bench`` or ``python bench/query_load.py [--seconds S] [--users N]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

# ---------------------------------------------------------------------------------------------
# the baseline server


async def _bare_serve(path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(4096)
    print("ready", flush=True)

    async def handle(conn: trio.socket.SocketType) -> None:
        with conn:
            while True:
                data = await conn.recv(4096)
                if not data or data.endswith(b"\n"):
                    break
            await conn.send(b"accept\n")

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(handle, conn)


# ---------------------------------------------------------------------------------------------
# the load generator


def _requests(users: int, fail_share: float, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(20_000):
        user = rng.randrange(users)
        verify = "fail" if rng.random() < fail_share else "ok"
        out.append(
            f"rcpt user=auth:user{user}@example.com rcpt=r{i}@example.org verify={verify} "
            f"ip=192.0.2.{user % 250} sender=user{user}@example.com\n".encode()
        )
    return out


async def _one(path: str, request: bytes) -> float:
    started = time.perf_counter()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        await sock.send(request)
        sock.shutdown(trio.socket.SHUT_WR)
        while await sock.recv(4096):
            pass
    return time.perf_counter() - started


async def _closed_loop(
    path: str, clients: int, seconds: float, requests: list[bytes]
) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            latencies.append(await _one(path, requests[i % len(requests)]))
            i += clients

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for offset in range(clients):
            nursery.start_soon(client, offset)
    return _summary(latencies, time.perf_counter() - started)


def _open_loop(path: str, rate: float, seconds: float, requests: list[bytes]) -> dict[str, float]:
    """One blocking client firing on a fixed schedule, timing each query from connect to EOF.

    Plain blocking sockets keep the generator's own overhead out of the figure. Timing starts
    at connect rather than at the scheduled moment so that the client's own timer slack (a
    sleep overshoots by tens of microseconds) is not charged to the server; a stalled server
    still shows, in the query it stalled.
    """
    latencies: list[float] = []
    total = int(rate * seconds)
    started = time.perf_counter()
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        begun = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(requests[i % len(requests)])
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        latencies.append(time.perf_counter() - begun)
    return _summary(latencies, time.perf_counter() - started)


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "queries": len(ordered),
        "qps": len(ordered) / elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)],
        "max_ms": 1000 * ordered[-1],
    }


def _generate(args: argparse.Namespace) -> None:
    requests = _requests(args.users_traffic, args.fail_share, seed=1)
    if args.rate:
        result = _open_loop(args.path, args.rate, args.seconds, requests)
    else:
        result = trio.run(_closed_loop, args.path, args.clients, args.seconds, requests)
    print(" ".join(f"{k}={v:.6g}" for k, v in result.items()), flush=True)


# ---------------------------------------------------------------------------------------------
# orchestration


def _start(argv: list[str], cwd: Path, ready: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, text=True)
    if process.stdout is None:
        raise RuntimeError("no stdout")
    for line in process.stdout:
        if ready in line:
            return process
    raise RuntimeError(f"{argv} exited before it was ready")


def _load(path: Path, extra: list[str], args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "generate",
            "--path",
            str(path),
            "--seconds",
            str(args.seconds),
            "--users-traffic",
            str(args.users_traffic),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: float(v) for k, v in (item.split("=") for item in out.split())}


def _memory(users: int, windows: int) -> tuple[float, float]:
    """Bytes per tracked user and window: RSS growth while *users* users each fail once.

    Requests are made on the fly and dropped, as in the daemon, so what remains is what the
    policy keeps: its dictionary, the user keys and each user's state. Also returns how long a
    full garbage collection takes with that many users tracked (a pause on the query path).
    """
    from spamguardd.core.config import PolicyConfig  # noqa: PLC0415 (keep the generator light)
    from spamguardd.core.policy import Policy  # noqa: PLC0415
    from spamguardd.core.protocol import RcptRequest, Verify  # noqa: PLC0415
    from spamguardd.core.rate import Rate  # noqa: PLC0415

    limits = tuple(Rate(100 * (i + 1), 3600 * 24**i) for i in range(windows))
    policy = Policy(PolicyConfig(failed_recipients=limits))
    gc.collect()
    before = _rss()
    for i in range(users):
        request = RcptRequest(f"auth:user{i}@example.com", f"nobody{i}@example.org", Verify.FAIL)
        policy.decide(request, now=float(i), wall_now=0.0)
    gc.collect()
    grown = _rss() - before
    if policy.statistics().tracked_users != users:
        raise RuntimeError("the policy did not track every user")
    started = time.perf_counter()
    gc.collect()
    return grown / users / windows, time.perf_counter() - started


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (proc(5): fields 14 and 15 of stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _rss() -> int:
    with Path("/proc/self/statm").open() as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))
    bare_path = workdir / "bare.sock"
    servers = {
        "bare trio (raw sockets)": (
            [sys.executable, __file__, "bare", "--path", str(bare_path)],
            "ready",
            bare_path,
        ),
        "spamguardd": (
            [
                sys.executable,
                "-m",
                "spamguardd",
                "--query-socket",
                str(workdir / "sg.sock"),
                "--state-dir",
                str(workdir / "var"),
            ],
            '"started"',
            workdir / "sg.sock",
        ),
    }
    loads = {
        f"closed, {args.clients} clients": ["--clients", str(args.clients)],
        f"open, {args.rate:g} q/s offered": ["--rate", str(args.rate)],
    }
    # Both servers run side by side and the loads alternate between them, round after round,
    # so that a noisy moment on the machine hits both; each figure is the median of the rounds.
    processes = {name: _start(argv, workdir, ready) for name, (argv, ready, _) in servers.items()}
    rounds: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {load: [] for load in loads} for name in servers
    }
    try:
        for _ in range(args.repeat):
            for load, extra in loads.items():
                for name, (_, _, path) in servers.items():
                    pid = processes[name].pid
                    cpu_before = _cpu_seconds(pid)
                    result = _load(path, extra, args)
                    result["cpu_us"] = 1e6 * (_cpu_seconds(pid) - cpu_before) / result["queries"]
                    rounds[name][load].append(result)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    results = {
        name: {load: _median(runs) for load, runs in by_load.items()}
        for name, by_load in rounds.items()
    }

    print(
        f"\nquery path: medians of {args.repeat} rounds of {args.seconds:g} s per load, "
        f"{args.users_traffic} users, "
        f"{args.fail_share:.0%} failed recipients, one connection per query\n"
    )
    header = ("server", "load", "queries", "q/s", "p50 ms", "p99 ms", "max ms", "cpu µs/q")
    print("{:26} {:24} {:>8} {:>8} {:>7} {:>7} {:>7} {:>9}".format(*header))
    for name, by_load in results.items():
        for load, r in by_load.items():
            print(
                f"{name:26} {load:24} {r['queries']:8.0f} {r['qps']:8.0f} "
                f"{r['p50_ms']:7.3f} {r['p99_ms']:7.3f} {r['max_ms']:7.2f} {r['cpu_us']:9.1f}"
            )
    base = next(iter(results.values()))
    ours = results["spamguardd"]
    closed = f"closed, {args.clients} clients"
    ratio = ours[closed]["qps"] / base[closed]["qps"]
    print(f"\nspamguardd / bare trio, closed loop q/s: {ratio:.2f} (bounded by the generator)")
    capacity = {name: 1e6 / by_load[closed]["cpu_us"] for name, by_load in results.items()}
    print(
        "capacity, queries per second of one core's CPU time: "
        + ", ".join(f"{name} {value:,.0f}" for name, value in capacity.items())
        + f"; spamguardd / bare trio: {capacity['spamguardd'] / next(iter(capacity.values())):.2f}"
    )

    print(f"\nmemory: {args.users:,} tracked users, one failure each")
    for windows in (1, 2):
        per, pause = _memory(args.users, windows)
        print(
            f"  {windows} window(s): {per:6.0f} bytes per user and window, "
            f"full gc pause {pause * 1000:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench")
    bare = sub.add_parser("bare")
    gen = sub.add_parser("generate")
    for p in (parser, bench):
        p.add_argument("--seconds", type=float, default=4.0)
        p.add_argument("--repeat", type=int, default=3, help="rounds per load and server")
        p.add_argument("--clients", type=int, default=8)
        p.add_argument("--rate", type=float, default=1000.0)
        p.add_argument("--users", type=int, default=1_000_000, help="users for the memory figure")
        p.add_argument("--users-traffic", type=int, default=10_000, help="users in the query mix")
        p.add_argument("--fail-share", type=float, default=0.2)
    bare.add_argument("--path", required=True)
    gen.add_argument("--path", required=True)
    gen.add_argument("--seconds", type=float, required=True)
    gen.add_argument("--clients", type=int, default=8)
    gen.add_argument("--rate", type=float, default=0.0)
    gen.add_argument("--users-traffic", type=int, default=10_000)
    gen.add_argument("--fail-share", type=float, default=0.2)
    args = parser.parse_args()
    if args.command == "bare":
        trio.run(_bare_serve, args.path)
    elif args.command == "generate":
        _generate(args)
    else:
        _bench(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
