"""The descriptor limit raised at start, and the share of it query connections may hold."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from spamguardd.daemon import fdlimit


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    """Started at systemd's default soft limit, the process ends up at the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import json, resource; from spamguardd.daemon.fdlimit import raise_soft_limit;"
        "limits = raise_soft_limit();"
        "print(json.dumps([limits.soft_before, limits.soft, limits.hard,"
        " resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))"
    )
    soft = min(256, hard)
    out = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert json.loads(out) == [soft, hard, hard, hard]


def test_the_budget_keeps_the_reserve() -> None:
    """Query connections get what is left after the descriptors in use and the reserve."""
    assert fdlimit.query_budget(soft=1024, in_use=20) == 1024 - 20 - fdlimit.RESERVE
    assert fdlimit.query_budget(soft=65536, in_use=40) == 65536 - 40 - fdlimit.RESERVE
    # a tiny limit still serves a few
    assert fdlimit.query_budget(soft=64, in_use=20) == fdlimit.MIN_BUDGET


def test_open_descriptors_counts_new_ones() -> None:
    before = fdlimit.open_descriptors()
    here = Path(__file__)
    with here.open("rb"), here.open("rb"):
        assert fdlimit.open_descriptors() == before + 2
