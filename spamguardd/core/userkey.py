"""User keys as the shipped RCPT ACL writes them, so a key typed by a person finds its user.

The ACL (``contrib/exim/acl_spamguardd_rcpt``) computes one key per message and sends it to the
daemon, looks it up in the block file and writes it into the freeze header:

- ``auth:`` + the authenticated id folded by ``${lc:}``, for SMTP AUTH;
- ``ip:`` + the client address for relay hosts; an IPv6 client grouped by its /64 as
  ``${mask:$sender_host_address/64}`` writes it, ``ip:2001.0db8.0001.0002.0000.0000.0000.0000/64``;
- ``uid:`` + the login name of the Unix user, for mail submitted locally (``sendmail -bs``,
  ``exim -bs``) without AUTH and without a client address.

:func:`normalise` turns what an admin types (``auth:Mallory@Example.COM``,
``ip:2001:db8:1:2::5``) into that key. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Final

import attrs

#: The ACL groups IPv6 clients by this prefix: one customer usually holds a whole /64.
IPV6_GROUP_PREFIX: Final = 64
AUTH: Final = "auth:"
IP: Final = "ip:"
UID: Final = "uid:"
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_auth_id(auth_id: str) -> str:
    """Case-fold an authenticated id as Exim's ``${lc:}`` does: ASCII letters only.

    ``${lc:}`` lowers bytes with C's ``tolower()`` in the C locale, so ``Ä`` is left alone;
    folding more would give keys the ACL never sends.
    """
    return auth_id.lower() if auth_id.isascii() else auth_id.translate(_ASCII_LOWER)


def exim_mask(address: ipaddress.IPv6Address, bits: int) -> str:
    """``${mask:ADDRESS/BITS}`` as Exim writes it for IPv6: eight dot-separated 4-digit groups.

    ``${mask:2001:db8:1:2::5/64}`` is ``2001.0db8.0001.0002.0000.0000.0000.0000/64`` (Exim 4.96,
    checked with ``exim -be``): dots, because a colon separates list items in Exim.
    """
    network = ipaddress.IPv6Network(f"{address}/{bits}", strict=False)
    full = network.network_address.exploded
    return f"{full.replace(':', '.')}/{bits}"


def ip_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The key of a relay client at *address*: the address, or its /64 for IPv6."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return IP + exim_mask(address, IPV6_GROUP_PREFIX)
        address = mapped  # Exim shows an IPv4 client on an IPv6 socket as IPv4
    return f"{IP}{address}"


@attrs.frozen
class Normalised:
    """A key as the ACL writes it, and whether that differs from what was typed."""

    key: str
    typed: str

    @property
    def changed(self) -> bool:
        """Whether the typed key was rewritten."""
        return self.key != self.typed


def normalise(typed: str) -> Normalised:
    """The key the ACL would have written for the user *typed* names.

    ``auth:`` ids are case-folded; ``ip:`` addresses are written as Exim writes them, an IPv6
    address (or ``ADDRESS/64``, or the ACL's own dotted form) as its /64. Anything else, ``uid:``
    keys included, is returned as typed: there is nothing to fold.
    """
    if typed.startswith(AUTH):
        return Normalised(AUTH + fold_auth_id(typed.removeprefix(AUTH)), typed)
    if typed.startswith(IP):
        return Normalised(_normalise_ip(typed.removeprefix(IP)) or typed, typed)
    return Normalised(typed, typed)


def _normalise_ip(text: str) -> str | None:
    address_text, slash, bits = text.partition("/")
    if slash and bits != str(IPV6_GROUP_PREFIX):
        return None
    if slash and address_text.count(".") == 7:  # the ACL's own form: 2001.0db8....0000/64
        address_text = address_text.replace(".", ":")
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        return None
    if slash and address.version == 4:
        return None
    return ip_key(address)
