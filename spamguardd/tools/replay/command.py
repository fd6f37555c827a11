"""``spamguardctl replay``: the command line of the replay (docs/tuning.md).

``spamguardctl replay [--config FILE] [--limit RATE ...] [--relay-net CIDR ...] [--no-local]
[--json] [--html REPORT.html] LOGFILE...``, or, for a fleet, ``--relay NAME LOGFILE...`` per relay
instead of the plain ``LOGFILE...``. A ``LOGFILE`` of ``-`` is standard input.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from spamguardd.core.config import Config, load_config
from spamguardd.core.errors import ConfigError
from spamguardd.tools.eximlog import Network, UserKeys
from spamguardd.tools.replay.engine import Candidate
from spamguardd.tools.replay.logs import LogError, RelayLogs, given_twice, replay
from spamguardd.tools.replay.report import to_html, to_json, to_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamguardctl replay",
        description="Replay Exim main/reject logs through the policy to choose a limit.",
        epilog="A LOGFILE is an Exim main or reject log, plain or compressed with gzip, bzip2 or"
        " xz (told by its content, not its name). It is read once from start to end, so a pipe"
        " does: - is standard input (zcat mainlog.2.gz | spamguardctl replay -), and a process"
        " substitution such as <(ssh relay cat /var/log/exim4/mainlog) is a LOGFILE too. A file"
        " may be given once.",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="spamguardd TOML (overrides, exemptions)"
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="RATE",
        help="candidate limit such as 100/1h (or 100/1h,300/1d); repeatable",
    )
    parser.add_argument(
        "--relay-net",
        action="append",
        default=[],
        metavar="CIDR",
        help="networks whose unauthenticated clients are counted by address; repeatable",
    )
    parser.add_argument(
        "--no-local",
        dest="local",
        action="store_false",
        help="leave out mail of local programs (uid:LOGIN), counted by default",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", type=Path, metavar="REPORT.html", help="write an HTML report")
    parser.add_argument(
        "--relay",
        action="append",
        nargs="+",
        default=[],
        metavar=("NAME", "LOGFILE"),
        help="the logs of one relay of a fleet, merged with the others' by time; repeatable",
    )
    parser.add_argument(
        "logs", nargs="*", type=Path, metavar="LOGFILE", help="a log; - for standard input"
    )
    return parser


def _sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Path | RelayLogs]:
    """The logs to replay: one relay's plain LOGFILEs, or each ``--relay``'s."""
    if args.logs and args.relay:
        parser.error("give LOGFILE... (one relay) or --relay NAME LOGFILE... (a fleet), not both")
    if not args.logs and not args.relay:
        parser.error("no logs: give LOGFILE..., or --relay NAME LOGFILE... for each relay")
    relays: list[Path | RelayLogs] = []
    for name, *paths in args.relay:
        if not name or not paths:
            parser.error(f"--relay needs a name and at least one LOGFILE (got {name!r} alone)")
        if any(isinstance(r, RelayLogs) and r.name == name for r in relays):
            parser.error(f"--relay {name} is given twice")
        relays.append(RelayLogs(name, tuple(map(Path, paths))))
    sources: list[Path | RelayLogs] = relays or list(args.logs)
    repeated = given_twice(sources)
    if repeated is not None:
        parser.error(repeated)
    return sources


def replay_main(argv: Sequence[str] | None = None) -> int:
    """``spamguardctl replay``: exit 0, 1 (a log cannot be read), 2 (usage) or 78 (config)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config is not None else Config()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"spamguardctl replay: {problem}", file=sys.stderr)
        return 78
    try:
        candidates = [Candidate.parse(text) for text in args.limit] or [
            Candidate(
                ",".join(map(str, config.policy.failed_recipients)),
                config.policy.failed_recipients,
            )
        ]
        networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in args.relay_net]
    except ValueError as exc:
        parser.error(str(exc))
    sources = _sources(parser, args)
    keys = UserKeys(networks, local_senders=args.local)
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        # the report's file is opened first: a path it cannot be written to is said before a
        # replay of hours, not after it
        html = None if args.html is None else args.html.open("w", encoding="utf-8")
        report = replay(sources, config.policy, candidates, keys, progress=progress, warn=_warn)
    except LogError as exc:
        print(f"spamguardctl replay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"spamguardctl replay: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    zoned = [relay.name for relay in report.relays if relay.zoned]
    if zoned and len(zoned) < len(report.relays):
        print(
            f"spamguardctl replay: warning: only the logs of {', '.join(zoned)} carry time"
            " zones (log_timezone); the others' local times were merged with them as UTC",
            file=sys.stderr,
        )
    if html is not None:
        with html:
            html.write(to_html(report))
    if args.json:
        sys.stdout.write(json.dumps(to_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(to_table(report))
    return 0


def _warn(message: str) -> None:
    print(f"spamguardctl replay: warning: {message}", file=sys.stderr)
