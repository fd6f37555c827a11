"""The socket fuzzer's short run: a live daemon process, snapshots every second, canaries.

The full run (10^6 cases) is ``bench/fuzz_socket.py``; its figures are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import socket_fuzz

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(name="daemon")
def _daemon(sock_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    query = sock_dir / "q.sock"
    config = sock_dir / "spamguardd.toml"
    config.write_text(
        f'[limits]\nfailed_recipients = ["{socket_fuzz.LIMIT}/1h"]\n'
        f'[server]\nquery_socket = "{query}"\n'
        f'[state]\ndir = "{sock_dir / "state"}"\nsnapshot_interval = 1.0\n'
        f'[admin]\nsocket = "{sock_dir / "admin.sock"}"\n'
        '[log]\nformat = "json"\n'
    )
    log = sock_dir / "daemon.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "spamguardd", "--config", str(config)],
            cwd=sock_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                if socket_fuzz.ask(query, b"ping\n", timeout=5) == b"pong":
                    break
            time.sleep(0.05)
        yield process, query, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_fuzzing_neither_crashes_nor_hangs_and_canaries_hold(
    daemon: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    """Every kind of bad client, thousands of times: each waiting one gets one reply line, no
    hang, no internal error; the blocked canary stays frozen, the clean one accepted; the daemon
    stops cleanly afterwards."""
    process, query, log = daemon
    assert socket_fuzz.block_canary(query)[-1] == b"freeze"
    result = socket_fuzz.fuzz(query, 3000, seed=7, canary_every=100)
    assert result["bad"] == []
    assert result["outcomes"].get("hang", 0) == 0
    assert set(result["kinds"]) == set(socket_fuzz.KINDS)
    assert result["canary_failures"] == 0
    assert socket_fuzz.canaries_right(query)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    events = [json.loads(line).get("event") for line in log.read_text().splitlines()]
    assert "internal_error" not in events
    assert "snapshot_failed" not in events
