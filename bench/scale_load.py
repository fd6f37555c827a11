"""Scale benchmark: a daemon holding a million users, against a baseline revision in one run.

For each implementation (the working tree, and ``--baseline-rev REV`` checked out with
``git archive`` into a temporary directory, when given):

1. write a snapshot of ``--users`` users with two windows (100/1h, 1000/1d), in the format the
   implementation reads (v2 files for ours, v1 JSON lines for a revision that has no v2);
   a tenth of the users go idle during the run, so the idle sweep has work;
2. start the daemon on it and time the first answer and the end of the load;
3. offer ``--rate`` queries/s for ``--seconds`` from a separate process, one connection per
   query as Exim's readsocket makes them (connect, write, half-close, read to EOF): users drawn
   from the snapshot plus a tenth new ones, 20 % failed recipients; a SIGHUP that changes the
   day limit at 19 % of the run; snapshots every 20 s; RSS sampled every 5 s;
4. stop it cleanly (timed), measure the snapshot on disk, start it again (timed);
5. count a probe user to 99 of 100 failures, wait one snapshot interval, ``kill -9``, start
   again (timed) and ask ``spamguardctl show`` how many failures of the probe the hour window
   still counts (99: counters within one interval; the tokens themselves refill meanwhile).

Then, in a process per implementation, the cost of one failed recipient at ``100/1h`` and at
``10000/1d`` (one user, distinct recipients, monitor mode so it keeps counting).

Run: ``python bench/scale_load.py [--users N] [--seconds S] [--baseline-rev REV]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
LIMITS = ("100/1h", "1000/1d")
RELOADED_LIMITS = ("100/1h", "1200/1d")
INTERVAL = 20.0


# ---------------------------------------------------------------------------------------------
# snapshots


def _user_values(i: int, now: float, rng: random.Random) -> list[float]:
    """One user's portable state: one failure, recent or about to go idle (a tenth)."""
    from spamguardd.core import buckets  # noqa: PLC0415 - the implementation under test

    at = now - 86400 + rng.uniform(0, 150) if i % 10 == 0 else now - rng.uniform(0, 1800)
    return [at, 99.0, 999.0, buckets.fingerprint(f"r{i}@example.org"), at, at]


def _write_v2(state_dir: Path, users: int, now: float) -> None:
    from spamguardd.core.rate import Rate  # noqa: PLC0415
    from spamguardd.state import snapshot_format  # noqa: PLC0415

    rates = tuple(Rate.parse(text) for text in LIMITS)
    rng = random.Random(1)
    directory = state_dir / "counters"
    directory.mkdir(parents=True)
    with (directory / "0000000001").open("wb") as file:
        file.write(snapshot_format.header(base=True))
        chunk = []
        for i in range(users):
            chunk.append(
                snapshot_format.encode_record(
                    snapshot_format.Kind.STATE, _user(i), rates, _user_values(i, now, rng)
                )
            )
            if len(chunk) == 10000:
                file.write(b"".join(chunk))
                chunk = []
        file.write(b"".join(chunk))


def _write_v1(state_dir: Path, users: int, now: float) -> None:
    rng = random.Random(1)
    state_dir.mkdir(parents=True)
    with (state_dir / "buckets").open("w") as file:
        file.write("# spamguardd bucket snapshot v1\n")
        for i in range(users):
            record = {"user": _user(i), "limits": list(LIMITS), "state": _user_values(i, now, rng)}
            file.write(json.dumps(record) + "\n")


def _user(i: int) -> str:
    return f"auth:user{i}@example.com"


# ---------------------------------------------------------------------------------------------
# the daemon


