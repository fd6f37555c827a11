"""Exim main logs for the replay benchmark, generated in the line formats a real Exim 4.96 wrote.

The formats are those of ``tests/data/exim/mainlog`` (captured from Debian's Exim 4.96). Two
kinds of traffic:

* :func:`ordinary`: a relay's everyday log. Per SMTP session a connect line, ``rejected RCPT``
  for about 3 % of recipients (50 % for ten spammer accounts, which have one session in 50),
  ``<=`` with ``A=plain_server:id`` (or a relay address) and ``for ...``, ``=>`` per recipient
  (``**`` for about 0.5 %), ``Completed`` and the QUIT line; 20,000 users.
* :func:`spam_wave`: a wave of harvested addresses. Every line is a ``rejected RCPT`` whose
  reason is a verification failure (unrouteable, a callout's 550, a cached callout failure for
  the one recipient in ten that is tried again); the senders are spread evenly over *users*
  accounts (one in twenty a relay client counted by address), over *hours* hours.

Both are deterministic for a given seed, so two runs replay the same lines.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
START = 1_795_833_830  # 2026-11-28 02:43:50 UTC, as in the captured log
#: The relay network of the generated logs (``--relay-net``): relay clients are counted by address.
RELAY_NET = "198.51.100.0/24"


def _msgid(n: int) -> str:
    digits = []
    for _ in range(6):
        n, r = divmod(n, 62)
        digits.append(_ALNUM[r])
    return f"1xX8{''.join(digits[:2])}-{''.join(digits[2:]).rjust(6, '0')}-0q"


def _callout_refusal(host: str, rcpt: str) -> str:
    return (
        f"{host} [{host}] : SMTP error from remote mail server after RCPT TO:<{rcpt}>:"
        f" 550 5.1.1 <{rcpt}>: no such user here"
    )


def ordinary(path: Path, lines: int, seed: int = 7) -> None:
    """Write a *lines*-line main log of everyday traffic (see the module docstring)."""
    rng = random.Random(seed)
    users = [f"user{i}@example.com" for i in range(20_000)]
    spammers = {f"user{i}@example.com" for i in range(0, 20_000, 2_000)}
    written = 0
    message = 0
    now = float(START)
    with path.open("w") as out:
        while written < lines:
            now += rng.expovariate(1 / 0.05)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
            relay = rng.random() < 0.1
            # one session in 50 is a spammer's (ten accounts), the rest spread over everyone
            user = rng.choice(sorted(spammers)) if rng.random() < 0.02 else rng.choice(users)
            host = f"198.51.100.{rng.randrange(1, 255)}" if relay else "203.0.113.9"
            auth = "" if relay else f" A=plain_server:{user}"
            spam = user in spammers
            rcpts = [
                f"r{rng.randrange(10**6)}@dest{rng.randrange(500)}.example"
                for _ in range(rng.randint(1, 30 if spam else 3))
            ]
            block = [f"{stamp} SMTP connection from [{host}] (TCP/IP connection count = 1)"]
            accepted = []
            for rcpt in rcpts:
                if rng.random() < (0.5 if spam else 0.03):
                    reason = rng.choice(["Unrouteable address", _callout_refusal(host, rcpt)])
                    block.append(
                        f"{stamp} H=(client.test) [{host}] F=<sender@example.com>{auth}"
                        f" rejected RCPT <{rcpt}>: {reason}"
                    )
                else:
                    accepted.append(rcpt)
            if accepted:
                message += 1
                mid = _msgid(message)
                protocol = "esmtp" if relay else "esmtpa"
                block.append(
                    f"{stamp} {mid} <= sender@example.com H=(client.test) [{host}] P={protocol}"
                    f"{auth} S={rng.randrange(800, 90000)} for {' '.join(accepted)}"
                )
                for rcpt in accepted:
                    if rng.random() < 0.005:
                        block.append(
                            f"{stamp} {mid} ** {rcpt} R=dnslookup T=remote_smtp H=mx.example"
                            f" [192.0.2.1]: SMTP error from remote mail server after RCPT"
                            f" TO:<{rcpt}>: 550 5.1.1 <{rcpt}>: no such user here"
                        )
                    else:
                        block.append(
                            f"{stamp} {mid} => {rcpt} R=dnslookup T=remote_smtp H=mx.example"
                            f' [192.0.2.1] C="250 OK queued"'
                        )
                block.append(f"{stamp} {mid} Completed")
            block.append(f"{stamp} SMTP connection from (client.test) [{host}] closed by QUIT")
            out.write("\n".join(block) + "\n")
            written += len(block)


def spam_wave(
    path: Path, lines: int, *, users: int = 5_000, hours: float = 6.0, seed: int = 11
) -> None:
    """Write a *lines*-line main log of a spam wave: every line a failed recipient."""
    rng = random.Random(seed)
    relays = min(max(1, users // 20), 254)  # one address each in the relay network
    senders = [(f"relay{i}@example.com", f"198.51.100.{1 + i}", "") for i in range(relays)] + [
        (f"user{i}@example.com", f"203.0.113.{1 + i % 254}", f" A=plain_server:user{i}@example.com")
        for i in range(users - relays)
    ]
    step = hours * 3600 / lines
    # each sender's recently refused addresses: a second try is answered from the callout cache
    tried: list[list[str]] = [[] for _ in senders]
    stamp_second = -1
    stamp = ""
    with path.open("w") as out:
        for n in range(lines):
            second = int(START + n * step)
            if second != stamp_second:
                stamp_second = second
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            which = rng.randrange(len(senders))
            sender, host, auth = senders[which]
            mine = tried[which]
            if mine and rng.random() < 0.1:
                rcpt = mine[rng.randrange(len(mine))]
                reason = "Previous (cached) callout verification failure"
            else:
                rcpt = f"h{rng.randrange(10**7)}@dest{rng.randrange(2_000)}.example"
                mine.append(rcpt)
                if len(mine) > 20:
                    del mine[0]
                remote = f"192.0.2.{rng.randrange(1, 255)}"
                reason = (
                    "Unrouteable address" if rng.random() < 0.4 else _callout_refusal(remote, rcpt)
                )
            out.write(
                f"{stamp} H=(client.test) [{host}] F=<{sender}>{auth}"
                f" rejected RCPT <{rcpt}>: {reason}\n"
            )
