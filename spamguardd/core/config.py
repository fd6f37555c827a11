"""The configuration: a frozen attrs tree built from a TOML file or from the embedded defaults.

Every key has a default, so no file is needed to run. A file may set any subset. Loading reports
*every* problem at once, each naming the file, the dotted key, what was expected and what was found
(``spamguardd.toml: limits.failed_recipients[1]: expected a rate such as 100/1h (got '1x')``).
There is no global configuration: each part of the daemon gets the section it needs.
"""

from __future__ import annotations

import enum
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from spamguardd.core.errors import ConfigError
from spamguardd.core.protocol import Verdict
from spamguardd.core.rate import Rate, parse_duration

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.StrEnum):
    """Whether blocks are made (``enforce``) or only logged as "would block" (``monitor``)."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


BLOCK_VERDICTS = (Verdict.FREEZE, Verdict.REJECT, Verdict.DEFER)
DEFAULT_LIMITS = (Rate(count=100, period=3600),)
_NO_RATES: tuple[Rate, ...] = ()


@attrs.frozen(kw_only=True)
class ServerConfig:
    """The query socket and how connections to it are handled."""

    query_socket: Path = Path("run/spamguardd.sock")
    #: Permission bits of the socket file. Debian's Exim runs as ``Debian-exim``: give that group
    #: ``socket_group`` and keep 0660 so only Exim and the daemon's own user can connect.
    socket_mode: int = 0o660
    socket_group: str | None = None
    #: listen(2) backlog. A refused connect poisons the Exim process that saw it (stale descriptor
    #: bug, Exim 4.96 and later), so the queue must absorb bursts; the kernel caps it at somaxconn.
    backlog: int = 1024
    #: Seconds a client may take to send its request line. Exim writes it in one write(), so any
    #: real client needs microseconds; the bound only frees slots held by stuck clients.
    read_timeout: float = 5.0
    #: Connections served at once; past this, new ones get ``defer`` at once instead of waiting.
    max_connections: int = 512
    #: An extra loopback TCP listener (host, port), from ``"inet:127.0.0.1:PORT"``: Exim's
    #: ``inet:`` readsocket survives a refused connect, its Unix-socket one does not.
    query_listen: tuple[str, int] | None = None


@attrs.frozen(kw_only=True)
class AdminConfig:
    """The admin socket of ``spamguardctl``, and who may use it.

    The socket can change the block list, so it is 0600 by default: only the daemon's user and
    root can connect. To let admins in, open the mode to a group (``socket_group``, 0660) *and*
    name them in ``allowed_users``/``allowed_groups``: every connection's peer credentials are
    checked against those lists (root is always allowed).
    """

    socket: Path = Path("run/admin.sock")
    socket_mode: int = 0o600
    socket_group: str | None = None
    #: User names or numeric uids allowed in, besides root.
    allowed_users: tuple[str | int, ...] = ()
    #: Group names or numeric gids whose members (primary or supplementary) are allowed in.
    allowed_groups: tuple[str | int, ...] = ()


@attrs.frozen(kw_only=True)
class StateConfig:
    """Where the block list lives and who may read it."""

    dir: Path = Path("var")
    #: Group given read access to the block file, so Exim's ACL can read it with lsearch while
    #: the daemon is down (``Debian-exim`` in the shipped units). None keeps the process's group.
    group: str | None = None
    #: Seconds between two snapshots of the counters (``buckets``): a crash forgets at most
    #: this much counting.
    snapshot_interval: float = 30.0


@attrs.frozen(kw_only=True)
class MetricsConfig:
    """The optional Prometheus endpoint."""

    #: ``(host, port)`` of an HTTP listener for ``GET /metrics``, loopback only; None for none
    #: (``spamguardctl metrics`` still works).
    listen: tuple[str, int] | None = None


@attrs.frozen(kw_only=True)
class Override:
    """Limits for one user key instead of the defaults (a newsletter account, say)."""

    user: str
    failed_recipients: tuple[Rate, ...]


@attrs.frozen(kw_only=True)
class PolicyConfig:
    """What is counted, the limits, and what a block does. This is all the policy sees."""

    mode: Mode = Mode.ENFORCE
    failed_recipients: tuple[Rate, ...] = DEFAULT_LIMITS
    count_defer: bool = False
    verdict: Verdict = Verdict.FREEZE
    overrides: Mapping[str, tuple[Rate, ...]] = attrs.field(factory=dict)
    exempt_users: frozenset[str] = frozenset()
    exempt_networks: tuple[Network, ...] = ()
    #: Users counted at once, bounding memory (~200 bytes each). At the cap, the user counted
    #: first is forgotten to make room for a new one (blocks are never dropped).
    max_tracked_users: int = 1_000_000

    def limits_for(self, user: str) -> tuple[Rate, ...]:
        """The windows that apply to *user*: its override, else the defaults."""
        return self.overrides.get(user, self.failed_recipients)


class LogFormat(enum.StrEnum):
    """How log lines are rendered."""

    AUTO = "auto"  # JSON when stdout is not a terminal, else coloured console lines
    JSON = "json"
    CONSOLE = "console"


@attrs.frozen(kw_only=True)
class LogConfig:
    """Log level and rendering."""

    level: str = "info"
    format: LogFormat = LogFormat.AUTO


DEFAULT_SENDMAIL = ("/usr/sbin/sendmail", "-t", "-oi")


@attrs.frozen(kw_only=True)
class NotifyConfig:
    """Abuse notices and the hook command run on blocks and unblocks.

    Notices are off while ``to`` is empty: a fresh install must not mail anyone by surprise.
    The hook runs whenever it is set, whatever ``to`` holds.
    """

    to: tuple[str, ...] = ()
    #: Sender address; None means ``spamguardd@`` the host name, chosen when a notice is built.
    sender: str | None = None
    subject: str = "[spamguardd]"
    #: argv of a sendmail-compatible program fed the message on stdin (never run by a shell).
    sendmail: tuple[str, ...] = DEFAULT_SENDMAIL
    #: ``(host, port)`` of an SMTP relay, or the path of a Unix socket that speaks SMTP (the
    #: package's ``spamguardd-submit.socket``); when set it replaces ``sendmail``.
    smtp: tuple[str, int] | Path | None = None
    #: Seconds one attempt to hand a notice to sendmail or the relay may take.
    send_timeout: float = 30.0
    hook: tuple[str, ...] = ()
    hook_timeout: float = 30.0
    notify_unblock: bool = True
    #: Notices waiting to go out; past it new ones are dropped (a verdict never waits for one).
    queue_size: int = 100
    #: Seconds a failing notice keeps being retried, with backoff, before it is given up.
    retry_for: float = 600.0
    #: Seconds queued notices get to go out at shutdown; the rest is logged as unsent.
    shutdown_grace: float = 5.0

    @property
    def mail_enabled(self) -> bool:
        """Whether notices are mailed at all."""
        return bool(self.to)


@attrs.frozen(kw_only=True)
class Config:
    """The whole configuration."""

    source: str = "<embedded defaults>"
    policy: PolicyConfig = PolicyConfig()
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    notify: NotifyConfig = NotifyConfig()
    admin: AdminConfig = AdminConfig()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str) -> Config:
        """Build a configuration from parsed TOML.

        Raises:
            ConfigError: with every problem found, each naming *source* and the dotted key.
        """
        reader = _Reader(source)
        config = reader.config(raw)
        if reader.problems:
            raise ConfigError(reader.problems)
        return config


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or holds invalid settings.
    """
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return Config.from_dict(raw, source=str(path))


