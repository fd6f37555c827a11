"""spamguardctl on an installed system: the socket from /etc, keys as the ACL writes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spamguardd.ctl import main as ctl


@pytest.fixture(name="system_config")
def _system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "spamguardd.toml"
    monkeypatch.setattr(ctl, "SYSTEM_CONFIG", path)
    return path


def test_socket_from_the_installed_configuration(
    system_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without flags, admin.socket of the installed configuration is used."""
    system_config.write_text(f'[admin]\nsocket = "{tmp_path}/admin.sock"\n')
    assert ctl.main(["list"]) == ctl.EX_UNAVAILABLE
    assert f"cannot reach spamguardd at {tmp_path}/admin.sock" in capsys.readouterr().err


def test_a_broken_installed_configuration_is_a_refusal(
    system_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration with errors names them and exits 1, as the daemon's reload would."""
    system_config.write_text('mode = "x"\n')
    assert ctl.main(["reload"]) == ctl.EX_FAILED
    assert "mode: expected enforce | monitor" in capsys.readouterr().err


def test_embedded_default_without_an_installed_configuration(
    system_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkout without /etc/spamguardd uses ./run/admin.sock, as make run creates it."""
    assert not system_config.exists()
    assert ctl.main(["list"]) == ctl.EX_UNAVAILABLE
    assert "cannot reach spamguardd at run/admin.sock" in capsys.readouterr().err


def test_flags_win_over_the_installed_configuration(
    system_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--socket and --config override the installed configuration."""
    system_config.write_text('[admin]\nsocket = "/nonexistent/a.sock"\n')
    other = tmp_path / "other.toml"
    other.write_text(f'[admin]\nsocket = "{tmp_path}/b.sock"\n')
    assert ctl.main(["--config", str(other), "list"]) == ctl.EX_UNAVAILABLE
    assert f"{tmp_path}/b.sock" in capsys.readouterr().err
    assert ctl.main(["--socket", str(tmp_path / "c.sock"), "list"]) == ctl.EX_UNAVAILABLE
    assert f"{tmp_path}/c.sock" in capsys.readouterr().err


def test_user_keys_are_written_as_the_acl_writes_them(
    system_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show/block/unblock fold the key the ACL's way and say that they did."""
    assert ctl.main(["show", "auth:Mallory@Example.COM"]) == ctl.EX_UNAVAILABLE
    err = capsys.readouterr().err
    assert (
        "spamguardctl: auth:Mallory@Example.COM is written auth:mallory@example.com by the ACL; "
        "using that"
    ) in err
    assert ctl.main(["show", "auth:mallory@example.com"]) == ctl.EX_UNAVAILABLE
    assert "written" not in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly() -> None:
    """`spamguardctl ... | head`: when the reader has gone, no traceback on standard error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [Path(sys.executable).parent / "spamguardctl", "replay", os.devnull],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == ctl.EX_FAILED
