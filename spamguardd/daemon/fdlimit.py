"""Descriptors: the soft limit raised to the hard one at start, and the share queries may hold.

systemd starts a service with a soft ``RLIMIT_NOFILE`` of 1,024 unless its unit says otherwise;
10,000 idle clients then exhaust the process and the block file, the snapshot, the journal and
the admin socket fail with ``EMFILE``. The daemon raises its soft limit to the hard one (the unit
sets ``LimitNOFILE=``) and lets query connections hold only what is left after a reserve for
everything else (:func:`query_budget`).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Final

import attrs

#: Descriptors kept back from query connections for the rest of the daemon: the block file and
#: its directory (the write, the fsync of both), the snapshot's files, the journal, a notice's
#: sendmail or hook pipes or SMTP connection, fleet mode's store connections, admin and metrics
#: connections, and the sockets and pipes trio and Python open for themselves.
RESERVE: Final = 128
#: The least query connections may hold, however tight the limit (a daemon started by hand with
#: a tiny ``ulimit -n`` still serves, with a small reserve).
MIN_BUDGET: Final = 16
#: A soft limit of RLIM_INFINITY is taken as this many (Linux never allows it for descriptors).
_UNLIMITED: Final = 1 << 20


@attrs.frozen
class FdLimits:
    """The soft limit before and after :func:`raise_soft_limit`, and the hard limit."""

    soft_before: int
    soft: int
    hard: int


def _finite(limit: int) -> int:
    return _UNLIMITED if limit == resource.RLIM_INFINITY else limit


def raise_soft_limit() -> FdLimits:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; the limits before and after.

    A refusal (a sandbox that forbids it) leaves the soft limit as it was: the budget follows
    whatever limit is in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FdLimits(soft_before=_finite(soft), soft=_finite(now), hard=_finite(hard))


def open_descriptors() -> int:
    """How many descriptors the process holds now (``/proc/self/fd``, else ``/dev/fd``)."""
    for directory in (Path("/proc/self/fd"), Path("/dev/fd")):
        try:
            return sum(1 for _ in directory.iterdir()) - 1  # the listing's own descriptor
        except OSError:
            continue
    return 0


def query_budget(*, soft: int | None = None, in_use: int | None = None) -> int:
    """How many query connections may be open at once without eating into :data:`RESERVE`.

    *soft* defaults to the current soft limit and *in_use* to the descriptors open now (the
    listeners, state files, trio's own), so call it once everything long-lived is open.
    """
    if soft is None:
        soft = _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if in_use is None:
        in_use = open_descriptors()
    return max(MIN_BUDGET, soft - in_use - RESERVE)
