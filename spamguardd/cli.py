"""Command-line entry points. The only place that reads argv, sets up logging and runs trio."""

from __future__ import annotations

import argparse
import grp
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio

from spamguardd import __version__
from spamguardd.core.config import Config, load_config, parse_inet_listen
from spamguardd.core.errors import ConfigError, StateLockedError, StoreError
from spamguardd.daemon.app import WRITTEN_ENTRIES, Daemon
from spamguardd.daemon.fdlimit import raise_soft_limit
from spamguardd.daemon.log import configure_logging
from spamguardd.daemon.systemd import SdNotify, listen_fds, watchdog_interval
from spamguardd.state import eximaccess
from spamguardd.state.blockfile import BlockStore
from spamguardd.state.statelock import symbolic_links

EX_OK: Final = 0
EX_FAILURE: Final = 1
EX_USAGE: Final = 2
#: sysexits.h EX_TEMPFAIL: another daemon holds the state directory; it may be free later.
EX_STATE_LOCKED: Final = 75
EX_CONFIG: Final = 78  # sysexits.h: configuration error; systemd does not restart on it


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spamguardd",
        description="Exim policy daemon: freezes the mail of users whose recipients keep "
        "failing verification.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (default: embedded defaults, no file needed)",
    )
    parser.add_argument(
        "--query-socket",
        type=Path,
        metavar="PATH",
        help="Unix socket Exim queries (overrides server.query_socket)",
    )
    parser.add_argument(
        "--query-listen",
        type=_inet_listen,
        metavar="inet:HOST:PORT",
        help="also listen on this loopback TCP address, e.g. inet:127.0.0.1:9925 "
        "(overrides server.query_listen)",
    )
    parser.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="Unix socket spamguardctl talks to (overrides admin.socket)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="directory of the block list and the counter snapshot (overrides state.dir)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, the state directory and the block file, then exit: "
        "0 when valid, 78 with every problem listed otherwise; changes nothing",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _inet_listen(text: str) -> tuple[str, int] | None:
    try:
        return parse_inet_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_config(args: argparse.Namespace) -> Config:
    """The configuration from ``--config`` (or the defaults) with command-line overrides.

    Raises:
        ConfigError: the file is unreadable or invalid.
    """
    config = load_config(args.config) if args.config else Config()
    if args.query_socket is not None:
        config = attrs.evolve(
            config, server=attrs.evolve(config.server, query_socket=args.query_socket)
        )
    if args.query_listen is not None:
        config = attrs.evolve(
            config, server=attrs.evolve(config.server, query_listen=args.query_listen)
        )
    if args.state_dir is not None:
        config = attrs.evolve(config, state=attrs.evolve(config.state, dir=args.state_dir))
    if args.admin_socket is not None:
        config = attrs.evolve(config, admin=attrs.evolve(config.admin, socket=args.admin_socket))
    return config


def check_config(config: Config) -> int:
    """``--check-config``: the configuration, the block file and its permissions.

    Reads only: nothing is created, repaired or rewritten, so it can run as root beside a
    running daemon. Returns EX_OK, or EX_CONFIG with every problem printed.
    """
    problems: list[str] = []
    gid = None
    if config.state.group is not None:
        try:
            gid = grp.getgrnam(config.state.group).gr_gid
        except KeyError:
            problems.append(f"{config.source}: state.group: no such group {config.state.group!r}")
    problems += _missing_groups(config)
    store = BlockStore(config.state.dir, group=gid)
    try:
        blocked = len(store.load())
    except StoreError as exc:
        problems.append(str(exc))
        blocked = 0
    problems += symbolic_links(config.state.dir, WRITTEN_ENTRIES)
    problems += _unwritable(config.state.dir, store.path)
    if gid is not None:
        problems += [
            problem.describe(str(config.state.group))
            for problem in eximaccess.check(store.path, gid, uid=os.geteuid())
        ]
    problems += _password_file_problems(config)
    if problems:
        for problem in problems:
            print(f"spamguardd: {problem}", file=sys.stderr)
        return EX_CONFIG
    print(f"{config.source}: configuration is valid; {store.path}: {blocked} blocked users")
    return EX_OK


