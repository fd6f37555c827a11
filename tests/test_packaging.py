"""The Debian package's files agree with each other and with the code."""

from __future__ import annotations

import re
from pathlib import Path

from spamguardd import __version__
from spamguardd.core.config import load_config
from spamguardd.daemon.fdlimit import RESERVE

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "contrib" / "systemd"


def unit_setting(unit: str, key: str) -> str:
    match = re.search(rf"^{key}=(\S+)", (SYSTEMD / unit).read_text(), re.MULTILINE)
    assert match is not None, (unit, key)
    return match.group(1)


def test_debian_version_is_the_package_version() -> None:
    """debian/changelog's newest entry is __version__ in Debian's spelling (.dev0 -> ~dev0)."""
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"spamguardd \((\S+)\) ", first)
    assert match is not None, first
    assert match.group(1) == re.sub(r"\.(dev|a|b|rc)", r"~\1", __version__)


def test_shipped_configuration_matches_the_units() -> None:
    """/etc/spamguardd/spamguardd.toml names the paths the units create, all absolute."""
    config = load_config(REPO / "contrib" / "spamguardd.toml")
    assert str(config.server.query_socket) == unit_setting("spamguardd.socket", "ListenStream")
    assert str(config.admin.socket) == unit_setting("spamguardd-admin.socket", "ListenStream")
    assert str(config.notify.smtp) == unit_setting("spamguardd-submit.socket", "ListenStream")
    assert str(config.policy.mode) == "monitor"
    exec_start = unit_setting("spamguardd.service", "ExecStart")
    rules = (REPO / "debian" / "rules").read_text()
    root = re.search(r"DH_VIRTUALENV_INSTALL_ROOT := (\S+)", rules)
    assert root is not None
    assert exec_start == f"{root.group(1)}/spamguardd/bin/spamguardd"
    assert f"--state-dir {config.state.dir}" in (SYSTEMD / "spamguardd.service").read_text()
    for path in (config.server.query_socket, config.admin.socket, config.state.dir):
        assert path.is_absolute()


def test_every_installed_file_exists() -> None:
    """Every source named in debian/*.install, .docs and .manpages is in the tree."""
    names = [
        line.split()[0]
        for listing in ("spamguardd.install", "spamguardd.docs", "spamguardd.manpages")
        for line in (REPO / "debian" / listing).read_text().splitlines()
        if line.strip()
    ]
    missing = [name for name in names if not (REPO / name).exists()]
    assert missing == []
    docs = {line.strip() for line in (REPO / "debian" / "spamguardd.docs").read_text().splitlines()}
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= docs


def test_the_unit_gives_room_for_many_waiting_clients() -> None:
    """The service's descriptor limit holds 10,000 idle and 1,000 slow clients (the figure of
    docs/reliability.md) beside the daemon's reserve, instead of systemd's default 1,024."""
    limit = int(unit_setting("spamguardd.service", "LimitNOFILE"))
    assert limit >= 10_000 + 1_000 + RESERVE
