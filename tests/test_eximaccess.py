"""Exim's group must be able to read the block file: checked, repaired where ours, else named."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spamguardd.state import eximaccess

GID = os.getgid()
OTHER_GID = GID + 4242  # a group nobody here is in; root may still chown to it


@pytest.fixture(name="state")
def _state() -> Iterator[Path]:
    # under /tmp itself: pytest's own directories are 0700 and would be reported too
    scratch = Path(tempfile.mkdtemp(prefix="access-", dir="/tmp"))
    scratch.chmod(0o755)
    state = scratch / "state"
    state.mkdir()
    state.chmod(0o750)
    try:
        yield state
    finally:
        shutil.rmtree(scratch)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_all_well(state: Path) -> None:
    """Group-readable file in a group-searchable directory: nothing to say."""
    (state / "blocked").write_text("")
    (state / "blocked").chmod(0o640)
    assert eximaccess.check(state / "blocked", GID, uid=os.geteuid()) == []


def test_missing_file_is_fine_but_directories_count(state: Path) -> None:
    """No block file yet is normal; a directory Exim cannot search is not."""
    state.chmod(0o700)
    [problem] = eximaccess.check(state / "blocked", GID, uid=os.geteuid())
    assert (problem.path, problem.need) == (state, "search")


def test_wrong_group_is_repaired_when_ours(state: Path) -> None:
    """A restored file with another group and no "other" read: given back to Exim's group."""
    blocked = state / "blocked"
    blocked.write_text("")
    os.chown(blocked, -1, OTHER_GID)
    blocked.chmod(0o600)
    problems = eximaccess.check(blocked, GID, uid=os.geteuid())
    assert [(p.path, p.need, p.ours) for p in problems] == [(blocked, "read", True)]
    assert "chgrp" in problems[0].describe("Debian-exim")
    done = eximaccess.repair(problems, GID)
    assert done == [f"{blocked}: gave it to group {GID} with g+r"]
    assert blocked.stat().st_gid == GID
    assert mode(blocked) == 0o640
    assert eximaccess.check(blocked, GID, uid=os.geteuid()) == []


def test_directory_of_another_group_gets_search_for_others(state: Path) -> None:
    """Our directory of another group gets o+x (search, never listing)."""
    os.chown(state, -1, OTHER_GID)
    state.chmod(0o700)
    problems = eximaccess.check(state / "blocked", GID, uid=os.geteuid())
    assert eximaccess.repair(problems, GID) == [f"{state}: added o+x (search only)"]
    assert mode(state) == 0o701


def test_what_is_not_ours_is_left_and_named(state: Path) -> None:
    """A path owned by someone else is not touched; the problem says how to fix it."""
    blocked = state / "blocked"
    blocked.write_text("")
    blocked.chmod(0o600)
    problems = eximaccess.check(blocked, GID, uid=os.geteuid() + 1)
    assert [p.ours for p in problems] == [False]
    assert eximaccess.repair(problems, GID) == []
    assert mode(blocked) == 0o600
    text = problems[0].describe("Debian-exim")
    assert text.startswith(f"{blocked}: Exim's group Debian-exim cannot read this file")
    assert text.endswith(f"fix: chgrp Debian-exim {blocked} && chmod g+r {blocked}")
