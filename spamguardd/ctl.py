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
import contextlib
import json
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from spamguardd import __version__
from spamguardd.core import adminproto
from spamguardd.core.adminproto import AdminReplyError, Command
from spamguardd.core.config import AdminConfig, load_config
from spamguardd.core.errors import ConfigError
from spamguardd.core.userkey import normalise
from spamguardd.tools.exim_queue import EximError, EximQueue
from spamguardd.tools.replay import replay_main

EX_OK: Final = 0
EX_FAILED: Final = 1
EX_USAGE: Final = 2
EX_UNAVAILABLE: Final = 69  # sysexits.h
DEFAULT_TIMEOUT: Final = 30.0
#: The installed daemon's configuration (the Debian package's conffile): without --socket or
#: --config, its admin.socket is used when the file exists, else the embedded default.
SYSTEM_CONFIG: Final = Path("/etc/spamguardd/spamguardd.toml")


class UnreachableError(Exception):
    """The daemon did not answer; the message names the socket and why."""


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spamguardctl``; returns the exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["replay"]:
        # works on log files, needs no daemon, and has its own options
        return replay_main(arguments[1:])
    return _admin_main(arguments)


def _admin_main(argv: Sequence[str]) -> int:
    """The commands that talk to the daemon's admin socket."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    queue = None
    if args.command == "unblock" and (args.release or args.remove):
        try:
            queue = EximQueue(args.exim_command)
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            return _fail(f"--exim-command: {exc}", EX_USAGE)
    try:
        path = _socket_path(args)
    except ConfigError as exc:
        return _fail(str(exc), EX_USAGE)
    command = Command(args.command, _user_key(args), getattr(args, "reason", None))
    try:
        reply = request(path, command, timeout=args.timeout)
    except UnreachableError as exc:
        return _fail(str(exc), EX_UNAVAILABLE)
    status = EX_OK if reply["ok"] else EX_FAILED
    if reply["ok"] and queue is not None:
        status = _handle_queue(queue, args.user, reply, remove=args.remove)
    if args.json:
        json.dump(reply, sys.stdout, ensure_ascii=True, sort_keys=True, indent=2)
        sys.stdout.write("\n")
    elif reply["ok"]:
        RENDERERS[args.command](reply, sys.stdout)
    if not reply["ok"]:
        return _fail(reply["error"], EX_FAILED)
    return status


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


def request(path: Path, command: Command, *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send one command to the admin socket at *path* and return the reply.

    Raises:
        UnreachableError: no daemon listens there, it did not answer in time, or not in the
            admin protocol.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise UnreachableError(
                f"cannot reach spamguardd at {path}: {exc.strerror or exc}"
            ) from None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # a refusal may come before the request is read: the reply still says why
                sock.sendall(adminproto.encode_command(command))
                sock.shutdown(socket.SHUT_WR)
            data = _read_line(sock)
        except TimeoutError:
            raise UnreachableError(
                f"spamguardd at {path} did not answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise UnreachableError(
                f"lost the connection to spamguardd at {path}: {exc.strerror or exc}"
            ) from None
    if not data:
        raise UnreachableError(f"spamguardd at {path} closed the connection without an answer")
    try:
        return adminproto.decode_reply(data)
    except AdminReplyError as exc:
        raise UnreachableError(f"{path} did not answer in the admin protocol: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < adminproto.MAX_LINE:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks).split(b"\n", 1)[0]


def _handle_queue(queue: EximQueue, user: str, reply: dict[str, Any], *, remove: bool) -> int:
    """Thaw or remove *user*'s frozen messages; record the outcome in *reply*."""
    action = "remove" if remove else "release"
    report: dict[str, Any] = {"action": action, "messages": []}
    reply["exim"] = report
    try:
        ids = queue.frozen_messages_of(user)
    except EximError as exc:
        report["error"] = str(exc)
        print(f"spamguardctl: {exc}", file=sys.stderr)
        return EX_FAILED
    status = EX_OK
    for message_id in ids:
        outcome = queue.remove(message_id) if remove else queue.thaw(message_id)
        report["messages"].append(
            {"id": outcome.id, "ok": outcome.ok, "exim_said": outcome.message}
        )
        if not outcome.ok:
            status = EX_FAILED
            print(f"spamguardctl: {action} {message_id}: {outcome.message}", file=sys.stderr)
    return status


def _fail(message: str, status: int) -> int:
    print(f"spamguardctl: {message}".replace("\n", "\nspamguardctl: "), file=sys.stderr)
    return status


# -- human-readable output -----------------------------------------------------------------


