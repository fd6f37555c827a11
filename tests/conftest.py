"""Shared fixtures."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(name="sock_dir")
def _sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds only 107 bytes; tmp_path is deep)."""
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