class Daemon:
    """A spamguardd process with its JSON log read in a thread, events timestamped."""

    def __init__(self, workdir: Path, pythonpath: Path) -> None:
        self.workdir = workdir
        self.pythonpath = pythonpath
        self.query = workdir / "q.sock"
        self.config = workdir / "spamguardd.toml"
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.process: subprocess.Popen[str] | None = None

    def write_config(self, limits: tuple[str, ...]) -> None:
        self.config.write_text(
            "[limits]\n"
            f"failed_recipients = {json.dumps(list(limits))}\n"
            "max_tracked_users = 4000000\n"
            f'[server]\nquery_socket = "{self.query}"\n'
            f'[state]\ndir = "{self.workdir / "state"}"\nsnapshot_interval = {INTERVAL}\n'
            f'[admin]\nsocket = "{self.workdir / "admin.sock"}"\n'
            '[log]\nformat = "json"\n'
        )

    def start(self) -> float:
        """Start; return seconds until the first answer."""
        with contextlib.suppress(FileNotFoundError):
            self.query.unlink()
        env = {**os.environ, "PYTHONPATH": str(self.pythonpath), "PYTHONHASHSEED": "0"}
        began = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spamguardd", "--config", str(self.config)],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.process.returncode}")
            with contextlib.suppress(OSError):
                if ask(self.query, b"ping\n", timeout=30) == b"pong\n":
                    return time.perf_counter() - began
            time.sleep(0.005)

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None  # noqa: S101
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append((time.perf_counter(), json.loads(line)))

    def wait_event(self, name: str, since: float, timeout: float = 600) -> dict[str, Any]:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for at, event in list(self.events):
                if at >= since and event.get("event") == name:
                    return {"at": at, **event}
            time.sleep(0.05)
        raise RuntimeError(f"no {name} event")

    def rss(self) -> int:
        assert self.process is not None  # noqa: S101
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def admin(self, *command: str) -> dict[str, Any]:
        """``spamguardctl --json COMMAND`` against this daemon."""
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from spamguardd.ctl import main; main()",
                "--socket",
                str(self.workdir / "admin.sock"),
                "--json",
                *command,
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(self.pythonpath)},
        ).stdout
        return cast("dict[str, Any]", json.loads(out))

    def tracked_users(self) -> int:
        """Users counted now, from ``spamguardctl stats``."""
        return int(self.admin("stats")["tracked_users"])

    def send(self, signum: int) -> None:
        assert self.process is not None  # noqa: S101
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> float:
        """Signal and wait; return seconds until the process was gone."""
        assert self.process is not None  # noqa: S101
        began = time.perf_counter()
        self.process.send_signal(signum)
        self.process.wait(timeout=600)
        return time.perf_counter() - began


