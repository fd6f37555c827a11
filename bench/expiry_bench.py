"""Expiry benchmark: what blocks that expire cost the policy, against blocks that do not.

Measured on the pure policy (no sockets, no files), CPU time (``time.process_time``; the
machine is shared), medians of ``--rounds`` interleaved rounds:

* ``block, forever`` (baseline): N users blocked automatically, as today (``block.expire``
  unset);
* ``block, expiring``: the same N blocks with ``block.expire = ["1h", "1d", "forever"]``: each
  block also records the repeat history and pushes onto the expiry heap;
* ``lift``: every one of the N blocks lifted by ``Policy.expire_due`` in batches of one second
  of (simulated) time, as the daemon's task does; per lift, for N and 10 N blocks, so the growth
  with the size of the block list shows (a heap: O(log n), not a scan);
* ``next expiry``: ``Policy.next_expiry()``, what the task asks before each sleep.

A block costs far more than a lift whatever the expiry: it gathers the user's evidence from
the sample ring of recent failures. Run: ``python bench/expiry_bench.py [--users N]
[--rounds R]`` (the defaults, 5,000 users and 3 rounds, take about a minute and a half).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from spamguardd.core.config import Config
from spamguardd.core.policy import Policy
from spamguardd.core.protocol import RcptRequest, Verify

T0 = 1795824000.0


def _policy(expire: object) -> Policy:
    raw: dict[str, object] = {"limits": {"failed_recipients": "1/1h"}}
    if expire is not None:
        raw["block"] = {"expire": expire}
    return Policy(Config.from_dict(raw, source="bench").policy)


def _block_all(policy: Policy, users: int) -> float:
    """CPU seconds to block *users* users (one failure each, the limit is 1)."""
    requests = [RcptRequest(f"auth:u{n}", "r@x", Verify.FAIL) for n in range(users)]
    decide = policy.decide
    started = time.process_time()
    for n, request in enumerate(requests):
        decide(request, now=float(n) / 1000, wall_now=T0 + n / 1000)
    return time.process_time() - started


def _lift_all(policy: Policy, users: int) -> float:
    """CPU seconds to lift every block, a second of wall time at a time."""
    last = T0 + users / 1000 + 3600
    started = time.process_time()
    at = T0 + 3600
    while at <= last + 1:
        policy.expire_due(at)
        at += 1.0
    elapsed = time.process_time() - started
    assert not policy.blocks, "every block must be lifted"  # noqa: S101 - a bench's own check
    return elapsed


def _next_expiry(policy: Policy, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        policy.next_expiry()
    return time.process_time() - started


def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    users = args.users
    steps = ["1h", "1d", "forever"]
    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float, per: int) -> None:
        samples.setdefault(name, []).append(seconds / per * 1e6)

    for _ in range(args.rounds):
        record("block, forever (baseline)", _block_all(_policy(None), users), users)
        expiring = _policy(steps)
        record("block, expiring", _block_all(expiring, users), users)
        record(f"lift, {users:,} blocks", _lift_all(expiring, users), users)
        record("next expiry", _next_expiry(_policy(steps), 100_000), 100_000)
        large = _policy(steps)
        _block_all(large, 10 * users)
        record(f"lift, {10 * users:,} blocks", _lift_all(large, 10 * users), 10 * users)

    report: Callable[[str], None] = print
    report(f"{users:,} users, {args.rounds} rounds, medians of CPU time")
    report(f"{'measurement':<32} {'µs each':>10}")
    for name, values in samples.items():
        report(f"{name:<32} {statistics.median(values):>10.3f}")


if __name__ == "__main__":
    main()
