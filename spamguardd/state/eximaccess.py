"""Can Exim's group read the block file? Checked at start, reload and ``--check-config``.

While the daemon is down the shipped ACL reads the block file itself, as Exim's user: the file
must be readable by Exim's group (``state.group``) and every directory above it searchable.
A restore from a backup, a ``chgrp`` or a ``chmod`` breaks that silently, and then the fallback
finds nobody (the ACL fails open and logs it). So the daemon looks, repairs what it owns (it is a
member of that group, so it may give a file of its own to it) and names every path it cannot fix,
with the command that would.

The permission rule is the kernel's for a process of *gid* that owns none of the files: the
group bits when the file's group is *gid*, else the "other" bits.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs


@attrs.frozen
class AccessProblem:
    """One path Exim's group cannot use as the fallback needs."""

    path: Path
    #: ``read`` for the block file, ``search`` for a directory above it.
    need: str
    mode: int
    gid: int
    #: Whether the daemon (whose uid is given to :func:`check`) owns the path and so can fix it.
    ours: bool

    def describe(self, group: str) -> str:
        """One line for the log or ``--check-config``: what, why, how to fix."""
        kind = "file" if self.need == "read" else "directory"
        bit, letter = ("r", "read") if self.need == "read" else ("x", "search")
        return (
            f"{self.path}: Exim's group {group} cannot {letter} this {kind} (mode "
            f"{stat.S_IMODE(self.mode):04o}, group {self.gid}), so the ACL's fallback cannot see "
            f"the blocked users while spamguardd is down; fix: chgrp {group} {self.path} && "
            f"chmod g+{bit} {self.path}"
        )


def _allows(st: os.stat_result, gid: int, group_bit: int, other_bit: int) -> bool:
    if st.st_gid == gid:
        return bool(st.st_mode & group_bit)
    return bool(st.st_mode & other_bit)


def check(block_file: Path, gid: int, *, uid: int) -> list[AccessProblem]:
    """The paths that keep group *gid* from reading *block_file*; empty when all is well.

    A block file that does not exist yet is fine (the daemon creates it with that group); the
    directories above it are checked whether it exists or not. A directory that does not exist
    is skipped: it is created at start.
    """
    problems = []
    path = block_file.absolute()
    try:
        st = path.stat()
    except FileNotFoundError:
        pass
    else:
        if not _allows(st, gid, stat.S_IRGRP, stat.S_IROTH):
            problems.append(AccessProblem(path, "read", st.st_mode, st.st_gid, st.st_uid == uid))
    for directory in path.parents:
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue
        if not _allows(st, gid, stat.S_IXGRP, stat.S_IXOTH):
            problems.append(
                AccessProblem(directory, "search", st.st_mode, st.st_gid, st.st_uid == uid)
            )
    return problems


def repair(problems: Iterable[AccessProblem], gid: int) -> list[str]:
    """Fix the problems on paths the daemon owns; return what was done, one line each.

    The block file is given to group *gid* with ``g+r``. A directory of ours gets ``g+x`` when
    it already has that group, else ``o+x`` (search only: nobody may list it).

    Raises:
        OSError: a change was refused; the message names the path.
    """
    done = []
    for problem in problems:
        if not problem.ours:
            continue
        path = problem.path
        mode = stat.S_IMODE(problem.mode)
        try:
            if problem.need == "read":
                os.chown(path, -1, gid)
                path.chmod(mode | stat.S_IRGRP)
                done.append(f"{path}: gave it to group {gid} with g+r")
            elif problem.gid == gid:
                path.chmod(mode | stat.S_IXGRP)
                done.append(f"{path}: added g+x")
            else:
                path.chmod(mode | stat.S_IXOTH)
                done.append(f"{path}: added o+x (search only)")
        except OSError as exc:
            raise OSError(
                exc.errno, f"{path}: cannot repair its permissions: {exc.strerror}"
            ) from exc
    return done