def ask(path: Path | str, request: bytes, *, timeout: float = 10.0) -> bytes:
    """One readsocket-style exchange (the other benchmarks use this one too)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def _fail(user: str, rcpt: str) -> bytes:
    return f"rcpt user={user} rcpt={rcpt} verify=fail ip=192.0.2.1 sender=x@example.com\n".encode()


# ---------------------------------------------------------------------------------------------
# the load generator (its own process)


def _generate(args: argparse.Namespace) -> None:
    """Offer *rate* q/s for *seconds*; write ``[[start, latency], ...]`` to *out*.

    With ``--churn`` every query comes from a user drawn from a space far larger than the
    query count, so users keep coming and (once idle) going.
    """
    rng = random.Random(2)
    requests = []
    for i in range(50_000):
        user = _user(rng.randrange(args.users)) if rng.random() < 0.9 else f"auth:new{i}@x.org"
        if args.churn:
            user = f"auth:churn{rng.randrange(1 << 40)}@x.org"
        verify = "fail" if rng.random() < 0.2 else "ok"
        requests.append(
            f"rcpt user={user} rcpt=q{i}@example.org verify={verify} ip=192.0.2.9 "
            f"sender=s@example.com\n".encode()
        )
    total = int(args.rate * args.seconds)
    if args.churn:  # fresh users throughout, not the same 50,000 again
        requests = [
            request.replace(b"auth:churn", f"auth:c{i // len(requests)}-".encode())
            for i, request in enumerate(requests * (1 + total // len(requests)))
        ][:total]
    samples = []
    started = time.perf_counter()
    for i in range(total):
        due = started + i / args.rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        begun = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(args.path)
            sock.sendall(requests[i % len(requests)])
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        samples.append((begun - started, time.perf_counter() - begun))
    Path(args.out).write_text(json.dumps(samples))


def _failure_cost(args: argparse.Namespace) -> None:
    """Microseconds per failed recipient for one user under *limit* (monitor mode)."""
    from spamguardd.core.config import Mode, PolicyConfig  # noqa: PLC0415
    from spamguardd.core.policy import Policy  # noqa: PLC0415
    from spamguardd.core.protocol import RcptRequest, Verify  # noqa: PLC0415
    from spamguardd.core.rate import Rate  # noqa: PLC0415

    policy = Policy(PolicyConfig(mode=Mode.MONITOR, failed_recipients=(Rate.parse(args.limit),)))
    requests = [
        RcptRequest("auth:heavy@example.com", f"r{i}@example.org", Verify.FAIL)
        for i in range(args.failures)
    ]
    latencies = []
    for i, request in enumerate(requests):
        began = time.perf_counter()
        policy.decide(request, now=float(i), wall_now=0.0)
        latencies.append(time.perf_counter() - began)
    print(
        json.dumps(
            {
                "mean_us": 1e6 * statistics.fmean(latencies),
                "last_1000_us": 1e6 * statistics.fmean(latencies[-1000:]),
                "max_ms": 1e3 * max(latencies),
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# one implementation, end to end


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def _run(  # noqa: PLR0915 - one scenario, step by step
    name: str, source: Path, args: argparse.Namespace, *, v2: bool
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sgscale-", dir="/tmp"))
    result: dict[str, Any] = {"name": name}
    now = time.time()
    print(f"[{name}] writing a snapshot of {args.users:,} users", flush=True)
    env = {**os.environ, "PYTHONPATH": str(source)}
    subprocess.run(
        [
            sys.executable,
            __file__,
            "write-snapshot",
            "--dir",
            str(workdir / "state"),
            "--users",
            str(args.users),
            "--now",
            repr(now),
            *(["--v2"] if v2 else []),
        ],
        check=True,
        env=env,
    )
    result["snapshot_in_bytes"] = sum(
        path.stat().st_size for path in (workdir / "state").rglob("*") if path.is_file()
    )
    result["snapshot_in_per_user_window"] = result["snapshot_in_bytes"] / args.users / 2

    empty = Daemon(Path(tempfile.mkdtemp(prefix="sgscale-empty-", dir="/tmp")), source)
    empty.write_config(LIMITS)
    empty.start()
    empty_rss = empty.rss()
    empty.stop()

    daemon = Daemon(workdir, source)
    daemon.write_config(LIMITS)
    began = time.perf_counter()
    result["start_first_answer_s"] = daemon.start()
    loaded = daemon.wait_event("snapshot_loaded", began)
    result["start_loaded_s"] = loaded["at"] - began
    result["loaded_users"] = loaded.get("users")
    time.sleep(2)
    result["rss_per_user_window"] = (daemon.rss() - empty_rss) / args.users / 2
    print(f"[{name}] loaded: {loaded.get('users')} users; offering load", flush=True)

    out = workdir / "latencies.json"
    generator = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "generate",
            "--path",
            str(daemon.query),
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--users",
            str(args.users),
            "--out",
            str(out),
        ]
    )
    load_began = time.perf_counter()
    rss_curve = []
    reloaded = False
    while generator.poll() is None:
        elapsed = time.perf_counter() - load_began
        if not reloaded and elapsed >= 0.19 * args.seconds:
            daemon.write_config(RELOADED_LIMITS)
            daemon.send(signal.SIGHUP)
            reloaded = True
            result["sighup_at_s"] = round(elapsed, 1)
        rss_curve.append((round(elapsed), daemon.rss()))
        time.sleep(5)
    samples = json.loads(out.read_text())
    latencies = sorted(latency for _, latency in samples)
    result.update(
        queries=len(latencies),
        p50_ms=1e3 * _percentile(latencies, 0.5),
        p99_ms=1e3 * _percentile(latencies, 0.99),
        p999_ms=1e3 * _percentile(latencies, 0.999),
        max_ms=1e3 * latencies[-1],
        over_10ms=sum(latency > 0.010 for latency in latencies),
        slowest=sorted(samples, key=lambda sample: -sample[1])[:5],
        rss_curve=rss_curve,
    )
    events = [
        (round(at - load_began, 1), event.get("event"), event.get("seconds"))
        for at, event in daemon.events
        if at >= load_began
        and str(event.get("event", "")).startswith(("snapshot", "reload", "users_forgotten"))
    ]
    result["events"] = events

    tracked = daemon.tracked_users()
    result["tracked_at_stop"] = tracked
    result["clean_stop_s"] = daemon.stop()
    files = [path for path in (workdir / "state").rglob("*") if path.is_file()]
    snapshot_files = [path for path in files if "counters" in str(path) or path.name == "buckets"]
    result["snapshot_bytes"] = sum(path.stat().st_size for path in snapshot_files)
    result["snapshot_bytes_per_user_window"] = result["snapshot_bytes"] / tracked / 2
    print(f"[{name}] stopped; restarting", flush=True)

    began = time.perf_counter()
    result["restart_first_answer_s"] = daemon.start()
    result["restart_loaded_s"] = daemon.wait_event("snapshot_loaded", began)["at"] - began
    replies = [ask(daemon.query, _fail("auth:probe", f"p{i}")) for i in range(99)]
    if any(reply != b"accept\n" for reply in replies):
        raise RuntimeError("the probe was blocked early")
    time.sleep(INTERVAL + 3)
    daemon.stop(signal.SIGKILL)
    began = time.perf_counter()
    result["after_kill_first_answer_s"] = daemon.start()
    daemon.wait_event("snapshot_loaded", began)
    result["after_kill_loaded_s"] = time.perf_counter() - began
    # failures counted in the hour: 99 if kept (tokens refill meanwhile, so not the verdict)
    hour = daemon.admin("show", "auth:probe")["windows"][0]
    result["after_kill_counters_kept"] = f"{hour['counted']} of 99 failures"
    daemon.stop()
    return result


SOAK_LIMITS = ("20/1m", "100/10m")


def _soak(args: argparse.Namespace) -> None:
    """RSS over a run where users keep coming and going (short windows, so they go idle)."""
    print(
        f"soak: {args.rate:g} q/s for {args.seconds:g} s, every query a new user, limits "
        f"{', '.join(SOAK_LIMITS)}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="sgsoak-", dir="/tmp"))
    daemon = Daemon(workdir, ROOT)
    daemon.write_config(SOAK_LIMITS)
    daemon.start()
    out = workdir / "latencies.json"
    generator = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "generate",
            "--path",
            str(daemon.query),
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--users",
            "1",
            "--out",
            str(out),
            "--churn",
        ]
    )
    began = time.perf_counter()
    curve = []
    while generator.poll() is None:
        curve.append((round(time.perf_counter() - began), daemon.rss(), daemon.tracked_users()))
        time.sleep(30)
    daemon.stop()
    latencies = sorted(latency for _, latency in json.loads(out.read_text()))
    print("  s   RSS MiB  tracked users")
    for at, rss, tracked in curve:
        print(f"{at:5} {rss / 2**20:8.1f} {tracked:14,}")
    settled = 600 + 180  # the longest window, then the sweep's slots: users leave as they come
    steady = [(at, rss) for at, rss, _ in curve if at >= settled]
    if len(steady) >= 2:
        (first_at, first), (last_at, last) = steady[0], steady[-1]
        slope = (last - first) / 2**20 / ((last_at - first_at) / 3600)
        print(
            f"from {first_at} s (users leaving as fast as they come): RSS {first / 2**20:.1f} "
            f"to {last / 2**20:.1f} MiB ({slope:+.1f} MiB per hour at that pace)"
        )
    samples = json.loads(out.read_text())
    slowest = sorted(samples, key=lambda sample: -sample[1])[:5]
    print(f"slowest answers (start s, ms): {[(round(a), round(1e3 * b, 1)) for a, b in slowest]}")
    print(
        "daemon events: "
        + str(
            [
                (round(at - began), event.get("event"), event.get("seconds"))
                for at, event in daemon.events
                if at >= began and event.get("event") in {"users_forgotten", "snapshot_written"}
            ][:40]
        )
    )
    print(
        f"latency: p50 {1e3 * _percentile(latencies, 0.5):.3f} ms, "
        f"p99 {1e3 * _percentile(latencies, 0.99):.3f} ms, max {1e3 * latencies[-1]:.2f} ms; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def _noise_floor(args: argparse.Namespace) -> dict[str, Any]:
    """The same open-loop load against a bare trio server (bench/query_load.py): the machine."""
    workdir = Path(tempfile.mkdtemp(prefix="sgscale-bare-", dir="/tmp"))
    path = workdir / "bare.sock"
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "query_load.py"), "bare", "--path", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None  # noqa: S101
        server.stdout.readline()  # "ready"
        out = workdir / "latencies.json"
        seconds = min(30.0, args.seconds)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "generate",
                "--path",
                str(path),
                "--rate",
                str(args.rate),
                "--seconds",
                str(seconds),
                "--users",
                str(args.users),
                "--out",
                str(out),
            ],
            check=True,
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    latencies = sorted(latency for _, latency in json.loads(out.read_text()))
    return {
        "seconds": seconds,
        "p50_ms": 1e3 * _percentile(latencies, 0.5),
        "p99_ms": 1e3 * _percentile(latencies, 0.99),
        "p999_ms": 1e3 * _percentile(latencies, 0.999),
        "max_ms": 1e3 * latencies[-1],
        "over_10ms": sum(latency > 0.010 for latency in latencies),
    }


def _failure_costs(source: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    costs = {}
    for limit, failures in (("100/1h", 20_000), ("10000/1d", 20_000)):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "failure-cost",
                "--limit",
                limit,
                "--failures",
                str(failures),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        costs[limit] = json.loads(out)
    return costs


@contextlib.contextmanager
def _baseline(rev: str) -> Iterator[Path]:
    """The package at *rev*, unpacked into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="sgbaseline-") as directory:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "spamguardd"],
            capture_output=True,
            check=True,
        ).stdout
        path = Path(directory) / "archive.tar"
        path.write_bytes(archive)
        with tarfile.open(path) as tar:
            tar.extractall(directory, filter="data")
        yield Path(directory)


