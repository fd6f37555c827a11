"""The configuration: a frozen attrs tree built from a TOML file or from the embedded defaults.

Every key has a default, so no file is needed to run. A file may set any subset. Loading reports
*every* problem at once, each naming the file, the dotted key, what was expected and what was found
(``spamguardd.toml: limits.failed_recipients[1]: expected a rate such as 100/1h (got '1x')``).
There is no global configuration: each part of the daemon gets the section it needs.

Each setting is written once, as an attrs field made by :func:`setting`: its default, its dotted
TOML key, the parser from the TOML value and the validator of the parsed value. The reader walks
those fields, so the known keys, the reading and the checks cannot drift apart; the validators
also run when code builds or evolves a section (``attrs.evolve(config.server, backlog=0)`` fails),
so a configuration that did not come from a file is checked too.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from spamguardd.core.errors import ConfigError
from spamguardd.core.expiry import DEFAULT_REPEAT_WITHIN, Step, expires, parse_steps
from spamguardd.core.protocol import IPAddress, Verdict
from spamguardd.core.rate import MAX_DURATION, Rate, parse_duration
from spamguardd.core.storeurl import StoreAddress, parse_store_url

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: The key under which a field's :class:`Setting` is kept in its attrs metadata.
_SETTING: Final = "spamguardd.setting"


class Mode(enum.StrEnum):
    """Whether blocks are made (``enforce``) or only logged as "would block" (``monitor``)."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


class LogFormat(enum.StrEnum):
    """How log lines are rendered."""

    AUTO = "auto"  # JSON when stdout is not a terminal, else coloured console lines
    JSON = "json"
    CONSOLE = "console"


BLOCK_VERDICTS: Final = (Verdict.FREEZE, Verdict.REJECT, Verdict.DEFER)
DEFAULT_LIMITS: Final = (Rate(count=100, period=3600),)
DEFAULT_SENDMAIL: Final = ("/usr/sbin/sendmail", "-t", "-oi")
#: What ends the key under which the volume guard counts a user's accepted recipients, beside
#: its failures: no user key holds a NUL (the protocol refuses it), so none can collide.
ACCEPTED_SUFFIX: Final = "\x00accepted"
#: The limits of a volume-guard key while the guard is off: one that is idle a second after
#: its last count, so the idle sweep forgets it.
NO_VOLUME_GUARD: Final = (Rate(count=1, period=1),)
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: The shortest time a timeout or interval may be: below it a setting can only be a mistake.
MIN_SECONDS: Final = 0.001
#: The shortest snapshot interval (a tiny one would snapshot without pause).
MIN_SNAPSHOT_INTERVAL: Final = 0.1
#: A relay's name in the fleet: what logs, journals and the shared store show as "where".
_RELAY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: What the store's keys may start with: printable ASCII without blanks.
_KEY_PREFIX: Final = re.compile(r"[!-~]{0,64}")


