"""Replay benchmark: lines per second of CPU time, with the policy's share apart, against baselines.

Two generated logs in the line formats of a real Exim 4.96 (``bench/generated_logs.py``): a
relay's everyday traffic, and a spam wave in which every line is a failed recipient (5,000
users). Each measurement runs in its own process, so its CPU time and peak RSS are its own:

* ``read``: read the file and split every line, the least any replay must do (baseline);
* ``parse``: the Exim log parser alone over the whole log (``eximlog.scan``, nothing skipped);
* ``replay``: the replay of the log, as ``spamguardctl replay`` does it;
* ``policy``: the policy's share of that replay, timed apart. The replay runs once with its
  policies recording every call (``decide``, ``forget_idle``), then the same calls are timed
  on fresh policies;
* ``stand-in``: the replay with a stand-in policy that answers ``accept`` at no cost: what the
  parser, the peaks and the replay loop cost, in place. Replay minus stand-in is the policy's
  cost in place, which is higher than apart: in place the two share the processor's caches.

With ``--against REV`` the same measurements also run on the code of that git revision
(exported with ``git archive``), in the same rounds, so old and new share the machine's load.
Every measurement runs ``--rounds`` times, interleaved; the table shows medians. CPU time
(``time.process_time``) rather than the wall clock: the machine is shared. The load of the rest
of the machine during the run is printed at the end.

Run: ``python bench/replay_bench.py [--lines N] [--rounds R] [--against REV]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import ipaddress
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from generated_logs import RELAY_NET, ordinary, spam_wave

# ---------------------------------------------------------------------------------------------
# One measurement, in its own process


def _modules() -> tuple[ModuleType, ModuleType]:
    """The module where the replay looks up ``Policy``, and the one with ``replay()``.

    The replay is a package since it was split up; before, it was one module. Both layouts are
    measured, so that ``--against`` can run older code.
    """
    try:
        engine = importlib.import_module("spamguardd.tools.replay.engine")
        logs = importlib.import_module("spamguardd.tools.replay.logs")
    except ModuleNotFoundError:
        engine = logs = importlib.import_module("spamguardd.tools.replay")
    return engine, logs


def _replay(path: Path, limits: list[str]) -> Any:
    from spamguardd.core.config import PolicyConfig  # noqa: PLC0415 - the code under test
    from spamguardd.tools.eximlog import UserKeys  # noqa: PLC0415

    engine, logs = _modules()
    keys = UserKeys([ipaddress.ip_network(RELAY_NET)])
    return logs.replay([path], PolicyConfig(), [engine.Candidate.parse(x) for x in limits], keys)


def _policy_seconds(path: Path, limits: list[str]) -> tuple[float, int]:  # noqa: C901 - a recorder
    """CPU seconds the replay of *path* spends in its policies, and how many decisions it asks
    for (a run of failures, ``decide_failures``, asks for one per failure)."""
    from spamguardd.core.policy import Policy  # noqa: PLC0415

    engine, _ = _modules()
    calls: list[tuple[Callable[..., Any], Any, float]] = []
    decided = [0]

    class Recording(Policy):
        """Records each call for a twin that replays them later, timed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.twin = Policy(*args, **kwargs)

        def decide(self, request: Any, *, now: float, wall_now: float) -> Any:
            calls.append((self.twin.decide, request, now))
            decided[0] += 1
            return super().decide(request, now=now, wall_now=wall_now)

        def forget_idle(self, now: float, users: Any = None) -> int:
            calls.append((self.twin.forget_idle, None, now))
            decided[0] += 1
            return super().forget_idle(now, users)

        def decide_failures(self, user: str, failures: Any) -> Any:
            twin = self.twin

            def run(failures: Any, *, now: float, wall_now: float) -> Any:  # noqa: ARG001
                return twin.decide_failures(user, failures)

            calls.append((run, list(failures), 0.0))
            blocked = user in self.blocks
            out = super().decide_failures(user, failures)
            # a run ends at the failure that blocks: the rest are the block list's, not decided
            decided[0] += out[-1][0] + 1 if not blocked and user in self.blocks else len(failures)
            return out

    setattr(engine, "Policy", Recording)  # noqa: B010 - a module attribute, looked up late
    _replay(path, limits)

    def nothing(request: Any = None, *, now: float = 0.0, wall_now: float = 0.0) -> None:
        """As cheap a call as there is: the loop's own cost, subtracted below."""

    started = time.process_time()
    for _call, request, now in calls:
        if request is None:
            nothing(now=now)
        else:
            nothing(request, now=now, wall_now=now)
    overhead = time.process_time() - started
    started = time.process_time()
    for call, request, now in calls:
        if request is None:
            call(now)
        else:
            call(request, now=now, wall_now=now)
    return time.process_time() - started - overhead, decided[0]