def _report(
    results: list[dict[str, Any]], costs: dict[str, dict[str, Any]], floor: dict[str, Any]
) -> None:
    keys = [
        ("start_first_answer_s", "start: first answer (s)"),
        ("start_loaded_s", "start: snapshot loaded (s)"),
        ("rss_per_user_window", "RSS per user and window (bytes)"),
        ("queries", "queries answered"),
        ("p50_ms", "p50 (ms)"),
        ("p99_ms", "p99 (ms)"),
        ("p999_ms", "p99.9 (ms)"),
        ("max_ms", "max (ms)"),
        ("over_10ms", "answers over 10 ms"),
        ("clean_stop_s", "clean stop (s)"),
        ("snapshot_in_bytes", "snapshot written for the start (bytes)"),
        ("snapshot_in_per_user_window", "  per user and window"),
        ("tracked_at_stop", "users counted at the stop"),
        ("snapshot_bytes", "snapshot on disk after the run (bytes)"),
        ("snapshot_bytes_per_user_window", "  per user and window"),
        ("restart_first_answer_s", "restart: first answer (s)"),
        ("restart_loaded_s", "restart: snapshot loaded (s)"),
        ("after_kill_first_answer_s", "kill -9, start: first answer (s)"),
        ("after_kill_loaded_s", "kill -9, start: snapshot loaded (s)"),
        ("after_kill_counters_kept", "kill -9: counters within one interval"),
    ]
    print()
    print(f"{'':42}" + "".join(f"{result['name']:>22}" for result in results))
    for key, label in keys:
        cells = []
        for result in results:
            value = result.get(key)
            cells.append(f"{value:>22,.3f}" if isinstance(value, float) else f"{value!s:>22}")
        print(f"{label:42}" + "".join(cells))
    print(
        f"\nthe machine: a bare trio server under the same load for {floor['seconds']:g} s: "
        f"p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms, "
        f"p99.9 {floor['p999_ms']:.3f} ms, max {floor['max_ms']:.2f} ms, "
        f"{floor['over_10ms']} answers over 10 ms"
    )
    print("\nper failed recipient, one user, distinct recipients (monitor mode):")
    for name, by_limit in costs.items():
        for limit, cost in by_limit.items():
            print(
                f"  {name:12} {limit:9} mean {cost['mean_us']:8.1f} µs, "
                f"last 1000 {cost['last_1000_us']:8.1f} µs, max {cost['max_ms']:6.2f} ms"
            )
    for result in results:
        print(
            f"\n[{result['name']}] SIGHUP at {result.get('sighup_at_s')} s; events during the load:"
        )
        for event in result["events"]:
            print(f"  {event}")
        print(f"  slowest answers (start s, seconds): {result['slowest']}")
        curve = result["rss_curve"]
        print(f"  RSS MiB every 5 s: {[round(rss / 2**20) for _, rss in curve]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    for command in (parser, sub.add_parser("bench")):
        command.add_argument("--users", type=int, default=1_000_000)
        command.add_argument("--seconds", type=float, default=130.0)
        command.add_argument("--rate", type=float, default=1000.0)
        command.add_argument("--baseline-rev", default=None)
    gen = sub.add_parser("generate")
    gen.add_argument("--path", required=True)
    gen.add_argument("--rate", type=float, required=True)
    gen.add_argument("--seconds", type=float, required=True)
    gen.add_argument("--users", type=int, required=True)
    gen.add_argument("--out", required=True)
    gen.add_argument("--churn", action="store_true")
    write = sub.add_parser("write-snapshot")
    write.add_argument("--dir", required=True)
    write.add_argument("--users", type=int, required=True)
    write.add_argument("--now", type=float, required=True)
    write.add_argument("--v2", action="store_true")
    soak = sub.add_parser("soak")
    soak.add_argument("--seconds", type=float, default=900.0)
    soak.add_argument("--rate", type=float, default=1000.0)
    cost = sub.add_parser("failure-cost")
    cost.add_argument("--limit", required=True)
    cost.add_argument("--failures", type=int, required=True)
    args = parser.parse_args()
    if args.command == "generate":
        _generate(args)
    elif args.command == "write-snapshot":
        (_write_v2 if args.v2 else _write_v1)(Path(args.dir), args.users, args.now)
    elif args.command == "failure-cost":
        _failure_cost(args)
    elif args.command == "soak":
        _soak(args)
    else:
        print(
            f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start",
            flush=True,
        )
        results = []
        costs = {}
        with contextlib.ExitStack() as stack:
            if args.baseline_rev is not None:
                source = stack.enter_context(_baseline(args.baseline_rev))
                name = f"baseline {args.baseline_rev[:10]}"
                costs[name] = _failure_costs(source)
                results.append(_run(name, source, args, v2=False))
            costs["this tree"] = _failure_costs(ROOT)
            results.append(_run("this tree", ROOT, args, v2=True))
        floor = _noise_floor(args)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        _report(results, costs, floor)


if __name__ == "__main__":
    main()