def _table(rows: Iterable[Sequence[object]], out: TextIO) -> None:
    cells = [["-" if value is None else str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


def _render_list(reply: Mapping[str, Any], out: TextIO) -> None:
    blocked = reply["blocked"]
    if not blocked:
        out.write("no blocked users\n")
        return
    rows: list[Sequence[object]] = [("USER", "SINCE", "BY", "VERDICT", "REASON")]
    rows += [(b["user"], b["since"], b["by"], b["verdict"], b["reason"]) for b in blocked]
    _table(rows, out)


def _render_show(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"user:     {reply['user']}\n")
    block = reply["block"]
    if block is None:
        out.write("status:   not blocked\n")
    else:
        out.write(
            f"status:   blocked since {block['since']} by {block['by']} "
            f"(verdict {block['verdict']}): {block['reason']}\n"
        )
    if reply["exempt"]:
        out.write("exempt:   yes (listed in exempt.users; never counted)\n")
    if reply["mode"] != "enforce":
        out.write(f"mode:     {reply['mode']} (nobody is blocked by counting)\n")
    out.write("\n")
    rows: list[Sequence[object]] = [("WINDOW LIMIT", "COUNTED", "TOKENS LEFT", "CLEARS AT")]
    rows += [
        (w["limit"], w["counted"], f"{w['tokens_left']:.2f}", w["clears_at"] or "full now")
        for w in reply["windows"]
    ]
    _table(rows, out)
    failures = reply["recent_failures"]
    out.write("\nrecent failed recipients (newest first):\n")
    if failures:
        _table(
            [("  AT", "RECIPIENT", "CLIENT IP")]
            + [(f"  {f['at']}", f["rcpt"], f["ip"]) for f in failures],
            out,
        )
    else:
        out.write("  none in the sample\n")
    out.write("\nhistory:\n")
    history = reply["history"]
    if history:
        _table(
            [("  AT", "EVENT", "ACTOR", "REASON")]
            + [
                (f"  {e.get('at')}", e.get("event"), e.get("actor"), e.get("reason", ""))
                for e in history
            ],
            out,
        )
    else:
        out.write("  no journal entries\n")
    journal = reply["journal"]
    if journal["truncated_line"] is not None:
        out.write(
            f"note: the journal's last line ({journal['truncated_line']}) is truncated "
            "(a write cut short); it was skipped\n"
        )
    if journal["damaged_lines"]:
        lines = ", ".join(map(str, journal["damaged_lines"]))
        out.write(f"note: damaged journal lines skipped: {lines}\n")


def _render_block(reply: Mapping[str, Any], out: TextIO) -> None:
    block = reply["block"]
    if reply["changed"]:
        out.write(f"blocked {reply['user']} (verdict {block['verdict']}): {block['reason']}\n")
    else:
        out.write(
            f"{reply['user']} was already blocked since {block['since']} by {block['by']}: "
            f"{block['reason']}\n"
        )


def _render_unblock(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"unblocked {reply['user']}\n")
    exim = reply.get("exim")
    if exim is None:
        return
    done = "released" if exim["action"] == "release" else "removed"
    messages = exim["messages"]
    if not messages and "error" not in exim:
        out.write("no frozen messages of this user in the queue\n")
    for message in messages:
        if message["ok"]:
            out.write(f"{done} {message['id']}: {message['exim_said']}\n")


def _render_reset(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"forgot the counters of {reply['user']}\n")


def _render_stats(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"version:        {reply['version']}\n")
    out.write(f"started at:     {reply['started_at']} (up {reply['uptime_seconds']} s)\n")
    out.write(f"mode:           {reply['mode']}\n")
    out.write(f"tracked users:  {reply['tracked_users']}\n")
    out.write(f"blocked users:  {reply['blocked_users']}\n")
    blocks = reply["blocks"]
    out.write(
        f"blocks made:    {blocks['auto']} automatic, {blocks['admin']} by admins; "
        f"{reply['unblocks']} unblocks\n"
    )
    errors = ", ".join(f"{count} {kind}" for kind, count in reply["errors"].items())
    out.write(f"errors:         {errors}\n")
    latency = reply["latency_ms"]
    if latency:
        parts = ", ".join(
            f"{key.replace('_', '.')} <= {'>10000' if value is None else value} ms"
            for key, value in latency.items()
        )
        out.write(f"latency:        {parts}\n")
    out.write(f"\nqueries ({reply['queries_total']}):\n")
    rows: list[Sequence[object]] = [("  VERB", "VERDICT", "COUNT")]
    rows += [
        (f"  {verb}", verdict, count)
        for verb, verdicts in reply["queries"].items()
        for verdict, count in verdicts.items()
    ]
    _table(rows, out)


def _render_reload(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(f"reloaded the configuration from {reply['config']}\n")
    if reply["carried_users"]:
        out.write(f"counters of {reply['carried_users']} users carried over to the new limits\n")
    out.writelines(
        f"note: {name} changed; takes effect at the next start\n" for name in reply["needs_restart"]
    )


def _render_metrics(reply: Mapping[str, Any], out: TextIO) -> None:
    out.write(reply["text"])


RENDERERS: Final = {
    "list": _render_list,
    "show": _render_show,
    "block": _render_block,
    "unblock": _render_unblock,
    "reset": _render_reset,
    "stats": _render_stats,
    "metrics": _render_metrics,
    "reload": _render_reload,
}


if __name__ == "__main__":
    raise SystemExit(main())
