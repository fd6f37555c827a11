"""Blocks announced are never lost: kill -9 storms and a full disk against a real daemon.

A real ``python -m spamguardd`` process runs with ``failed_recipients = "1/1h"``, so every failed
recipient of a new user is a block. ``--clients`` threads ask as Exim does (one connection per
recipient, a new user each time) and record every user answered ``freeze`` (acknowledged) and
every ``defer``.

* ``kill`` (the default): ``--kills`` times, after a random 20-400 ms of blocking, the daemon is
  killed with SIGKILL and started again at once; the clients carry on throughout.
* ``full``: the state directory is a tmpfs of ``--tmpfs-size`` bytes (root only): the clients
  block until the disk is full and the daemon answers ``defer``, the daemon is killed with
  SIGKILL ``--kills`` times meanwhile, then the tmpfs is grown and the harness waits for the
  daemon's retry to write the blocks it held in memory.

At the end the daemon is stopped and started once more, and every acknowledged user must be in
the block file (read with the daemon's own loader, which also refuses a damaged file) and be
answered ``freeze``: the figure printed as *lost* must be 0 (exit status 1 otherwise).

With ``--baseline-rev REV`` the same run is made first against that revision of the daemon
(``git archive`` into a temporary directory), for a before/after in one run.

Run: ``python bench/kill_storm.py [--mode kill|full] [--kills 100] [--clients 8]
[--baseline-rev REV]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scale_load import ask

from spamguardd.state.blockfile import BlockStore

CONFIG = '[limits]\nfailed_recipients = "1/1h"\n[state]\nsnapshot_interval = 1\n'


class Daemon:
    """The daemon process, started and killed at will."""

    def __init__(self, workdir: Path, state: Path, source: Path | None = None) -> None:
        self.workdir = workdir
        self.env = dict(os.environ)
        if source is not None:
            self.env["PYTHONPATH"] = str(source)
        self.socket = workdir / "q.sock"
        self.argv = [
            sys.executable,
            "-m",
            "spamguardd",
            "--config",
            str(workdir / "c.toml"),
            "--state-dir",
            str(state),
            "--query-socket",
            str(self.socket),
            "--admin-socket",
            str(workdir / "a.sock"),
        ]
        (workdir / "c.toml").write_text(CONFIG)
        self.log = (workdir / "daemon.log").open("ab")
        self.process: subprocess.Popen[bytes] | None = None
        self.start_times: list[float] = []

    def start(self) -> None:
        """Start it and wait until it answers."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, stdout=self.log, stderr=self.log, env=self.env, cwd=self.workdir
        )
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.process.returncode}; see the log")
            with contextlib.suppress(OSError):
                if ask(self.socket, b"ping", timeout=1.0) == b"pong\n":
                    break
            time.sleep(0.01)
        self.start_times.append(time.monotonic() - started)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        assert self.process is not None  # noqa: S101 - started before
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.process is not None  # noqa: S101 - started before
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


