"""The table of counted users, and which of them changed since the last snapshot. Pure code.

The snapshot writes only the users that changed since the one before (docs/design.md,
"Snapshots"), so every way a user's counters change goes through here: counting marks the user
(:meth:`CountedUsers.mark`), and taking a user out (:meth:`CountedUsers.pop`: a block, a
reset, making room at the cap) marks it too, so that the snapshot records that it is gone. Only
the idle sweep forgets without a mark (:meth:`CountedUsers.forget`): an idle user stays idle,
so a record of it left in the snapshot is dropped again when it is loaded.

The idle sweep must not walk a million users to find the few that went idle, nor copy their
keys (15 ms at a million), so each user is also *filed* in a wheel of one-minute slots under the
time by which it is idle unless counted again (:meth:`CountedUsers.file`); the sweep takes the
slots that are due (:meth:`CountedUsers.take_due`). A user's state remembers the slot it is
filed in, so an entry left behind in an older slot is recognised and skipped, and each user has
exactly one live entry. The wheel is also how the compaction walks every user in small slices.

The table holds ``bytearray`` states (untracked by the garbage collector), so the dictionary
itself stays untracked too: a full collection does not walk a million users.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Final

from spamguardd.core import buckets
from spamguardd.core.buckets import UserState

#: Seconds of one slot of the idle sweep's wheel.
SLOT: Final = 60.0


#: The table is cut into this many dictionaries by the key's hash. A dictionary that grows or
#: sheds deleted entries rebuilds itself whole, in one step: 30-70 ms for a million users, a
#: stall on the query path; for a 256th of them, a fraction of a millisecond.
SHARDS: Final = 256


class CountedUsers:
    """``user -> state``, with the set of users changed since :meth:`take_changed`."""

    __slots__ = ("_changed", "_count", "_shards", "_wheel")

    def __init__(self) -> None:
        self._shards: list[dict[str, UserState]] = [{} for _ in range(SHARDS)]
        self._count = 0
        self._changed: set[str] = set()
        self._wheel: dict[int, list[str]] = {}

    def _shard(self, user: str) -> dict[str, UserState]:
        return self._shards[hash(user) & (SHARDS - 1)]

    def __len__(self) -> int:
        return self._count

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and user in self._shard(user)

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(list(shard) for shard in self._shards)

    def get(self, user: str) -> UserState | None:
        """The state of *user*, or None when it is not counted."""
        return self._shards[hash(user) & (SHARDS - 1)].get(user)

    def put(self, user: str, state: UserState, *, changed: bool = True) -> None:
        """Count *user* with *state* (*changed*: the snapshot does not hold it yet)."""
        shard = self._shard(user)
        if user not in shard:
            self._count += 1
        shard[user] = state
        if changed:
            self._changed.add(user)

    def mark(self, user: str) -> None:
        """*user*'s state was changed in place."""
        self._changed.add(user)

    def pop(self, user: str, default: None = None) -> UserState | None:
        """Stop counting *user*; the snapshot records that it is gone."""
        state = self._shard(user).pop(user, default)
        if state is not None:
            self._count -= 1
            self._changed.add(user)
        return state

    def forget(self, user: str) -> None:
        """Drop an idle *user* without recording it (see the module docstring)."""
        del self._shard(user)[user]
        self._count -= 1

    def take_changed(self) -> set[str]:
        """The users changed since the last call, and start a new set."""
        changed, self._changed = self._changed, set()
        return changed

    def changed_count(self) -> int:
        """How many users changed since :meth:`take_changed`."""
        return len(self._changed)

    def first(self) -> str | None:
        """The user filed earliest in the wheel, the closest to going idle: the one that makes
        room at the cap (users counted in the same minute: the first of them)."""
        for slot in sorted(self._wheel):
            users = self._wheel[slot]
            for index, user in enumerate(users):
                state = self.get(user)
                if state is not None and buckets.filed(state) == slot:
                    del users[:index]  # the stale entries before it
                    return user
            del self._wheel[slot]  # stale entries only
        return None

    def file(self, user: str, state: UserState, idle_by: float) -> None:
        """File *user* for the sweep at *idle_by*, when it is idle unless counted again."""
        slot = math.ceil(idle_by / SLOT)
        if buckets.filed(state) != slot:
            self._wheel.setdefault(slot, []).append(user)
            buckets.set_filed(state, float(slot))

    def refile(self, user: str, state: UserState, idle_by: float, after: int) -> None:
        """File *user* again, in a slot later than *after* (it was due there and is not idle)."""
        slot = max(math.ceil(idle_by / SLOT), after + 1)
        self._wheel.setdefault(slot, []).append(user)
        buckets.set_filed(state, float(slot))

    def take_due(self, now: float) -> list[tuple[int, list[str]]]:
        """The slots due at *now*, taken out of the wheel: ``(slot, users filed there)``."""
        last = math.floor(now / SLOT)
        due = sorted(slot for slot in self._wheel if slot <= last)
        return [(slot, self._wheel.pop(slot)) for slot in due]

    def is_filed(self, state: UserState, slot: int) -> bool:
        """Whether *state*'s live entry is in *slot* (else the entry there is a stale one)."""
        return buckets.filed(state) == slot

    def slots(self) -> list[tuple[int, list[str]]]:
        """Every slot of the wheel and its users (the lists are live: slice them to walk)."""
        return sorted(self._wheel.items())
