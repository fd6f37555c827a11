"""What ``Policy.decide`` costs per query, this tree against a baseline revision, in one run.

The volume guard (``limits.accepted_recipients``) and the early warning (``limits.warn_at``)
touch the query path; with both off an accepted recipient must cost what it did. For each
implementation (this tree, and ``--baseline-rev REV`` unpacked with ``git archive``) a child
process times ``decide()`` on:

* ``accepted``: ``verify=ok`` recipients of 10,000 users (options off);
* ``failed``: ``verify=fail`` recipients of 10,000 users, two windows (options off);

and, for this tree only, the same with the options on (``accepted+guard``, ``failed+warn``).
Rounds alternate between the implementations so that the machine's drift hits both alike; the
median of the rounds is printed in ns per call, with the change against the baseline.

Run: ``python bench/decide_cost.py [--baseline-rev REV] [--rounds N] [--calls N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
from spamguardd.core.config import PolicyConfig
from spamguardd.core.policy import Policy
from spamguardd.core.protocol import RcptRequest, Verify
from spamguardd.core.rate import Rate

case, calls = sys.argv[1], int(sys.argv[2])
rates = (Rate(100, 3600), Rate(1000, 86400))
extra = {}
if case == "accepted+guard":
    extra = {"accepted_recipients": (Rate(100000, 3600),)}
elif case == "failed+warn":
    extra = {"warn_at": 0.5}
policy = Policy(PolicyConfig(failed_recipients=rates, max_tracked_users=10**7, **extra))
verify = Verify.OK if case.startswith("accepted") else Verify.FAIL
requests = [
    RcptRequest(user=f"auth:u{i % 10000}@example.com", rcpt=f"r{i}@x.test", verify=verify)
    for i in range(calls)
]
decide = policy.decide
now = 0.0
started = time.perf_counter()
for request in requests:
    now += 0.001
    decide(request, now=now, wall_now=now)
elapsed = time.perf_counter() - started
print(json.dumps(elapsed / calls * 1e9))
"""


@contextlib.contextmanager
def _baseline(rev: str) -> Iterator[Path]:
    """The package at *rev*, unpacked into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="sgdecide-") as directory:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "spamguardd"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        yield Path(directory)


def _time(source: Path, case: str, calls: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, case, str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=source,
    ).stdout
    return float(json.loads(out))


def main() -> None:
    """Time both implementations, alternating, and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="HEAD")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    with _baseline(args.baseline_rev) as base:
        sources = {f"baseline {args.baseline_rev}": base, "this tree": ROOT}
        cases = [(name, case) for case in ("accepted", "failed") for name in sources] + [
            ("this tree", "accepted+guard"),
            ("this tree", "failed+warn"),
        ]
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
        for _ in range(args.rounds):
            for name, case in cases:
                samples[name, case].append(_time(sources[name], case, args.calls))
    print(f"Policy.decide, ns per call, median of {args.rounds} rounds of {args.calls} calls")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    baseline = f"baseline {args.baseline_rev}"
    for (name, case), values in samples.items():
        median = statistics.median(values)
        line = f"  {case:<15} {name:<24} {median:8.0f} ns  (min {min(values):.0f})"
        plain = case.split("+")[0]
        if name == "this tree" and (baseline, plain) in samples:
            reference = statistics.median(samples[baseline, plain])
            line += f"  {100 * (median / reference - 1):+.1f}% against the baseline"
        print(line)


if __name__ == "__main__":
    main()