class _Problems(Exception):  # noqa: N818 - a carrier of several problems, not an error of its own
    """Several problems inside one value (``[0].user: ...``), each as (key suffix, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


@attrs.frozen
class Setting:
    """Where a field lives in the TOML file and how its value is read."""

    #: Dotted TOML key (``server.read_timeout``, or ``mode`` at the top level).
    key: str
    #: TOML value -> the field's type; raises TypeError/ValueError naming what it expected.
    parse: Callable[[Any], Any]
    #: Another key that must not be set together with this one.
    excludes: str | None = None


def setting(  # noqa: PLR0913 - one keyword per property of a setting, all of them needed
    *,
    key: str,
    parse: Callable[[Any], Any],
    default: Any = None,
    factory: Callable[[], Any] | None = None,
    validator: Validator | None = None,
    excludes: str | None = None,
) -> Any:
    """An attrs field that the TOML reader fills from *key* through *parse*, then *validator*."""
    metadata = {_SETTING: Setting(key, parse, excludes)}
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata=metadata)
    return attrs.field(default=default, validator=validator, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Validators: the checks on parsed values, shared by the reader and by code that builds sections.


def _positive_seconds(_inst: object, _attr: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be > 0 and finite (got {value})")
    if value < MIN_SECONDS or value > MAX_DURATION:
        raise ValueError(
            f"must be between {MIN_SECONDS:g} s and 100 years ({MAX_DURATION} s) (got {value:g})"
        )


def _snapshot_seconds(inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    _positive_seconds(inst, attr, value)
    if value < MIN_SNAPSHOT_INTERVAL:
        raise ValueError(
            f"must be at least {MIN_SNAPSHOT_INTERVAL:g} s: each snapshot costs a write "
            f"(got {value:g})"
        )


def _between(low: int, high: int) -> Validator:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")

    return check


def _mode_bits_range(_inst: object, _attr: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 0o777:
        raise ValueError(f"must be between 0000 and 0777 (got {value:o})")


def _check_rates(rates: tuple[Rate, ...]) -> None:
    if not rates:
        raise ValueError('expected a rate such as "100/1h" or a non-empty array of them')
    periods = [rate.period for rate in rates]
    if len(set(periods)) != len(periods):
        raise ValueError(f"two rates with the same period (got {', '.join(map(str, rates))})")


def _fraction_below_one(_inst: object, _attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not 0 < value < 1:
        raise ValueError(f"must be a fraction between 0 and 1, both excluded (got {value})")


def _rates_distinct(_inst: object, _attr: attrs.Attribute[Any], value: tuple[Rate, ...]) -> None:
    _check_rates(value)


# ---------------------------------------------------------------------------------------------
# Parsers: TOML value -> typed value. Messages say what was expected and what was found.


def _kind(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return names.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string (got {_kind(value)})")
    return value


def _name(value: Any) -> str | None:
    text = _string(value).strip()
    return text or None


def _path(value: Any) -> Path:
    text = _string(value)
    if not text:
        raise ValueError("expected a path (got an empty string)")
    if "\x00" in text:
        raise ValueError("a path must not contain a NUL character")
    return Path(text)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false (got {_kind(value)})")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer (got {_kind(value)})")
    return value


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a fraction such as 0.5 (got {_kind(value)})")
    return float(value)


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        return float(parse_duration(value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"expected seconds as a number or an Exim time like 5s (got {_kind(value)})"
        )
    return float(value)


def _mode_bits(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError(
                f'expected octal permission bits such as "0660" (got {value!r})'
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f'expected octal permission bits such as "0660" (got {_kind(value)})')


def _enum(kind: type[enum.StrEnum], choices: tuple[str, ...] | None = None) -> Callable[[Any], Any]:
    allowed = choices or tuple(member.value for member in kind)

    def parse(value: Any) -> Any:
        text = _string(value)
        if text not in allowed:
            raise ValueError(f"expected {' | '.join(allowed)} (got {text!r})")
        return kind(text)

    return parse


def _log_level(value: Any) -> str:
    text = _string(value).lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"expected {' | '.join(LOG_LEVELS)} (got {text!r})")
    return text


def _items(value: Any, parse: Callable[[Any], T], *, what: str) -> tuple[T, ...]:
    """One value or an array of them; an item's problem is prefixed with its index."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise TypeError(f"expected {what} or an array of them (got {_kind(value)})")
    out = []
    for index, item in enumerate(items):
        try:
            out.append(parse(item))
        except (TypeError, ValueError) as exc:
            where = f"[{index}]: " if isinstance(value, list) else ""
            raise ValueError(f"{where}{exc}") from exc
    return tuple(out)


def _rates(value: Any) -> tuple[Rate, ...]:
    rates = _items(value, lambda item: Rate.parse(_string(item)), what='a rate such as "100/1h"')
    _check_rates(rates)
    return rates


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


