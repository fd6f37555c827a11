"""Socket-level fuzzing of a live spamguardd: a million bad (and good) connections, canaries.

A real ``spamguardd`` process (under ``prlimit --nofile=1024:HARD``, as systemd would start it
without the unit's ``LimitNOFILE``) takes its snapshot every second while ``--workers``
processes play the cases of ``tests/socket_fuzz.py`` against it: random bytes, non-UTF-8, NUL,
lone surrogates, oversize, truncated, pipelined, half-closed, vanished and reset clients,
mutated valid requests. First a canary user is failed to the limit (it must be frozen at
exactly the limit); between cases each worker checks that it stays ``freeze`` and that a clean
user stays ``accept``.

Printed: cases by kind and outcome, hangs (no answer in 10 s), bad answers (not exactly one
reply line), canary checks and failures, whether the daemon stayed up and how it exited, its
``stats`` and its log's ``internal_error``/``snapshot_failed`` lines, and the rate. The
baseline in the same run is the same number of valid requests per second the daemon answers
alone (``--baseline`` seconds of them), so the fuzzing rate can be compared with it.

Run: ``python bench/fuzz_socket.py [--cases 1000000] [--workers 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import socket_fuzz  # noqa: E402 - after the path is set


def _daemon(workdir: Path, nofile: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    query = workdir / "q.sock"
    config = workdir / "spamguardd.toml"
    config.write_text(
        f'[limits]\nfailed_recipients = ["{socket_fuzz.LIMIT}/1h"]\n'
        f'[server]\nquery_socket = "{query}"\nbacklog = 4096\n'
        f'[state]\ndir = "{workdir / "state"}"\nsnapshot_interval = 1.0\n'
        f'[admin]\nsocket = "{workdir / "admin.sock"}"\n'
        '[log]\nformat = "json"\n'
    )
    log = workdir / "daemon.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *("prlimit", f"--nofile={nofile}", sys.executable),
                *("-m", "spamguardd", "--config", str(config)),
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    for _ in range(600):
        with contextlib.suppress(OSError):
            if socket_fuzz.ask(query, b"ping\n", timeout=5) == b"pong":
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


def _baseline(query: Path, seconds: float) -> float:
    """Valid requests a second, one client back to back."""
    import random  # noqa: PLC0415 - only the baseline needs it

    rng = random.Random(1)
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        socket_fuzz.run_case(query, socket_fuzz.KINDS["valid"](rng))
        done += 1
    return done / (time.perf_counter() - began)


def _log_counts(log: Path) -> dict[str, int]:
    names = (
        "internal_error",
        "snapshot_written",
        "snapshot_failed",
        "accept_failed",
        "block_not_persisted",
    )
    tally = dict.fromkeys(names, 0)
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line).get("event")
            if event in tally:
                tally[event] += 1
    return tally


def _bench(args: argparse.Namespace) -> int:
    print(
        f"socket fuzzing: {args.cases} cases in {args.workers} workers; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="sg-fuzz-") as tmp:
        workdir = Path(tmp)
        daemon, query, log = _daemon(workdir, args.nofile)
        try:
            verdicts = socket_fuzz.block_canary(query)
            frozen_at = verdicts.index(b"freeze") + 1 if b"freeze" in verdicts else None
            print(f"canary frozen at failure {frozen_at} (limit {socket_fuzz.LIMIT})")
            rate = _baseline(query, args.baseline)
            print(f"baseline: {rate:.0f} valid requests/s from one client")
            began = time.perf_counter()
            shares = [
                args.cases // args.workers + (seed < args.cases % args.workers)
                for seed in range(args.workers)
            ]
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        str(query),
                        str(shares[seed]),
                        str(seed),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for seed in range(args.workers)
            ]
            results = [json.loads(w.communicate()[0]) for w in workers]
            elapsed = time.perf_counter() - began
            stats = _stats(workdir)
            alive = daemon.poll() is None
            snapshot_files = len(list((workdir / "state").rglob("*")))
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
        total: dict[str, Any] = {"outcomes": {}, "kinds": {}, "bad": []}
        for result in results:
            for key in ("outcomes", "kinds"):
                for name, n in result[key].items():
                    total[key][name] = total[key].get(name, 0) + n
            total["bad"] += result["bad"]
        cases = sum(r["cases"] for r in results)
        hangs = total["outcomes"].get("hang", 0)
        bad = sum(r["bad_total"] for r in results) - hangs
        checks = sum(r["canary_checks"] for r in results)
        canary_failures = sum(r["canary_failures"] for r in results)
        print(f"cases: {cases} in {elapsed:.0f} s ({cases / elapsed:.0f}/s)")
        print(f"kinds: {dict(sorted(total['kinds'].items()))}")
        print(f"outcomes: {total['outcomes']}")
        print(f"hangs: {hangs}; bad answers: {bad}; first ones: {total['bad'][:5]}")
        print(f"canary checks: {checks}, wrong: {canary_failures}")
        print(f"daemon up at the end: {alive}; exit status after SIGTERM: {code}")
        print(f"daemon stats: queries {stats['queries']}, errors {stats['errors']}")
        print(f"daemon log: {_log_counts(log)}; state files: {snapshot_files}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        ok = (
            alive
            and code == 0
            and hangs == 0
            and bad == 0
            and canary_failures == 0
            and frozen_at == socket_fuzz.LIMIT
            and _log_counts(log)["internal_error"] == 0
        )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    """Run the fuzzing, or one worker of it."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, count, seed = sys.argv[2:5]
        result = socket_fuzz.fuzz(Path(path), int(count), seed=int(seed))
        print(json.dumps(result), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    parser.add_argument("--nofile", default=f"1024:{hard}", help="the daemon's SOFT:HARD")
    return _bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
