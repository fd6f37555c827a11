"""Fleet-mode benchmark: one daemon alone, one daemon with the shared store, three daemons with
one store, measured in the same run.

The store is Debian's redis-server on TCP loopback (127.0.0.1), started here. The load is
``bench/query_load.py``'s: readsocket-like clients (a new Unix-socket connection per query, one
write, a half-close, read until EOF), N clients back to back, 20 % failed recipients, in a
process of its own; with three daemons the clients take the daemons in turn (round robin, as
DNS would). Each figure is split by kind: a failed recipient (counted, in the store when there
is one) and a verifying one (never sent to the store). The setups run in turns, round after
round, so a noisy moment hits all of them; each figure is the median of the rounds. The
machine's load (``uptime``) is printed before and after.

Targets: a verifying recipient costs what it costs alone; a failing one adds no more than one
store round trip (p50 at most 2x the single daemon's).

Run: ``python bench/fleet_load.py [--seconds S] [--repeat N] [--clients N]``.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from query_load import _cpu_seconds, _one, _start

from spamguardd.core.cluster import CountCall, Keys, count_call
from spamguardd.core.config import ClusterConfig, Mode
from spamguardd.core.rate import Rate
from spamguardd.core.resp import Reply
from spamguardd.core.storeurl import parse_store_url
from spamguardd.daemon.cluster import (
    ANSWER_ON_THE_SPOT,
    SCRIPT,
    SCRIPT_SHA,
    make_client,
    make_link,
)

KINDS = ("fail", "ok")


def _requests(users: int, fail_share: float, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(20_000):
        user = rng.randrange(users)
        kind = "fail" if rng.random() < fail_share else "ok"
        out.append(
            (
                kind,
                f"rcpt user=auth:user{user}@example.com rcpt=r{i}@example.org verify={kind} "
                f"ip=192.0.2.{user % 250} sender=user{user}@example.com\n".encode(),
            )
        )
    return out


async def _closed_loop(
    paths: list[str], clients: int, seconds: float, requests: list[tuple[str, bytes]]
) -> dict[str, float]:
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            kind, request = requests[i % len(requests)]
            latencies[kind].append(await _one(paths[i % len(paths)], request))
            i += clients

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for offset in range(clients):
            nursery.start_soon(client, offset)
    return _by_kind(latencies, time.perf_counter() - started)


def _open_loop(
    paths: list[str], rate: float, seconds: float, requests: list[tuple[str, bytes]]
) -> dict[str, float]:
    """One blocking client firing on a fixed schedule (no queueing in the generator), timing
    each query from connect to EOF, as ``bench/query_load.py``'s open loop does."""
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        kind, request = requests[i % len(requests)]
        begun = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(paths[i % len(paths)])
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        latencies[kind].append(time.perf_counter() - begun)
    return _by_kind(latencies, time.perf_counter() - started)