def _network(value: Any) -> Network:
    text = _string(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected an IP network such as 192.0.2.0/24 (got {text!r})") from None


def _networks(value: Any) -> tuple[Network, ...]:
    if not isinstance(value, list):
        raise TypeError(
            f'expected an array of networks such as "192.0.2.0/24" (got {_kind(value)})'
        )
    return _items(value, _network, what="a network")


_OVERRIDE_KEYS: Final = ("accepted_recipients", "failed_recipients", "user")


def _override(entry: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One ``[[override]]`` table: its parsed ``user`` and ``failed_recipients``, and problems.

    ``failed_recipients`` may be left out when ``accepted_recipients`` is there.
    """
    problems = [
        (f"{where}.{key}", f"unknown key (known: {', '.join(_OVERRIDE_KEYS)})")
        for key in sorted(set(entry) - set(_OVERRIDE_KEYS))
    ]
    parsed: dict[str, Any] = {}
    volume_only = "accepted_recipients" in entry and "failed_recipients" not in entry
    for key, parse in (
        ("user", _user_key),
        ("failed_recipients", _rates),
        ("accepted_recipients", _rates),
    ):
        if key not in entry:
            if key == "user" or (key == "failed_recipients" and not volume_only):
                problems.append((f"{where}.{key}", "missing required key"))
            continue
        try:
            parsed[key] = parse(entry[key])
        except (TypeError, ValueError) as exc:
            problems.append(_glued(f"{where}.{key}", str(exc)))
    return parsed, problems


def _overrides(value: Any) -> dict[str, tuple[Rate, ...]]:
    """``[[override]]`` tables: each names a user and its own limits."""
    if not isinstance(value, list):
        raise TypeError(f"expected an array of tables [[override]] (got {_kind(value)})")
    overrides: dict[str, tuple[Rate, ...]] = {}
    problems: list[tuple[str, str]] = []
    users: set[str] = set()
    for index, entry in enumerate(value):
        where = f"[{index}]"
        if not isinstance(entry, Mapping):
            problems.append((where, f"expected a table (got {_kind(entry)})"))
            continue
        parsed, found = _override(entry, where)
        problems += found
        user = parsed.get("user")
        if user is None:
            continue
        if user in users:
            problems.append((f"{where}.user", f"{user!r} already has an override"))
        users.add(user)
        if "failed_recipients" in parsed:
            overrides[user] = parsed["failed_recipients"]
        if "accepted_recipients" in parsed:  # the volume guard's key of the user
            overrides[user + ACCEPTED_SUFFIX] = parsed["accepted_recipients"]
    if problems:
        raise _Problems(problems)
    return overrides


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
    return _items(value, _address, what="a mail address")


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


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-address]:port`` as (host, port), the port 1-65535.

    The one host:port grammar of the configuration; callers say what they expected.

    Raises:
        ValueError: no host, no port, or a port out of range.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


def _loopback(text: str, expected: str) -> tuple[str, int]:
    """*text* as (loopback IP, port); only the local machine may reach such a listener."""
    try:
        host, port = split_host_port(text)
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected {expected} (got {text!r})") from None
    if not address.is_loopback:
        raise ValueError(f"must be a loopback address such as 127.0.0.1 (got {host!r})")
    return str(address), port


def _smtp_relay(value: Any) -> tuple[str, int] | Path:
    text = _string(value)
    if text.startswith("/"):
        return Path(text)  # a Unix socket speaking SMTP (the package's spamguardd-submit.socket)
    try:
        return split_host_port(text)
    except ValueError:
        raise ValueError(
            f'expected "host:port" such as "127.0.0.1:25", or the absolute path of a Unix socket '
            f"(got {text!r})"
        ) from None


def _metrics_listen(value: Any) -> tuple[str, int]:
    # the metrics say who is being counted: they are for the local scraper only
    return _loopback(_string(value), 'HOST:PORT such as "127.0.0.1:9466"')


def parse_inet_listen(value: Any) -> tuple[str, int] | None:
    """``"inet:127.0.0.1:9925"`` or ``"inet:[::1]:9925"`` as (host, port); ``""`` is none.

    Only loopback addresses are accepted: the query socket changes counts and has no
    authentication, so it must not be reachable from other hosts.

    Raises:
        ValueError: not ``inet:HOST:PORT``, or not a loopback address.
    """
    text = _string(value).strip()
    if not text:
        return None
    expected = "inet:127.0.0.1:PORT or inet:[::1]:PORT"
    if not text.startswith("inet:"):
        raise ValueError(f"expected {expected} (got {text!r})")
    return _loopback(text.removeprefix("inet:"), expected)


def _store_url(value: Any) -> StoreAddress:
    return parse_store_url(_string(value))


def _relay_name(value: Any) -> str:
    text = _string(value)
    if not _RELAY_NAME.fullmatch(text):
        raise ValueError(
            f"expected a name of letters, digits, '.', '_' and '-', at most 64 (got {text!r})"
        )
    return text


def _key_prefix(value: Any) -> str:
    text = _string(value)
    if not _KEY_PREFIX.fullmatch(text):
        raise ValueError(
            f"expected at most 64 printable ASCII characters, no blanks (got {text!r})"
        )
    return text


def _budget(value: Any) -> float:
    """Seconds, as a number, an Exim time, or milliseconds such as ``"50ms"``."""
    if isinstance(value, str) and value.endswith("ms"):
        digits = value.removesuffix("ms")
        if not digits.isdigit():
            raise ValueError(f'expected milliseconds such as "50ms" (got {value!r})')
        return int(digits) / 1000
    return _seconds(value)


def _budget_range(_inst: object, _attr: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value) or not 0.001 <= value <= 5.0:
        raise ValueError(f"must be between 1ms and 5s (got {value:g}s)")


# ---------------------------------------------------------------------------------------------
# The tree


@attrs.frozen(kw_only=True)
class ServerConfig:
    """The query socket and how connections to it are handled."""

    query_socket: Path = setting(
        key="server.query_socket", parse=_path, default=Path("run/spamguardd.sock")
    )
    #: Permission bits of the socket file. Debian's Exim runs as ``Debian-exim``: give that group
    #: ``socket_group`` and keep 0660 so only Exim and the daemon's own user can connect.
    socket_mode: int = setting(
        key="server.socket_mode", parse=_mode_bits, default=0o660, validator=_mode_bits_range
    )
    socket_group: str | None = setting(key="server.socket_group", parse=_name)
    #: listen(2) backlog. A refused connect poisons the Exim process that saw it (stale descriptor
    #: bug, Exim 4.96 and later), so the queue must absorb bursts; the kernel caps it at somaxconn.
    backlog: int = setting(
        key="server.backlog", parse=_int, default=1024, validator=_between(1, 1 << 20)
    )
    #: Seconds a client may take to send its request line. Exim writes it in one write(), so any
    #: real client needs microseconds; the bound only frees slots held by stuck clients.
    read_timeout: float = setting(
        key="server.read_timeout", parse=_seconds, default=5.0, validator=_positive_seconds
    )
    #: Connections waiting at once for their request line (each costs a few hundred bytes and no
    #: task); past this, the one that has waited longest is shed with ``defer`` for the new one.
    max_connections: int = setting(
        key="server.max_connections", parse=_int, default=16384, validator=_between(1, 1 << 20)
    )
    #: An extra loopback TCP listener (host, port), from ``"inet:127.0.0.1:PORT"``: Exim's
    #: ``inet:`` readsocket survives a refused connect, its Unix-socket one does not.
    query_listen: tuple[str, int] | None = setting(
        key="server.query_listen", parse=parse_inet_listen
    )


@attrs.frozen(kw_only=True)
class AdminConfig:
    """The admin socket of ``spamguardctl``, and who may use it.

    The socket can change the block list, so it is 0600 by default: only the daemon's user and
    root can connect. To let admins in, open the mode to a group (``socket_group``, 0660) *and*
    name them in ``allowed_users``/``allowed_groups``: every connection's peer credentials are
    checked against those lists (root is always allowed).
    """

    socket: Path = setting(key="admin.socket", parse=_path, default=Path("run/admin.sock"))
    socket_mode: int = setting(
        key="admin.socket_mode", parse=_mode_bits, default=0o600, validator=_mode_bits_range
    )
    socket_group: str | None = setting(key="admin.socket_group", parse=_name)
    #: User names or numeric uids allowed in, besides root.
    allowed_users: tuple[str | int, ...] = setting(
        key="admin.allowed_users", parse=_principals, default=()
    )
    #: Group names or numeric gids whose members (primary or supplementary) are allowed in.
    allowed_groups: tuple[str | int, ...] = setting(
        key="admin.allowed_groups", parse=_principals, default=()
    )


@attrs.frozen(kw_only=True)
class StateConfig:
    """Where the block list lives and who may read it."""

    dir: Path = setting(key="state.dir", parse=_path, default=Path("var"))
    #: Group given read access to the block file, so Exim's ACL can read it with lsearch while
    #: the daemon is down (``Debian-exim`` in the shipped units). None keeps the process's group.
    group: str | None = setting(key="state.group", parse=_name)
    #: Seconds between two snapshots of the counters (``buckets``): a crash forgets at most
    #: this much counting.
    snapshot_interval: float = setting(
        key="state.snapshot_interval", parse=_seconds, default=30.0, validator=_snapshot_seconds
    )


@attrs.frozen(kw_only=True)
class MetricsConfig:
    """The optional Prometheus endpoint."""

    #: ``(host, port)`` of an HTTP listener for ``GET /metrics``, loopback only; None for none
    #: (``spamguardctl metrics`` still works).
    listen: tuple[str, int] | None = setting(key="metrics.listen", parse=_metrics_listen)


@attrs.frozen(kw_only=True)
class PolicyConfig:
    """What is counted, the limits, and what a block does. This is all the policy sees.

    Its settings live in several TOML tables (the top level, ``[limits]``, ``[block]``,
    ``[[override]]``, ``[exempt]``); the policy sees them as one value.
    """

    mode: Mode = setting(key="mode", parse=_enum(Mode), default=Mode.ENFORCE)
    failed_recipients: tuple[Rate, ...] = setting(
        key="limits.failed_recipients",
        parse=_rates,
        default=DEFAULT_LIMITS,
        validator=_rates_distinct,
    )
    count_defer: bool = setting(key="limits.count_defer", parse=_bool, default=False)
    #: The volume guard: limits on accepted recipients per user; None (the default) for none.
    accepted_recipients: tuple[Rate, ...] | None = setting(
        key="limits.accepted_recipients", parse=_rates
    )
    #: The fraction of a bucket used at which one warning goes out (per user and window); None
    #: for no warnings (docs/notices.md).
    warn_at: float | None = setting(
        key="limits.warn_at", parse=_fraction, validator=_fraction_below_one
    )
    #: Users counted at once, bounding memory (~200 bytes each). At the cap, the user counted
    #: first is forgotten to make room for a new one (blocks are never dropped).
    max_tracked_users: int = setting(
        key="limits.max_tracked_users",
        parse=_int,
        default=1_000_000,
        validator=_between(1, 1 << 30),
    )
    verdict: Verdict = setting(
        key="block.verdict",
        parse=_enum(Verdict, tuple(v.value for v in BLOCK_VERDICTS)),
        default=Verdict.FREEZE,
    )
    #: How long an automatic block lasts, a step for each repeat (core/expiry); None: forever.
    expire: tuple[Step, ...] = setting(key="block.expire", parse=parse_steps, default=(None,))
    #: The span in which earlier automatic blocks make the next one take the next step.
    repeat_within: float = setting(
        key="block.repeat_within",
        parse=_seconds,
        default=DEFAULT_REPEAT_WITHIN,
        validator=_positive_seconds,
    )
    overrides: Mapping[str, tuple[Rate, ...]] = setting(
        key="override", parse=_overrides, factory=dict
    )
    exempt_users: frozenset[str] = setting(key="exempt.users", parse=_users, default=frozenset())
    exempt_networks: tuple[Network, ...] = setting(
        key="exempt.networks", parse=_networks, default=()
    )

    def exempt_address(self, ip: IPAddress | None) -> bool:
        """Whether a client at *ip* is never counted (``exempt.networks``)."""
        return ip is not None and any(ip in net for net in self.exempt_networks)

    def limits_for(self, user: str) -> tuple[Rate, ...]:
        """The windows that apply to *user*: its override, else the defaults.

        For a volume-guard key (:data:`ACCEPTED_SUFFIX`), the limits on accepted recipients;
        while the guard is off, :data:`NO_VOLUME_GUARD`.
        """
        found = self.overrides.get(user)
        if found is not None:
            return found
        if user.endswith(ACCEPTED_SUFFIX):
            return self.accepted_recipients or NO_VOLUME_GUARD
        return self.failed_recipients

    @property
    def volume_guard(self) -> bool:
        """Whether accepted recipients are counted for anyone (default or override)."""
        return self.accepted_recipients is not None or any(
            user.endswith(ACCEPTED_SUFFIX) for user in self.overrides
        )


@attrs.frozen(kw_only=True)
class LogConfig:
    """Log level and rendering."""

    level: str = setting(key="log.level", parse=_log_level, default="info")
    format: LogFormat = setting(key="log.format", parse=_enum(LogFormat), default=LogFormat.AUTO)


@attrs.frozen(kw_only=True)
class NotifyConfig:
    """Abuse notices and the hook command run on blocks and unblocks.

    Notices are off while ``to`` is empty: a fresh install must not mail anyone by surprise.
    The hook runs whenever it is set, whatever ``to`` holds.
    """

    to: tuple[str, ...] = setting(key="notify.to", parse=_addresses, default=())
    #: Sender address; None means ``spamguardd@`` the host name, chosen when a notice is built.
    sender: str | None = setting(key="notify.from", parse=_address)
    subject: str = setting(key="notify.subject", parse=_header_text, default="[spamguardd]")
    #: argv of a sendmail-compatible program fed the message on stdin (never run by a shell).
    sendmail: tuple[str, ...] = setting(
        key="notify.sendmail", parse=_argv, default=DEFAULT_SENDMAIL
    )
    #: ``(host, port)`` of an SMTP relay, or the path of a Unix socket that speaks SMTP (the
    #: package's ``spamguardd-submit.socket``); when set it replaces ``sendmail``.
    smtp: tuple[str, int] | Path | None = setting(
        key="notify.smtp", parse=_smtp_relay, excludes="notify.sendmail"
    )
    #: Seconds one attempt to hand a notice to sendmail or the relay may take.
    send_timeout: float = setting(
        key="notify.send_timeout", parse=_seconds, default=30.0, validator=_positive_seconds
    )
    hook: tuple[str, ...] = setting(key="notify.hook", parse=_argv_or_empty, default=())
    hook_timeout: float = setting(
        key="notify.hook_timeout", parse=_seconds, default=30.0, validator=_positive_seconds
    )
    notify_unblock: bool = setting(key="notify.notify_unblock", parse=_bool, default=True)
    #: Notices waiting to go out; past it new ones are dropped (a verdict never waits for one).
    queue_size: int = setting(
        key="notify.queue_size", parse=_int, default=100, validator=_between(1, 1_000_000)
    )
    #: Seconds a failing notice keeps being retried, with backoff, before it is given up.
    retry_for: float = setting(
        key="notify.retry_for", parse=_seconds, default=600.0, validator=_positive_seconds
    )
    #: Seconds queued notices get to go out at shutdown; the rest is logged as unsent.
    shutdown_grace: float = setting(
        key="notify.shutdown_grace", parse=_seconds, default=5.0, validator=_positive_seconds
    )

    @property
    def mail_enabled(self) -> bool:
        """Whether notices are mailed at all."""
        return bool(self.to)


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """Fleet mode: relays that share counting and blocks through one Redis or Valkey store.

    Without ``url`` (the default) the daemon is a single host and nothing here is used.
    """

    #: The shared store; None runs the single-host daemon.
    url: StoreAddress | None = setting(key="cluster.url", parse=_store_url)
    #: File holding the store's password (its first line); the password is never in the TOML.
    password_file: Path | None = setting(key="cluster.password_file", parse=_path)
    #: What every key spamguardd writes starts with, so that several fleets can share a store.
    key_prefix: str = setting(key="cluster.key_prefix", parse=_key_prefix, default="spamguardd:")
    #: The most a query waits for the store; past it the daemon counts locally.
    timeout: float = setting(
        key="cluster.timeout", parse=_budget, default=0.05, validator=_budget_range
    )
    #: This relay's name in logs, journals and the store; None means the host name.
    name: str | None = setting(key="cluster.name", parse=_relay_name)
    #: CA certificates to check a ``rediss://`` server against; None means the system's.
    tls_ca_file: Path | None = setting(key="cluster.tls_ca_file", parse=_path)

    @property
    def enabled(self) -> bool:
        """Whether the daemon is one relay of a fleet."""
        return self.url is not None


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
    cluster: ClusterConfig = ClusterConfig()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str) -> Config:
        """Build a configuration from parsed TOML.

        Raises:
            ConfigError: with every problem found, each naming *source* and the dotted key.
        """
        reader = _Reader(raw, source)
        config = reader.build(cls)
        if config.cluster.enabled and config.policy.volume_guard:
            reader.problem(
                "limits.accepted_recipients",
                "not available in fleet mode (cluster.url is set): each relay would count "
                "alone and its blocks would not reach the store",
            )
        if config.cluster.enabled and config.policy.warn_at is not None:
            reader.problem(
                "limits.warn_at",
                "not available in fleet mode (cluster.url is set): the store does the counting",
            )
        if config.cluster.enabled and expires(config.policy.expire):
            reader.problem(
                "block.expire",
                "blocks cannot expire in fleet mode ([cluster] url is set): "
                'use "forever", or lift blocks with spamguardctl unblock',
            )
        if reader.problems:
            raise ConfigError(reader.problems)
        return attrs.evolve(config, source=source)


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 TOML, or holds invalid settings.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: not valid UTF-8 (line {line}, byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{path}: not valid TOML: arrays or tables nested too deeply"]) from exc
    return Config.from_dict(raw, source=str(path))


def settings(cls: type[Any]) -> Iterator[tuple[attrs.Attribute[Any], Setting]]:
    """Every field of *cls* read from TOML, with its :class:`Setting`, in declaration order."""
    for field in attrs.fields(cls):
        found = field.metadata.get(_SETTING)
        if found is not None:
            yield field, found


def toml_keys(cls: type[Any] = Config) -> list[str]:
    """Every dotted TOML key of the configuration tree under *cls*, in declaration order."""
    keys = []
    for field in attrs.fields(cls):
        if _SETTING in field.metadata:
            keys.append(field.metadata[_SETTING].key)
        elif attrs.has(type(field.default)):
            keys += toml_keys(type(field.default))
    return keys


# ---------------------------------------------------------------------------------------------


def _glued(key: str, message: str) -> tuple[str, str]:
    """(key, message), with ``[1]: bad`` from a list parser glued to the key as ``key[1]``."""
    if message.startswith("["):
        index, _, rest = message.partition(": ")
        return key + index, rest
    return key, message


class _Reader:
    """Walks the configuration tree, reading each setting from the raw TOML.

    Problems are collected instead of stopping at the first, in the order of the tree; a table
    is checked (is it a table, which keys are unknown) the first time one of its keys is read.
    """

    def __init__(self, raw: Mapping[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source
        self.problems: list[str] = []
        keys = toml_keys()
        self._known: dict[str, set[str]] = {"": set()}
        for key in keys:
            table, _, name = key.rpartition(".")
            self._known.setdefault(table, set()).add(name)
            if table:
                self._known[""].add(table)
        self._tables: dict[str, Mapping[str, Any]] = {}

    def problem(self, key: str, message: str) -> None:
        key, message = _glued(key, message)
        self.problems.append(f"{self.source}: {key}: {message}")

    def table(self, name: str) -> Mapping[str, Any]:
        """The raw table *name* (``""`` for the top level), checked once."""
        if name in self._tables:
            return self._tables[name]
        raw = self.raw if not name else self.table("").get(name, {})
        if not isinstance(raw, Mapping):
            self.problem(name, f"expected a table (got {_kind(raw)})")
            raw = {}
        known = self._known[name]
        for unknown in sorted(set(raw) - known):
            where = f"{name}.{unknown}" if name else unknown
            self.problem(where, f"unknown key (known: {', '.join(sorted(known))})")
        self._tables[name] = raw
        return raw

    def build(self, cls: type[T]) -> T:
        """An instance of the attrs class *cls*, its settings read from the TOML."""
        self.table("")
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):  # type: ignore[arg-type]
            found: Setting | None = field.metadata.get(_SETTING)
            if found is not None:
                self.read(field, found, values)
            elif attrs.has(type(field.default)):
                values[field.name] = self.build(type(field.default))
        return cls(**values)

    def read(self, field: attrs.Attribute[Any], found: Setting, values: dict[str, Any]) -> None:
        table_name, _, name = found.key.rpartition(".")
        table = self.table(table_name)
        if name not in table:
            return
        if found.excludes is not None:
            other_table, _, other = found.excludes.rpartition(".")
            if other in self.table(other_table):
                self.problem(found.key, f"set either {found.excludes} or {found.key}, not both")
                return
        try:
            value = found.parse(table[name])
            if field.validator is not None:
                field.validator(None, field, value)
        except _Problems as exc:
            for suffix, message in exc.problems:
                self.problem(found.key + suffix, message)
        except (TypeError, ValueError) as exc:
            self.problem(found.key, str(exc))
        else:
            values[field.name] = value
