"""What one block costs on disk with many users blocked: the whole-file rewrite against the append.

For each size (``--sizes``, default 1,000 and 100,000 blocked users), in a scratch state
directory on the file system given by ``--dir`` (default: the system's temporary directory):

* *rewrite* (the way every block was written before): encode the whole list with the new user
  and replace the file atomically (temp file, fsync, rename, fsync of the directory);
* *append*: ``BlockStore.apply`` with the one new user (an append and a one-byte write, each
  fdatasynced);
* *unblock*: ``BlockStore.apply`` lifting one user (a one-byte write, fdatasynced).

Each is timed ``--rounds`` times on the same file; the median and the worst are printed, and the
ratio rewrite/append. Both run in the same process on the same disk, one after the other.

Run: ``python bench/block_cost.py [--sizes 1000,100000] [--rounds 50] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from spamguardd.core.policy import Block
from spamguardd.state.blockfile import BlockStore, encode, write_atomic

T0 = 1795824000.0


def _blocks(count: int) -> list[Block]:
    return [
        Block(f"auth:user{i:07d}@example.com", T0, "100 failed recipients within 1h", "auto")
        for i in range(count)
    ]


def _timed(action: list[float], start: float) -> None:
    action.append((time.perf_counter() - start) * 1000)


def measure(size: int, rounds: int, base: Path) -> dict[str, list[float]]:
    """Milliseconds per operation at *size* blocked users."""
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        directory = Path(scratch)
        blocks = _blocks(size)
        store = BlockStore(directory)
        store.save(blocks)
        store.open()
        times: dict[str, list[float]] = {"rewrite": [], "append": [], "unblock": []}
        current = list(blocks)
        for i in range(rounds):
            new = Block(f"auth:new{i:05d}@example.com", T0, "r", "auto")
            start = time.perf_counter()
            write_atomic(directory / "rewritten", encode([*current, new]))
            _timed(times["rewrite"], start)
            current.append(new)
            start = time.perf_counter()
            store.apply([(new.user, new)])
            _timed(times["append"], start)
            start = time.perf_counter()
            store.apply([(blocks[i].user, None)])
            _timed(times["unblock"], start)
        store.close()
        return times


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print(f"block cost on {args.dir}, {args.rounds} rounds each (ms: median / worst)")
    print(f"{'blocked users':>14} {'rewrite':>18} {'append':>16} {'unblock':>16} {'ratio':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        times = measure(size, args.rounds, args.dir)
        cells = [
            f"{statistics.median(times[k]):8.2f} / {max(times[k]):7.2f}"
            for k in ("rewrite", "append", "unblock")
        ]
        ratio = statistics.median(times["rewrite"]) / statistics.median(times["append"])
        print(f"{size:>14,} {cells[0]:>18} {cells[1]:>16} {cells[2]:>16} {ratio:>6.0f}x")


if __name__ == "__main__":
    main()