class Clients:
    """Threads that block new users as fast as the daemon answers."""

    def __init__(self, daemon: Daemon, count: int) -> None:
        self.daemon = daemon
        self.acked: set[str] = set()
        self.deferred: set[str] = set()
        #: Users answered defer, in order.
        self.deferred_order: list[str] = []
        self.refused = 0
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def start(self) -> None:
        """Start the threads."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            user = f"auth:storm{next(self._numbers)}@example.com"
            try:
                reply = ask(self.daemon.socket, f"rcpt user={user} rcpt=x@y verify=fail".encode())
            except OSError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.005)
                continue
            with self._lock:
                if reply.startswith(b"freeze"):
                    self.acked.add(user)
                elif reply.startswith(b"defer"):
                    self.deferred.add(user)
                    self.deferred_order.append(user)


def check(daemon: Daemon, state: Path, acked: set[str]) -> tuple[int, int]:
    """Restart cleanly and count acknowledged users missing from the file and not frozen."""
    daemon.stop()
    daemon.start()
    on_disk = {block.user for block in BlockStore(state).load()}
    missing = acked - on_disk
    not_frozen = sum(
        not ask(daemon.socket, f"check user={user}".encode()).startswith(b"freeze")
        for user in random.sample(sorted(acked), min(len(acked), 500))
    )
    return len(missing), not_frozen


def kill_storm(workdir: Path, kills: int, clients: int, source: Path | None) -> bool:
    """The kill -9 storm; True when nothing was lost."""
    state = workdir / "state"
    daemon = Daemon(workdir, state, source)
    daemon.start()
    storm = Clients(daemon, clients)
    started = time.monotonic()
    storm.start()
    for _ in range(kills):
        time.sleep(random.uniform(0.02, 0.4))
        daemon.kill()
        daemon.start()
    storm.stop()
    elapsed = time.monotonic() - started
    missing, not_frozen = check(daemon, state, storm.acked)
    daemon.stop()
    print(f"kill -9 storm: {kills} kills in {elapsed:.1f} s, {clients} clients")
    print(f"  blocks acknowledged (freeze answered): {len(storm.acked)}")
    print(f"  answered defer: {len(storm.deferred)}; refused while down: {storm.refused}")
    print(f"  blocks in the file after restart: {len(BlockStore(state).load())}")
    print(f"  restart to first answer: median {statistics.median(daemon.start_times):.2f} s")
    print(
        f"  lost (acknowledged, not in the file): {missing}; not frozen after restart: {not_frozen}"
    )
    return missing == 0 and not_frozen == 0


def full_disk(workdir: Path, kills: int, clients: int, size: int, source: Path | None) -> bool:
    """The full-disk run; True when nothing acknowledged was lost and held blocks were saved."""
    state = workdir / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(state)], check=True)
    try:
        daemon = Daemon(workdir, state, source)
        daemon.start()
        storm = Clients(daemon, clients)
        started = time.monotonic()
        storm.start()
        while len(storm.deferred) < 200 and time.monotonic() - started < 120:
            time.sleep(0.05)
        full_at = len(storm.acked)
        for _ in range(kills):
            time.sleep(random.uniform(0.02, 0.4))
            daemon.kill()
            daemon.start()
        since_start = len(storm.deferred_order)
        time.sleep(0.5)  # defers answered by the daemon now running: held in its memory
        storm.stop()
        held = storm.deferred_order[since_start:]
        acked_full = len(storm.acked) - full_at
        used = os.statvfs(state)
        print(f"full disk: tmpfs of {size} bytes, {kills} kills while full, {clients} clients")
        print(f"  blocks acknowledged before the disk filled: {full_at}; after: {acked_full}")
        print(f"  answered defer (block held in memory, not on disk): {len(storm.deferred)}")
        print(f"  free blocks on the tmpfs at the end: {used.f_bfree}")
        subprocess.run(["mount", "-o", "remount,size=64m", str(state)], check=True)
        deadline = time.monotonic() + 40
        saved = 0
        while time.monotonic() < deadline:  # the retry's backoff reaches 30 s at most
            on_disk = {block.user for block in BlockStore(state).load()}
            saved = len(set(held) & on_disk)
            if saved == len(held):
                break
            time.sleep(0.5)
        print(
            "  blocks held in memory by the last run, written once space came back: "
            f"{saved}/{len(held)}"
        )
        missing, not_frozen = check(daemon, state, storm.acked)
        daemon.stop()
        print(f"  lost (acknowledged, not in the file): {missing}; not frozen: {not_frozen}")
        return missing == 0 and not_frozen == 0 and saved == len(held)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def main() -> None:
    """Run the chosen harness and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("kill", "full"), default="kill")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tmpfs-size", type=int, default=256 * 1024)
    parser.add_argument("--baseline-rev", help="run the same against this git revision first")
    args = parser.parse_args()
    if args.baseline_rev:
        with tempfile.TemporaryDirectory(prefix="sg-base-") as tree:
            archive = subprocess.run(
                ["git", "archive", args.baseline_rev, "spamguardd"],
                cwd=Path(__file__).parent.parent,
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            print(f"== baseline {args.baseline_rev}")
            run_once(args, Path(tree))
        print("== this tree")
    sys.exit(0 if run_once(args, None) else 1)


def run_once(args: argparse.Namespace, source: Path | None) -> bool:
    """One run of the chosen harness against *source* (None: the installed package)."""
    with tempfile.TemporaryDirectory(prefix="sg-storm-", dir="/tmp") as scratch:
        workdir = Path(scratch)
        if args.mode == "kill":
            return kill_storm(workdir, args.kills, args.clients, source)
        return full_disk(workdir, args.kills, args.clients, args.tmpfs_size, source)


if __name__ == "__main__":
    main()
