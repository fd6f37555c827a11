"""Replay benchmark: lines per second and peak memory, against reading the same log in the same run.

The log is generated from the line formats a real Exim 4.96 wrote (``tests/data/exim/mainlog``):
per SMTP connection a connect line, ``rejected RCPT`` for about 3 % of recipients (callout
refusals and unrouteable addresses), ``<=`` with ``A=`` or a relay address and ``for ...``,
``=>`` per recipient (``**`` for about 0.5 %), ``Completed`` and the QUIT line; 20,000 users,
a few of them spammers. Each measurement runs in its own process, so its peak RSS is its own:

* baseline: read the file and split every line (the least any replay must do);
* replay with the default limit, and with three candidate limits at once;
* replay of a log a quarter the size, to show that memory does not follow the log.

Run: ``python bench/replay_bench.py [--lines N]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generated_logs import ordinary


def _measure(kind: str, path: Path, limits: list[str]) -> dict[str, float]:
    """Run one measurement in this process; return its figures."""
    started = time.process_time()
    if kind == "baseline":
        lines = 0
        with path.open(encoding="utf-8", errors="surrogateescape") as log:
            for line in log:
                line.split()
                lines += 1
        blocked = users = 0
    else:
        from spamguardd.core.config import PolicyConfig  # noqa: PLC0415 - timed part starts above
        from spamguardd.tools.eximlog import UserKeys  # noqa: PLC0415
        from spamguardd.tools.replay.engine import Candidate  # noqa: PLC0415
        from spamguardd.tools.replay.logs import replay  # noqa: PLC0415

        keys = UserKeys([ipaddress.ip_network("198.51.100.0/24")])
        report = replay([path], PolicyConfig(), [Candidate.parse(limit) for limit in limits], keys)
        lines = report.lines_read
        blocked = sum(len(result.blocked) for result in report.results)
        users = len(report.peaks)
    elapsed = time.process_time() - started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "lines": lines,
        "seconds": elapsed,
        "rss_mib": rss_mib,
        "blocked": blocked,
        "users": users,
    }


def _run(kind: str, path: Path, limits: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--log", str(path), *limits],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    """Generate the logs, run every measurement, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--measure", choices=["baseline", "replay"])
    parser.add_argument("--log", type=Path)
    parser.add_argument("limits", nargs="*")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(_measure(args.measure, args.log, args.limits or ["100/1h"])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "mainlog"
        small = Path(tmp) / "mainlog.small"
        ordinary(big, args.lines)
        ordinary(small, args.lines // 4)
        size = big.stat().st_size / 2**20
        print(f"log: {args.lines:,} lines, {size:.0f} MiB (generated)")
        runs = [
            ("baseline: read + split", "baseline", big, []),
            ("replay, 1 limit (100/1h)", "replay", big, ["100/1h"]),
            ("replay, 3 limits", "replay", big, ["50/1h", "100/1h", "100/1h,300/1d"]),
            ("replay, 1 limit, log / 4", "replay", small, ["100/1h"]),
        ]
        print(
            f"{'run':<28} {'lines':>10} {'cpu s':>8} {'lines/s':>10} {'peak RSS':>9}"
            f" {'users':>6} blocked"
        )
        results = {}
        for name, kind, path, limits in runs:
            result = _run(kind, path, limits)
            results[name] = result
            rate = result["lines"] / result["seconds"]
            print(
                f"{name:<28} {result['lines']:>10,.0f} {result['seconds']:>8.2f} {rate:>10,.0f}"
                f" {result['rss_mib']:>6.1f} MiB {result['users']:>6.0f} {result['blocked']:>4.0f}"
            )
        base = results["baseline: read + split"]
        one = results["replay, 1 limit (100/1h)"]
        ratio = (one["seconds"] / one["lines"]) / (base["seconds"] / base["lines"])
        print(f"replay (1 limit) costs {ratio:.1f}x the time of reading and splitting the lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
