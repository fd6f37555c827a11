"""Where fleet mode's shared store is: ``redis://``, ``rediss://`` and ``unix://`` URLs. Pure.

The URL is read here rather than by the client library, so that only what spamguardd documents
is accepted (no query options smuggled into the connection) and a password written into the URL
is refused: it belongs in ``cluster.password_file``, not in a file that is often world-readable.
"""

from __future__ import annotations

import urllib.parse
from typing import Final

import attrs

SCHEMES: Final = ("redis", "rediss", "unix")
DEFAULT_PORT: Final = 6379
#: Redis's default number of databases is 16; a server may be configured with more.
MAX_DB: Final = 1 << 20


@attrs.frozen
class StoreAddress:
    """A parsed store URL: TCP (optionally TLS) host and port, or a Unix socket path."""

    scheme: str
    host: str | None = None
    port: int = DEFAULT_PORT
    #: The Unix socket of a ``unix://`` URL.
    path: str | None = None
    db: int = 0
    #: An ACL user (Redis 6 and later); its password comes from ``cluster.password_file``.
    username: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the connection is wrapped in TLS (``rediss://``)."""
        return self.scheme == "rediss"

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        if self.path is not None:
            suffix = f"?db={self.db}" if self.db else ""
            return f"unix://{user}{self.path}{suffix}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreAddress:
    """``redis://host[:port][/db]``, ``rediss://...`` or ``unix:///path[?db=N]``.

    Raises:
        ValueError: another scheme, no host or path, a bad port or database, a password in the
            URL, or a query option other than ``db`` on a Unix socket.
    """
    expected = 'a URL such as "redis://10.0.0.5:6379/0", "rediss://..." or "unix:///path"'
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        raise ValueError(f"expected {expected} (got {text!r})") from None
    if url.scheme not in SCHEMES:
        raise ValueError(f"expected {expected} (got {text!r})")
    if url.password is not None:
        raise ValueError("put the password in cluster.password_file, not in the URL")
    if url.fragment:
        raise ValueError(f"a store URL has no #fragment (got {text!r})")
    username = urllib.parse.unquote(url.username) if url.username else None
    if url.scheme == "unix":
        return _unix(url, username, text)
    if url.query:
        raise ValueError(f"a {url.scheme}:// URL takes no query options (got {text!r})")
    if not url.hostname:
        raise ValueError(f"expected a host in {text!r}")
    db = _db(url.path.lstrip("/"), text) if url.path.strip("/") else 0
    return StoreAddress(
        scheme=url.scheme,
        host=url.hostname,
        port=DEFAULT_PORT if port is None else port,
        db=db,
        username=username,
    )


def _unix(url: urllib.parse.SplitResult, username: str | None, text: str) -> StoreAddress:
    if url.netloc.rpartition("@")[2]:
        raise ValueError(f"a unix:// URL names no host: write unix:///path (got {text!r})")
    if not url.path.startswith("/") or "\x00" in url.path:
        raise ValueError(f"expected the absolute path of the server's socket (got {text!r})")
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"unknown query option {unknown[0]!r} (known: db)")
    db = _db(query["db"][-1], text) if "db" in query else 0
    return StoreAddress(scheme="unix", path=url.path, db=db, username=username)


def _db(text: str, url: str) -> int:
    if not text.isdigit() or int(text) >= MAX_DB:
        raise ValueError(f"expected a database number such as /0 (got {url!r})")
    return int(text)