def _install_stand_in() -> None:
    """Replace the replay's policies with one that answers ``accept`` and keeps nothing."""
    from spamguardd.core.policy import ACCEPT, Decision, PolicyStatistics  # noqa: PLC0415

    engine, _ = _modules()
    accepted = Decision(ACCEPT)

    class StandIn:
        """What the replay would cost with a policy that cost nothing."""

        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            self.blocks: dict[str, Any] = {}

        def decide(self, _request: Any, *, now: float, wall_now: float) -> Decision:  # noqa: ARG002
            return accepted

        def decide_failures(self, _user: str, _failures: Any) -> list[Any]:
            return []

        def forget_idle(self, _now: float, _users: Any = None) -> int:
            return 0

        def statistics(self) -> Any:
            return PolicyStatistics(0, 0, 0, 0)

    setattr(engine, "Policy", StandIn)  # noqa: B010 - a module attribute, looked up late


def _measure(kind: str, path: Path, limits: list[str]) -> dict[str, Any]:
    """Run one measurement in this process; return its figures."""
    from spamguardd.tools import eximlog  # noqa: PLC0415

    figures: dict[str, Any] = {"code": str(Path(eximlog.__file__).parent.parent)}
    if kind == "stand-in":
        _install_stand_in()
    elif kind != "read":
        _modules()  # imported before the clock starts, as the stand-in's are
    started = time.process_time()
    if kind == "read":
        lines = 0
        with path.open(encoding="utf-8", errors="surrogateescape") as log:
            for line in log:
                line.split()
                lines += 1
        figures["lines"] = lines
    elif kind == "parse":
        counts = eximlog.ScanCounts()
        with path.open(encoding="utf-8", errors="surrogateescape") as log:
            for _ in eximlog.scan(log, counts):
                pass
        figures["lines"] = counts.lines
    elif kind in {"replay", "stand-in"}:
        report = _replay(path, limits)
        figures["lines"] = report.lines_read
        figures["blocked"] = sum(len(result.blocked) for result in report.results)
        figures["users"] = len(report.peaks)
    else:
        policy, calls = _policy_seconds(path, limits)
        figures["policy_seconds"] = policy
        figures["calls"] = calls
    figures["seconds"] = time.process_time() - started
    figures["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


# ---------------------------------------------------------------------------------------------
# The run: logs, rounds, table


def _export(rev: str, into: Path) -> Path:
    """The package as of git revision *rev* of the checkout at hand, in *into*, for PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "spamguardd"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _run(kind: str, path: Path, limits: list[str], code: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--log", str(path), *limits],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    if code is not None and not result["code"].startswith(str(code)):
        raise RuntimeError(f"--against ran {result['code']}, not {code}")
    return result


def _cpu_busy() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


@dataclasses.dataclass(frozen=True)
class Run:
    """One measurement of the plan: which log, what kind, which limits, on which code."""

    log: str
    kind: str
    path: Path
    limits: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The limits as the table shows them."""
        return ",".join(self.limits) if len(self.limits) < 2 else f"{len(self.limits)} limits"


Figures = dict[str, float]
Results = dict[tuple[Run, str], Figures]


def _print_results(results: Results) -> None:
    print(
        f"\n{'log':<13} {'run':<17} {'code':<12} {'lines':>10} {'cpu s':>7} {'lines/s':>10}"
        f" {'RSS MiB':>8} {'users':>6} {'blocked':>7}"
    )
    for (run, label), figures in results.items():
        if run.kind in {"policy", "stand-in"}:
            continue
        rate = figures["lines"] / figures["seconds"]
        print(
            f"{run.log:<13} {f'{run.kind} {run.name}'.strip():<17} {label:<12}"
            f" {figures['lines']:>10,.0f} {figures['seconds']:>7.2f} {rate:>10,.0f}"
            f" {figures['rss_mib']:>8.1f} {figures.get('users', 0):>6,.0f}"
            f" {figures.get('blocked', 0):>7,.0f}"
        )
    print("\nthe policy's share of each replay (decide and forget_idle):")
    print(
        f"{'log':<13} {'limits':<8} {'code':<12} {'calls':>10} {'apart':>8} {'policy s':>9}"
        f" {'rest s':>7} {'stand-in s':>11} {'in situ':>8}"
    )
    for (run, label), figures in results.items():
        if run.kind != "policy":
            continue
        replay = results[(dataclasses.replace(run, kind="replay"), label)]
        stand_in = results.get((dataclasses.replace(run, kind="stand-in"), label))
        rest = replay["seconds"] - figures["policy_seconds"]
        calls = figures["calls"]
        in_situ = (
            f"{(replay['seconds'] - stand_in['seconds']) / calls * 1e6:>8.2f}" if stand_in else ""
        )
        print(
            f"{run.log:<13} {run.name:<8} {label:<12} {calls:>10,.0f}"
            f" {figures['policy_seconds'] / calls * 1e6:>8.2f} {figures['policy_seconds']:>9.2f}"
            f" {rest:>7.2f} {stand_in['seconds'] if stand_in else float('nan'):>11.2f} {in_situ}"
        )
    print(
        "apart: µs per call of the recorded calls replayed on fresh policies; rest = replay -"
        " policy s;\nstand-in: the replay with a policy that costs nothing (the parser, the peaks,"
        " the loop);\nin situ: (replay - stand-in) / calls, the policy's cost among the rest."
        "\nFor another policy: lines/s = lines / (stand-in s + calls * its µs per call in situ)."
    )


def _print_comparison(results: Results, old: str) -> None:
    print(f"\nnew against {old}, same rounds (CPU seconds of {old} / new):")
    for (run, label), figures in results.items():
        before = results.get((run, old))
        if label != "new" or before is None:
            continue
        if run.kind == "policy":
            ratio = before["policy_seconds"] / figures["policy_seconds"]
        else:
            ratio = before["seconds"] / figures["seconds"]
        print(f"  {run.log:<13} {run.kind:<8} {run.name:<9} {ratio:5.2f}x")


def _print_targets(results: Results, everyday: Run, wave: Run) -> None:
    print("\ntargets (lines per second of CPU time, one core):")
    for run, target in ((everyday, 300_000), (wave, 150_000)):
        figures = results[(run, "new")]
        rate = figures["lines"] / figures["seconds"]
        stand_in = results[(dataclasses.replace(run, kind="stand-in"), "new")]["seconds"]
        print(
            f"  {run.log:<10} {run.name}: {rate:,.0f} (target {target:,}:"
            f" {'met' if rate >= target else 'not met'});"
            f" with a policy that cost nothing {figures['lines'] / stand_in:,.0f}"
        )


def main() -> int:
    """Generate the logs, run every measurement, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also measure the code of this revision")
    parser.add_argument("--measure", choices=["read", "parse", "replay", "stand-in", "policy"])
    parser.add_argument("--log", type=Path)
    parser.add_argument("limits", nargs="*")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(_measure(args.measure, args.log, args.limits or ["100/1h"])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        logs = {"ordinary": base / "ordinary", "spam wave": base / "spam-wave"}
        quarter = base / "ordinary-quarter"
        ordinary(logs["ordinary"], args.lines)
        ordinary(quarter, args.lines // 4)
        spam_wave(logs["spam wave"], args.lines)
        codes: list[tuple[str, Path | None]] = [("new", None)]
        if args.against:
            (base / "old").mkdir()
            codes.append((args.against[:12], _export(args.against, base / "old")))
        plan: list[tuple[Run, list[tuple[str, Path | None]]]] = [
            (Run(log, "read", path), [("-", None)]) for log, path in logs.items()
        ]
        for log, path in logs.items():
            plan += [
                (Run(log, "parse", path), codes),
                (Run(log, "replay", path, ("100/1h",)), codes),
                (Run(log, "policy", path, ("100/1h",)), codes),
                (Run(log, "stand-in", path, ("100/1h",)), codes),
            ]
        three = ("50/1h", "100/1h", "100/1h,300/1d")
        plan += [
            (Run("ordinary", "replay", logs["ordinary"], three), codes),
            (Run("spam wave", "replay", logs["spam wave"], ("20/1h",)), codes),
            (Run("spam wave", "policy", logs["spam wave"], ("20/1h",)), codes),
            (Run("ordinary / 4", "replay", quarter, ("100/1h",)), codes),
        ]
        for log, path in logs.items():
            print(f"log {log}: {args.lines:,} lines, {path.stat().st_size / 2**20:.0f} MiB")
        print(f"{args.rounds} rounds; CPU seconds of each measurement's own process; medians")
        busy0, total0 = _cpu_busy()
        ours0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        rounds: dict[tuple[Run, str], list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for run, which in plan:
                for label, code in which:
                    measured = _run(run.kind, run.path, list(run.limits), code)
                    rounds.setdefault((run, label), []).append(measured)
        wall = time.monotonic() - started
        busy1, total1 = _cpu_busy()
        ours1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        results: Results = {
            key: {
                field: statistics.median(float(run[field]) for run in runs)
                for field in runs[0]
                if field != "code"
            }
            for key, runs in rounds.items()
        }
        _print_results(results)
        if args.against:
            _print_comparison(results, codes[1][0])
        _print_targets(
            results,
            Run("ordinary", "replay", logs["ordinary"], ("100/1h",)),
            Run("spam wave", "replay", logs["spam wave"], ("100/1h",)),
        )
        ours = (ours1.ru_utime + ours1.ru_stime) - (ours0.ru_utime + ours0.ru_stime)
        others = max(0.0, (busy1 - busy0) - ours)
        print(
            f"\nmachine: {os.cpu_count()} cores, {wall:.0f} s of wall time; the measurements used"
            f" {ours:.0f} CPU s, everything else {others:.0f} CPU s"
            f" ({others / max(total1 - total0, 1e-9):.0%} of the machine's capacity);"
            f" load average at the end {os.getloadavg()[0]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