def _password_file_problems(config: Config) -> list[str]:
    """Fleet mode's password file: what stops a start (returned) and what is only unwise
    (printed as a warning)."""
    if not config.cluster.enabled or config.cluster.password_file is None:
        return []
    # fleet mode's client library is loaded only when fleet mode is configured
    from spamguardd.daemon.cluster import read_password  # noqa: PLC0415

    try:
        _, warnings = read_password(config.cluster.password_file, source=config.source)
    except ConfigError as exc:
        return exc.problems
    warnings += _root_only(config.cluster.password_file, source=config.source)
    for warning in warnings:
        print(f"spamguardd: warning: {warning}", file=sys.stderr)
    return []


def _root_only(path: Path, *, source: str) -> list[str]:
    """A warning when root, running the check, reads a file only root can read: the daemon
    itself normally runs as another user (the packaged unit's ``spamguardd``), and would not."""
    if os.geteuid() != 0:
        return []  # the check reads as the daemon would when run as the daemon's user
    try:
        info = path.stat()
    except OSError:
        return []
    if info.st_uid != 0 or info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return []
    warning = (
        f"{source}: cluster.password_file: {path}: only root can read it (mode "
        f"{stat.S_IMODE(info.st_mode):04o}); a daemon running as another user (the package's "
        f"runs as spamguardd) cannot: chgrp spamguardd {path}; chmod 0640 {path}. Run this "
        "check as the daemon's user to be sure: runuser -u spamguardd -- spamguardd --config "
        f"{source} --check-config"
    )
    return [warning]


def _missing_groups(config: Config) -> list[str]:
    """The socket groups the start would look up and not find."""
    problems = []
    for key, group in (
        ("server.socket_group", config.server.socket_group),
        ("admin.socket_group", config.admin.socket_group),
    ):
        if group is None:
            continue
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f"{config.source}: {key}: no such group {group!r}")
    return problems


def _unwritable(state_dir: Path, block_file: Path) -> list[str]:
    """Why the daemon could not write its state directory, without writing anything.

    A directory that does not exist yet is judged by the nearest one above it (the start
    creates it). Checked as the user running the check: run it as the daemon's user.
    """
    directory = state_dir
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        return [f"{directory}: not a directory (state.dir is {state_dir})"]
    if not os.access(directory, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(directory) else "permission denied"
        return [f"{state_dir}: the state directory cannot be written ({reason})"]
    if block_file.exists() and not os.access(block_file, os.W_OK):
        reason = "read-only file system" if _read_only(directory) else "permission denied"
        return [f"{block_file}: cannot be written ({reason})"]
    return []


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spamguardd``; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        config = build_config(args)
        if args.check_config:
            return check_config(config)
        configure_logging(config.log)
        daemon = Daemon(
            config,
            inherited=listen_fds(os.environ),
            sd_notify=SdNotify.from_environ(os.environ),
            load_config=lambda: build_config(args),
            watchdog_interval=watchdog_interval(os.environ),
        )
    except StateLockedError as exc:
        print(f"spamguardd: {exc}", file=sys.stderr)
        return EX_STATE_LOCKED
    except (ConfigError, StoreError) as exc:
        print(f"spamguardd: {exc}".replace("\n", "\nspamguardd: "), file=sys.stderr)
        return EX_CONFIG
    log = structlog.get_logger("spamguardd")
    daemon.fd_limits = raise_soft_limit()  # systemd starts services at a soft limit of 1,024
    try:
        trio.run(daemon.run)
    except LookupError as exc:
        log.error("start_failed", error=str(exc))
        return EX_CONFIG
    except OSError as exc:
        log.error("start_failed", error=str(exc))
        return EX_FAILURE
    return EX_OK
