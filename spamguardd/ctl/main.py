"""``spamguardctl``: see who is blocked and why, block, unblock, release, reset, reload.

A small blocking client of the admin socket (one request line, one reply line). It prints tables
for people, or the daemon's JSON reply with ``--json`` for scripts (``docs/admin.md``). Freeing
or deleting a user's frozen mail is done here, not in the daemon: the client runs as the admin,
who may drive Exim's queue, while the daemon's user may not.

Exit status: 0 success; 1 refused or not found (or an Exim step failed); 2 usage;
69 (``EX_UNAVAILABLE``) the daemon cannot be reached, with a message naming the socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import attrs

from spamguardd import __version__
from spamguardd.core.adminproto import (
    Command,
    ErrorReply,
    EximReport,
    MessageOutcome,
    Reply,
    ShowReply,
    UnblockReply,
    reply_to_json,
)
from spamguardd.core.config import AdminConfig, load_config
from spamguardd.core.errors import ConfigError
from spamguardd.core.rate import parse_duration
from spamguardd.core.timestamps import parse_time
from spamguardd.core.userkey import normalise
from spamguardd.ctl.client import DEFAULT_TIMEOUT, NotPermittedError, UnreachableError, request
from spamguardd.ctl.render import render
from spamguardd.tools.exim_queue import EximError, EximQueue
from spamguardd.tools.replay import replay_main

EX_OK: Final = 0
EX_FAILED: Final = 1
EX_USAGE: Final = 2
EX_UNAVAILABLE: Final = 69  # sysexits.h
#: The installed daemon's configuration (the Debian package's conffile): without --socket or
#: --config, its admin.socket is used when the file exists, else the embedded default.
SYSTEM_CONFIG: Final = Path("/etc/spamguardd/spamguardd.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamguardctl",
        description="Ask spamguardd who is blocked and why; block, unblock, release, reset.",
        epilog="Exit status: 0 success, 1 refused or not found, 2 usage, 69 daemon unreachable.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help=f"the daemon's admin socket (default: admin.socket of --config, else of "
        f"{SYSTEM_CONFIG} if it exists, else {AdminConfig().socket})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"read the admin socket's path from the daemon's configuration file "
        f"(default: {SYSTEM_CONFIG} if it exists)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON reply (for scripts)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="blocked users: since, reason, by whom, verdict")
    show = commands.add_parser(
        "show", help="one user: blocked or not, windows, recent failures, history"
    )
    show.add_argument("user", metavar="USER")
    block = commands.add_parser("block", help="block a user now")
    block.add_argument("user", metavar="USER")
    block.add_argument("--reason", metavar="TEXT", help="why (shown by list and show)")
    lasting = block.add_mutually_exclusive_group()
    lasting.add_argument(
        "--for",
        dest="duration",
        type=_checked(parse_duration),
        metavar="TIME",
        help="lift the block after this long (an Exim time: 2h, 7d); default: never",
    )
    lasting.add_argument(
        "--until",
        type=_checked(parse_time),
        metavar="UTC",
        help="lift the block at this time (2026-12-03T10:00:00Z); default: never",
    )
    unblock = commands.add_parser("unblock", help="lift a block; optionally release its mail")
    unblock.add_argument("user", metavar="USER")
    what = unblock.add_mutually_exclusive_group()
    what.add_argument(
        "--release", action="store_true", help="thaw the user's frozen messages (exim -Mt)"
    )
    what.add_argument(
        "--remove", action="store_true", help="delete the user's frozen messages (exim -Mrm)"
    )
    unblock.add_argument(
        "--exim-command",
        default="exim",
        metavar="CMD",
        help="Exim command line for --release/--remove, split like a shell would but never run "
        "by one (default: exim; e.g. 'exim -C /etc/exim4/other.conf')",
    )
    reset = commands.add_parser("reset", help="forget a user's counters")
    reset.add_argument("user", metavar="USER")
    commands.add_parser("stats", help="uptime, queries, blocks, users, errors, latency")
    commands.add_parser("metrics", help="the daemon's metrics, in the Prometheus text format")
    commands.add_parser(
        "replay",
        help="replay Exim's logs through the policy to choose limits (no daemon needed; "
        "see spamguardctl replay --help)",
        add_help=False,
    )
    commands.add_parser("reload", help="re-read the daemon's configuration file")
    return parser


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks a value with *parse* and passes its text on."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spamguardctl``; returns the exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        if arguments[:1] == ["replay"]:
            # works on log files, needs no daemon, and has its own options
            return replay_main(arguments[1:])
        return _admin_main(arguments)
    except BrokenPipeError:
        # `spamguardctl list | head`: the reader has all it wanted; no traceback, and none at
        # exit either, when Python flushes the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_FAILED


def _admin_main(argv: Sequence[str]) -> int:
    """The commands that talk to the daemon's admin socket."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    try:
        queue = _exim_queue(args)
        path = _socket_path(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        return _fail(f"--exim-command: {exc}", EX_USAGE)
    except ConfigError as exc:
        # the file that names the admin socket is broken: what a reload would refuse too
        return _fail(str(exc), EX_FAILED)
    command = Command(
        args.command,
        _user_key(args),
        getattr(args, "reason", None),
        getattr(args, "until", None),
        getattr(args, "duration", None),
    )
    try:
        reply = request(path, command, timeout=args.timeout)
    except (NotPermittedError, UnreachableError) as exc:
        refused = isinstance(exc, NotPermittedError)  # refused: not a daemon to wait for
        return _fail(str(exc), EX_FAILED if refused else EX_UNAVAILABLE)
    status = EX_FAILED if isinstance(reply, ErrorReply) else EX_OK
    if queue is not None:
        reply, status = _with_queue(reply, status, queue, path, args)
    if args.json:
        json.dump(reply_to_json(reply), sys.stdout, ensure_ascii=True, sort_keys=True, indent=2)
        sys.stdout.write("\n")
    elif not isinstance(reply, ErrorReply):
        render(reply, sys.stdout)
    if isinstance(reply, ErrorReply):
        return _fail(reply.error, EX_FAILED)
    return status


def _with_queue(
    reply: Reply, status: int, queue: EximQueue, path: Path, args: argparse.Namespace
) -> tuple[Reply, int]:
    """``unblock --release``/``--remove``: the reply and status once the queue is handled."""
    if isinstance(reply, ErrorReply) and _lifted_already(path, args):
        # lifted on another relay of the fleet (or by an earlier run that stopped before the
        # queue): this host's frozen mail is released all the same, which finishes the job here
        reply, status = UnblockReply(user=args.user), EX_OK
    if not isinstance(reply, UnblockReply):
        return reply, status
    report = _handle_queue(queue, args.user, remove=args.remove)
    if report.error is not None or not all(message.ok for message in report.messages):
        status = EX_FAILED
    return attrs.evolve(reply, exim=report), status


def _lifted_already(path: Path, args: argparse.Namespace) -> bool:
    """Whether the user of a refused ``unblock`` is simply not blocked (any more)."""
    try:
        shown = request(path, Command("show", args.user), timeout=args.timeout)
    except UnreachableError:
        return False
    return isinstance(shown, ShowReply) and not shown.blocked


def _exim_queue(args: argparse.Namespace) -> EximQueue | None:
    """Exim's queue, when ``unblock --release``/``--remove`` will need it.

    Raises:
        ValueError: ``--exim-command`` cannot be split into an argv list.
    """
    if args.command == "unblock" and (args.release or args.remove):
        return EximQueue(args.exim_command)
    return None


def _user_key(args: argparse.Namespace) -> str | None:
    """The USER argument as the ACL writes keys (``auth:`` folded, IPv6 as its /64), saying so
    on standard error when that changed what was typed."""
    typed: str | None = getattr(args, "user", None)
    if typed is None:
        return None
    key = normalise(typed)
    if key.changed:
        print(f"spamguardctl: {typed} is written {key.key} by the ACL; using that", file=sys.stderr)
    args.user = key.key
    return key.key


def _socket_path(args: argparse.Namespace) -> Path:
    """--socket, else admin.socket of --config, else of the installed configuration."""
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        return load_config(args.config).admin.socket
    if SYSTEM_CONFIG.exists():
        return load_config(SYSTEM_CONFIG).admin.socket
    return AdminConfig().socket


def _handle_queue(queue: EximQueue, user: str, *, remove: bool) -> EximReport:
    """Thaw or remove *user*'s frozen messages; say what Exim did with each."""
    action = "remove" if remove else "release"
    try:
        ids = queue.frozen_messages_of(user)
    except EximError as exc:
        print(f"spamguardctl: {exc}", file=sys.stderr)
        return EximReport(action=action, error=str(exc))
    messages = []
    for message_id in ids:
        outcome = queue.remove(message_id) if remove else queue.thaw(message_id)
        messages.append(MessageOutcome(id=outcome.id, ok=outcome.ok, exim_said=outcome.message))
        if not outcome.ok:
            print(f"spamguardctl: {action} {message_id}: {outcome.message}", file=sys.stderr)
    return EximReport(action=action, messages=tuple(messages))


def _fail(message: str, status: int) -> int:
    print(f"spamguardctl: {message}".replace("\n", "\nspamguardctl: "), file=sys.stderr)
    return status
