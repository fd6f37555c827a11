"""``spamguardctl replay``: the command line of the replay (docs/tuning.md).

``spamguardctl replay [--config FILE] [--limit RATE ...] [--relay-net CIDR ...] [--json]
[--html REPORT.html] LOGFILE...``
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
from spamguardd.tools.replay.logs import replay
from spamguardd.tools.replay.report import to_html, to_json, to_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamguardctl replay",
        description="Replay Exim main/reject logs through the policy to choose a limit.",
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
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", type=Path, metavar="REPORT.html", help="write an HTML report")
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOGFILE")
    return parser


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
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        report = replay(args.logs, config.policy, candidates, UserKeys(networks), progress=progress)
    except OSError as exc:
        print(f"spamguardctl replay: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.html is not None:
        args.html.write_text(to_html(report), encoding="utf-8")
    if args.json:
        sys.stdout.write(json.dumps(to_json(report), indent=2) + "\n")
    else:
        sys.stdout.write(to_table(report))
    return 0