# ---------------------------------------------------------------------------------------------


class _Reader:
    """Walks the raw TOML tree, collecting problems instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        # "[1]: bad" from a list converter reads best glued to the key: "limits.rates[1]: bad"
        separator = "" if message.startswith("[") else ": "
        self.problems.append(f"{self.source}: {key}{separator}{message}")

    def table(self, raw: Any, key: str, known: set[str]) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            self.problem(key, f"expected a table (got {_kind(raw)})")
            return {}
        for unknown in sorted(set(raw) - known):
            where = f"{key}.{unknown}" if key else unknown
            self.problem(where, f"unknown key (known: {', '.join(sorted(known))})")
        return raw

    def value(
        self,
        table: Mapping[str, Any],
        prefix: str,
        name: str,
        default: T,
        convert: Callable[[Any], T],
    ) -> T:
        if name not in table:
            return default
        key = f"{prefix}.{name}" if prefix else name
        try:
            return convert(table[name])
        except (TypeError, ValueError) as exc:
            self.problem(key, str(exc))
            return default

    def config(self, raw: Mapping[str, Any]) -> Config:
        top = self.table(
            raw,
            "",
            {
                "mode",
                "limits",
                "block",
                "override",
                "exempt",
                "server",
                "state",
                "log",
                "metrics",
                "notify",
                "admin",
            },
        )
        policy = self.policy(top)
        server_raw = self.table(
            top.get("server", {}), "server", set(attrs.fields_dict(ServerConfig))
        )
        d = ServerConfig()
        server = ServerConfig(
            query_socket=self.value(server_raw, "server", "query_socket", d.query_socket, _path),
            socket_mode=self.value(server_raw, "server", "socket_mode", d.socket_mode, _mode_bits),
            socket_group=self.value(server_raw, "server", "socket_group", d.socket_group, _name),
            backlog=self.value(server_raw, "server", "backlog", d.backlog, _int_range(1, 1 << 20)),
            read_timeout=self.value(server_raw, "server", "read_timeout", d.read_timeout, _seconds),
            max_connections=self.value(
                server_raw, "server", "max_connections", d.max_connections, _int_range(1, 1 << 20)
            ),
            query_listen=self.value(
                server_raw, "server", "query_listen", d.query_listen, parse_inet_listen
            ),
        )
        state_raw = self.table(top.get("state", {}), "state", set(attrs.fields_dict(StateConfig)))
        s = StateConfig()
        state = StateConfig(
            dir=self.value(state_raw, "state", "dir", s.dir, _path),
            group=self.value(state_raw, "state", "group", s.group, _name),
            snapshot_interval=self.value(
                state_raw, "state", "snapshot_interval", s.snapshot_interval, _seconds
            ),
        )
        metrics_raw = self.table(
            top.get("metrics", {}), "metrics", set(attrs.fields_dict(MetricsConfig))
        )
        metrics = MetricsConfig(
            listen=self.value(metrics_raw, "metrics", "listen", None, _loopback_address),
        )
        log_raw = self.table(top.get("log", {}), "log", set(attrs.fields_dict(LogConfig)))
        lg = LogConfig()
        log = LogConfig(
            level=self.value(log_raw, "log", "level", lg.level, _log_level),
            format=self.value(log_raw, "log", "format", lg.format, _enum(LogFormat)),
        )
        notify = self.notify(top.get("notify", {}))
        return Config(
            source=self.source,
            policy=policy,
            server=server,
            state=state,
            log=log,
            metrics=metrics,
            notify=notify,
            admin=self.admin(top),
        )

    def notify(self, raw: Any) -> NotifyConfig:
        known = {
            "to",
            "from",
            "subject",
            "sendmail",
            "smtp",
            "send_timeout",
            "hook",
            "hook_timeout",
            "notify_unblock",
            "queue_size",
            "retry_for",
            "shutdown_grace",
        }
        table = self.table(raw, "notify", known)
        d = NotifyConfig()
        if "sendmail" in table and "smtp" in table:
            self.problem("notify.smtp", "set either notify.sendmail or notify.smtp, not both")
        return NotifyConfig(
            to=self.value(table, "notify", "to", d.to, _addresses),
            sender=self.value(table, "notify", "from", d.sender, _address),
            subject=self.value(table, "notify", "subject", d.subject, _header_text),
            sendmail=self.value(table, "notify", "sendmail", d.sendmail, _argv),
            smtp=self.value(table, "notify", "smtp", d.smtp, _host_port),
            send_timeout=self.value(table, "notify", "send_timeout", d.send_timeout, _seconds),
            hook=self.value(table, "notify", "hook", d.hook, _argv_or_empty),
            hook_timeout=self.value(table, "notify", "hook_timeout", d.hook_timeout, _seconds),
            notify_unblock=self.value(table, "notify", "notify_unblock", d.notify_unblock, _bool),
            queue_size=self.value(
                table, "notify", "queue_size", d.queue_size, _int_range(1, 1_000_000)
            ),
            retry_for=self.value(table, "notify", "retry_for", d.retry_for, _seconds),
            shutdown_grace=self.value(
                table, "notify", "shutdown_grace", d.shutdown_grace, _seconds
            ),
        )

    def admin(self, top: Mapping[str, Any]) -> AdminConfig:
        raw = self.table(top.get("admin", {}), "admin", set(attrs.fields_dict(AdminConfig)))
        d = AdminConfig()
        return AdminConfig(
            socket=self.value(raw, "admin", "socket", d.socket, _path),
            socket_mode=self.value(raw, "admin", "socket_mode", d.socket_mode, _mode_bits),
            socket_group=self.value(raw, "admin", "socket_group", d.socket_group, _name),
            allowed_users=self.value(raw, "admin", "allowed_users", d.allowed_users, _principals),
            allowed_groups=self.value(
                raw, "admin", "allowed_groups", d.allowed_groups, _principals
            ),
        )

    def policy(self, top: Mapping[str, Any]) -> PolicyConfig:
        d = PolicyConfig()
        mode = self.value(top, "", "mode", d.mode, _enum(Mode))
        limits = self.table(
            top.get("limits", {}),
            "limits",
            {"failed_recipients", "count_defer", "max_tracked_users"},
        )
        rates = self.value(limits, "limits", "failed_recipients", d.failed_recipients, _rates)
        count_defer = self.value(limits, "limits", "count_defer", d.count_defer, _bool)
        max_tracked = self.value(
            limits, "limits", "max_tracked_users", d.max_tracked_users, _int_range(1, 1 << 30)
        )
        block = self.table(top.get("block", {}), "block", {"verdict"})
        verdict = self.value(block, "block", "verdict", d.verdict, _block_verdict)
        overrides: dict[str, tuple[Rate, ...]] = {}
        raw_overrides = top.get("override", [])
        if not isinstance(raw_overrides, list):
            self.problem(
                "override", f"expected an array of tables [[override]] (got {_kind(raw_overrides)})"
            )
            raw_overrides = []
        for index, raw in enumerate(raw_overrides):
            key = f"override[{index}]"
            entry = self.table(raw, key, {"user", "failed_recipients"})
            if not entry:
                continue
            for required in ("user", "failed_recipients"):
                if required not in entry:
                    self.problem(f"{key}.{required}", "missing required key")
            user = self.value(entry, key, "user", "", _user_key)
            entry_rates = self.value(entry, key, "failed_recipients", _NO_RATES, _rates)
            if user and entry_rates:
                if user in overrides:
                    self.problem(f"{key}.user", f"{user!r} already has an override")
                overrides[user] = entry_rates
        exempt = self.table(top.get("exempt", {}), "exempt", {"users", "networks"})
        users = self.value(exempt, "exempt", "users", d.exempt_users, _users)
        networks = self.value(exempt, "exempt", "networks", d.exempt_networks, _networks)
        return PolicyConfig(
            mode=mode,
            failed_recipients=rates,
            count_defer=count_defer,
            max_tracked_users=max_tracked,
            verdict=verdict,
            overrides=overrides,
            exempt_users=users,
            exempt_networks=networks,
        )


def _kind(value: Any) -> str:
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "an array",
    }
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string (got {_kind(value)})")
    return value


def _name(value: Any) -> str | None:
    text = _string(value).strip()
    return text or None


def parse_inet_listen(value: Any) -> tuple[str, int] | None:
    """``"inet:127.0.0.1:9925"`` or ``"inet:[::1]:9925"`` as (host, port); ``""`` is none.

    Only loopback addresses are accepted: the query socket changes counts and has no
    authentication, so it must not be reachable from other hosts.
    """
    text = _string(value).strip()
    if not text:
        return None
    expected = f"expected inet:127.0.0.1:PORT or inet:[::1]:PORT (got {text!r})"
    if not text.startswith("inet:"):
        raise ValueError(expected)
    host, colon, port_text = text.removeprefix("inet:").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ValueError(expected) from None
    if not colon or not 0 < port < 65536:
        raise ValueError(expected)
    if not address.is_loopback:
        raise ValueError(
            f"must be a loopback address: the query socket has no authentication (got {host!r})"
        )
    return str(address), port


def _path(value: Any) -> Path:
    text = _string(value)
    if not text:
        raise ValueError("expected a path (got an empty string)")
    return Path(text)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false (got {_kind(value)})")
    return value


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer (got {_kind(value)})")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")
        return value

    return convert


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        return float(parse_duration(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"expected seconds as a number or an Exim time like 5s (got {_kind(value)})"
        )
    if value <= 0:
        raise ValueError(f"must be > 0 (got {value})")
    return float(value)


def _loopback_address(value: Any) -> tuple[str, int]:
    text = _string(value)
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'expected HOST:PORT such as "127.0.0.1:9466" (got {text!r})')
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address as the host (got {host!r})") from None
    if not address.is_loopback:
        # the metrics say who is being counted; they are for the local scraper only
        raise ValueError(f"must be a loopback address such as 127.0.0.1 (got {host!r})")
    return str(address), int(port_text)


def _mode_bits(value: Any) -> int:
    if isinstance(value, str):
        try:
            bits = int(value, 8)
        except ValueError:
            raise ValueError(
                f'expected octal permission bits such as "0660" (got {value!r})'
            ) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        bits = value
    else:
        raise TypeError(f'expected octal permission bits such as "0660" (got {_kind(value)})')
    if not 0 <= bits <= 0o777:
        raise ValueError(f"must be between 0000 and 0777 (got {bits:o})")
    return bits


def _enum(kind: type[enum.StrEnum]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        text = _string(value)
        try:
            return kind(text)
        except ValueError:
            choices = " | ".join(member.value for member in kind)
            raise ValueError(f"expected {choices} (got {text!r})") from None

    return convert


def _block_verdict(value: Any) -> Verdict:
    text = _string(value)
    choices = " | ".join(v.value for v in BLOCK_VERDICTS)
    if text not in {v.value for v in BLOCK_VERDICTS}:
        raise ValueError(f"expected {choices} (got {text!r})")
    return Verdict(text)


def _log_level(value: Any) -> str:
    text = _string(value).lower()
    if text not in {"debug", "info", "warning", "error", "critical"}:
        raise ValueError(f"expected debug | info | warning | error | critical (got {text!r})")
    return text


def _rates(value: Any) -> tuple[Rate, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise TypeError(
            f'expected a rate such as "100/1h" or a non-empty array of them (got {_kind(value)})'
        )
    rates = []
    for index, item in enumerate(items):
        where = f"[{index}]: " if isinstance(value, list) else ""
        try:
            rates.append(Rate.parse(_string(item)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}{exc}") from exc
    periods = [rate.period for rate in rates]
    if len(set(periods)) != len(periods):
        raise ValueError(f"two rates with the same period (got {', '.join(map(str, rates))})")
    return tuple(rates)


def _principals(value: Any) -> tuple[str | int, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected an array of names or numeric ids (got {_kind(value)})")
    out: list[str | int] = []
    for index, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append(item)
        elif isinstance(item, str) and item.strip():
            out.append(item.strip())
        else:
            raise ValueError(f"[{index}]: expected a name or a numeric id >= 0 (got {item!r})")
    return tuple(out)


def _user_key(value: Any) -> str:
    text = _string(value)
    if not text:
        raise ValueError(
            'expected a user key such as "auth:alice@example.com" (got an empty string)'
        )
    return text


def _users(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        raise TypeError(f"expected an array of user keys (got {_kind(value)})")
    return frozenset(_user_key(item) for item in value)


def _networks(value: Any) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise TypeError(
            f'expected an array of networks such as "192.0.2.0/24" (got {_kind(value)})'
        )
    networks = []
    for index, item in enumerate(value):
        text = _string(item)
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(
                f"[{index}]: expected an IP network such as 192.0.2.0/24 (got {text!r})"
            ) from None
    return tuple(networks)


def _address(value: Any) -> str:
    text = _string(value)
    # one plain addr-spec: no display name, no list, nothing that could break a header line
    if (
        text.count("@") != 1
        or text.startswith("@")
        or text.endswith("@")
        or any(c.isspace() or c in '<>,;:"()[]\\' or not c.isprintable() for c in text)
    ):
        raise ValueError(f"expected a mail address such as abuse@example.com (got {text!r})")
    return text


def _addresses(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise TypeError(f"expected an array of mail addresses (got {_kind(value)})")
    addresses = []
    for index, item in enumerate(items):
        try:
            addresses.append(_address(item))
        except (TypeError, ValueError) as exc:
            where = f"[{index}]: " if isinstance(value, list) else ""
            raise ValueError(f"{where}{exc}") from exc
    return tuple(addresses)


def _header_text(value: Any) -> str:
    text = _string(value)
    if not text.isprintable():
        raise ValueError(f"expected one line of printable text (got {text!r})")
    return text


def _argv_or_empty(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise TypeError(
            'expected a command as an array of non-empty strings, such as ["/usr/local/sbin/x"]'
            f" (got {_kind(value)})"
        )
    if any("\x00" in item for item in value):
        raise ValueError("a command must not contain a NUL character")
    return tuple(value)


def _argv(value: Any) -> tuple[str, ...]:
    argv = _argv_or_empty(value)
    if not argv:
        raise ValueError("expected a command (got an empty array)")
    return argv


def _host_port(value: Any) -> tuple[str, int] | Path:
    text = _string(value)
    if text.startswith("/"):
        return Path(text)  # a Unix socket speaking SMTP
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:25
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f'expected "host:port" such as "127.0.0.1:25", or the absolute path of a Unix socket '
            f"(got {text!r})"
        )
    return host, int(port)