def _by_kind(latencies: dict[str, list[float]], elapsed: float) -> dict[str, float]:
    result = {"qps": sum(map(len, latencies.values())) / elapsed}
    for kind, values in latencies.items():
        ordered = sorted(values) or [float("nan")]
        result[f"{kind}_p50_ms"] = 1000 * ordered[len(ordered) // 2]
        result[f"{kind}_p99_ms"] = 1000 * ordered[int(len(ordered) * 0.99)]
    return result


def _generate(args: argparse.Namespace) -> None:
    requests = _requests(args.users_traffic, args.fail_share, seed=1)
    paths = args.paths.split(",")
    if args.rate:
        result = _open_loop(paths, args.rate, args.seconds, requests)
    else:
        result = trio.run(_closed_loop, paths, args.clients, args.seconds, requests)
    print(" ".join(f"{k}={v:.6g}" for k, v in result.items()), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


def _daemon(workdir: Path, name: str, store: str | None) -> tuple[subprocess.Popen[str], Path]:
    home = workdir / name
    home.mkdir()
    config = '[log]\nformat = "json"\n'
    if store is not None:
        config += f'[cluster]\nurl = "{store}"\nname = "{name}"\n'
    (home / "spamguardd.toml").write_text(config)
    process = _start(
        [sys.executable, "-m", "spamguardd", "--config", "spamguardd.toml"], home, '"started"'
    )
    return process, home / "run" / "spamguardd.sock"


def _wait_linked(process: subprocess.Popen[str]) -> None:
    """Read the daemon's log until it says the store is up (fleet mode)."""
    if process.stdout is None:
        raise RuntimeError("no stdout")
    for line in process.stdout:
        if '"cluster_up"' in line:
            return
    raise RuntimeError("the daemon exited before it reached the store")


def _load(paths: list[Path], args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "generate",
            "--paths",
            ",".join(map(str, paths)),
            "--seconds",
            str(args.seconds),
            "--clients",
            str(args.clients),
            "--users-traffic",
            str(args.users_traffic),
            "--fail-share",
            str(args.fail_share),
            "--rate",
            str(args.rate),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: float(v) for k, v in (item.split("=") for item in out.split())}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


async def _call_costs(store: str, calls: int) -> dict[str, float]:
    """Microseconds per count script call on an otherwise idle loop: through coredis's
    connection-level API (how the query path called the store before it had its own
    connections), through the query path's own :class:`StoreLink` waiting in the scheduler, and
    through it with the answer read on the spot (how a count is made now), alternating in
    blocks."""
    config = ClusterConfig(url=parse_store_url(store))
    rates = (Rate(10**9, 3600),)
    keys = Keys.for_prefix("bench-calls:")
    client = make_client(config, password=None, relay="bench")
    link = make_link(config, password=None, relay="bench")
    spent = {"coredis": 0.0, "own connection": 0.0, "on the spot": 0.0}
    async with client:
        await client.script_load(SCRIPT)
        connection = await client.connection_pool.get_connection()

        async def through_coredis(call: CountCall) -> object:
            return await connection.create_request(
                b"EVALSHA", SCRIPT_SHA, len(call.keys), *call.keys, *call.args, decode=False
            )

        async def through_link(call: CountCall) -> Reply:
            return await link.call(
                b"EVALSHA", SCRIPT_SHA, b"%d" % len(call.keys), *call.keys, *call.args
            )

        async def on_the_spot(call: CountCall) -> Reply:
            args = (b"EVALSHA", SCRIPT_SHA, b"%d" % len(call.keys), *call.keys, *call.args)
            pending = link.start(*args)
            if pending is None:  # the first call opens the connection
                return await link.call(*args)
            reply = pending.read_now(ANSWER_ON_THE_SPOT, select.poll())
            return await pending.result() if isinstance(reply, type) else reply

        ways = (
            ("coredis", through_coredis),
            ("own connection", through_link),
            ("on the spot", on_the_spot),
        )
        for block in range(10):
            for name, way in ways:
                began = time.perf_counter()
                for i in range(calls // 10):
                    call = count_call(
                        keys,
                        f"auth:u{i % 50}",
                        f"r{block}-{i}",
                        rates,
                        mode=Mode.ENFORCE,
                        relay="bench",
                        origin="bench",
                    )
                    await way(call)
                spent[name] += time.perf_counter() - began
        await link.aclose()
    return {name: 1e6 * seconds / calls for name, seconds in spent.items()}


def _bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sgfleet-", dir="/tmp"))
    print(f"machine before: {_uptime()}")
    redis, port = _start_redis(workdir)
    store = f"redis://127.0.0.1:{port}/0"
    processes = []
    setups: dict[str, list[Path]] = {}
    try:
        costs = trio.run(_call_costs, store, args.calls)
        print(
            f"\none count script call, {args.calls} calls on an idle loop: "
            + ", ".join(f"{name} {us:.0f} µs" for name, us in costs.items())
            + f" (coredis / on the spot: {costs['coredis'] / costs['on the spot']:.2f}x)"
        )
        local, path = _daemon(workdir, "local", None)
        processes.append(local)
        setups["1 daemon, alone"] = [path]
        one, path = _daemon(workdir, "one", store)
        processes.append(one)
        _wait_linked(one)
        setups["1 daemon + store"] = [path]
        three = [_daemon(workdir, f"relay-{n}", store) for n in "abc"]
        for process, _ in three:
            processes.append(process)
            _wait_linked(process)
        setups["3 daemons + 1 store"] = [path for _, path in three]
        pids = {
            "1 daemon, alone": [local.pid],
            "1 daemon + store": [one.pid],
            "3 daemons + 1 store": [process.pid for process, _ in three],
        }
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        for _ in range(args.repeat):
            for name, paths in setups.items():
                cpu = sum(_cpu_seconds(pid) for pid in [*pids[name], redis.pid])
                result = _load(paths, args)
                used = sum(_cpu_seconds(pid) for pid in [*pids[name], redis.pid]) - cpu
                result["cpu_us"] = 1e6 * used / (result["qps"] * args.seconds)
                rounds[name].append(result)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        redis.send_signal(signal.SIGTERM)
        redis.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    load = (
        f"{args.rate:g} queries/s offered (open loop)"
        if args.rate
        else f"{args.clients} clients back to back"
    )
    print(
        f"\nfleet mode: medians of {args.repeat} rounds of {args.seconds:g} s, {load}, "
        f"{args.users_traffic} users, {args.fail_share:.0%} failed "
        f"recipients; store: redis-server on 127.0.0.1\n"
    )
    header = ("setup", "q/s", "fail p50", "fail p99", "ok p50", "ok p99", "cpu µs/q")
    print("{:22} {:>7} {:>9} {:>9} {:>8} {:>8} {:>9}".format(*header))
    for name, r in results.items():
        print(
            f"{name:22} {r['qps']:7.0f} {r['fail_p50_ms']:9.3f} {r['fail_p99_ms']:9.3f} "
            f"{r['ok_p50_ms']:8.3f} {r['ok_p99_ms']:8.3f} {r['cpu_us']:9.1f}"
        )
    print("(latencies in ms; cpu: the daemons' and the store's CPU time per query)")
    base = results["1 daemon, alone"]
    for name in ("1 daemon + store", "3 daemons + 1 store"):
        r = results[name]
        print(
            f"\n{name} / alone: failing p50 {r['fail_p50_ms'] / base['fail_p50_ms']:.2f}x "
            f"(target <= 2), verifying p50 {r['ok_p50_ms'] / base['ok_p50_ms']:.2f}x "
            f"(target about 1), q/s {r['qps'] / base['qps']:.2f}x"
        )
    print(f"\nmachine after: {_uptime()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate")
    gen.add_argument("--paths", required=True)
    gen.add_argument("--rate", type=float, default=0.0, help="open loop at this rate")
    for p in (parser, gen):
        p.add_argument("--seconds", type=float, default=4.0)
        p.add_argument("--clients", type=int, default=8)
        p.add_argument("--users-traffic", type=int, default=10_000)
        p.add_argument("--fail-share", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per setup")
    parser.add_argument("--calls", type=int, default=4000, help="script calls timed alone")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offer this many queries a second (open loop, as Exim's RCPTs arrive) instead of "
        "--clients back to back",
    )
    args = parser.parse_args()
    if args.command == "generate":
        _generate(args)
    else:
        _bench(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
