"""Shared fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eximlab import EximLab, running_lab


@pytest.fixture(name="sock_dir")
def _sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds only 107 bytes; tmp_path is deep)."""
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="exim_lab")
def _exim_lab() -> Iterator[EximLab]:
    """A running Exim + fake MX + spamguardd (limit 3/1h) on loopback; see tests/eximlab.py."""
    with running_lab() as lab:
        yield lab


@pytest.fixture(name="exim_mainlog")
def _exim_mainlog(exim_lab: EximLab) -> Path:
    """The main log of the running lab Exim: real Exim log lines to read or replay."""
    return exim_lab.mainlog
