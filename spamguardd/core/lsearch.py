"""User keys as Exim's ``lsearch`` reads them: quoting, and the longest key it can see. Pure.

Exim 4.96's lsearch (``src/lookups/lsearch.c``) reads the file with ``fgets`` into a buffer of
4096 bytes, so the first piece of a line is at most 4095 bytes, and the key must end inside it:
a quoted key whose closing quote falls later is read up to the end of the piece, so the real key
never matches, and a shorter key (the piece, unquoted) matches instead. A key is therefore
refused when its quoted form is longer than :data:`MAX_QUOTED_KEY` (checked against a real Exim
in the test suite).
"""

from __future__ import annotations

from typing import Final

#: The longest quoted key (quotes and escapes included) Exim's lsearch reads whole.
MAX_QUOTED_KEY: Final = 4095

_KEY_ESCAPES: Final = {0x5C: b"\\\\", 0x22: b'\\"', 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def quote_key(user: str) -> bytes:
    """Quote a user key as an lsearch key (its bytes as UTF-8 with surrogateescape).

    Inside the quotes Exim honours ``\\\\``, ``\\"``, ``\\n``, ``\\r``, ``\\t`` and ``\\xHH``;
    bytes of 0x80 and above are written as they are, because Exim compares raw bytes.
    """
    out = bytearray(b'"')
    for byte in user.encode("utf-8", "surrogateescape"):
        escaped = _KEY_ESCAPES.get(byte)
        if escaped is not None:
            out += escaped
        elif byte < 0x20 or byte == 0x7F:  # the control characters
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    out += b'"'
    return bytes(out)


def too_long(user: str) -> str | None:
    """Why Exim could not find *user* in the block file, or None when it can."""
    if len(user) * 4 + 2 <= MAX_QUOTED_KEY:  # no character quotes to more than 4 bytes
        return None
    size = len(quote_key(user))
    if size <= MAX_QUOTED_KEY:
        return None
    return (
        f"user key is {size} bytes once quoted for Exim's lsearch, which reads at most "
        f"{MAX_QUOTED_KEY} (Exim could not find it in the block file)"
    )
