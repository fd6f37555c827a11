"""Configuration: the documented example works as written, and every mistake is named."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import attrs
import pytest

from spamguardd.core.config import Config, Mode, PolicyConfig, load_config, toml_keys
from spamguardd.core.errors import ConfigError
from spamguardd.core.protocol import Verdict
from spamguardd.core.rate import Rate

EXAMPLE = """\
mode = "enforce"                          # or "monitor"
[limits]
failed_recipients = ["100/1h", "300/1d"]  # or one string
count_defer = false
[block]
verdict = "freeze"                        # freeze | reject | defer
[[override]]
user = "auth:newsletter@example.com"
failed_recipients = ["1000/1h"]
[exempt]
users = ["auth:monitoring@example.com"]
networks = ["192.0.2.0/24", "2001:db8::/32"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spamguardd.toml"
    path.write_text(text)
    return path


class TestLoad:
    def test_documented_example(self, tmp_path: Path) -> None:
        """The example from the docs loads exactly as written."""
        config = load_config(write(tmp_path, EXAMPLE))
        policy = config.policy
        assert policy.mode is Mode.ENFORCE
        assert policy.failed_recipients == (Rate(100, 3600), Rate(300, 86400))
        assert policy.count_defer is False
        assert policy.verdict is Verdict.FREEZE
        assert policy.limits_for("auth:newsletter@example.com") == (Rate(1000, 3600),)
        assert policy.limits_for("auth:someone@example.com") == policy.failed_recipients
        assert policy.exempt_users == {"auth:monitoring@example.com"}
        assert policy.exempt_networks == (
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
        )

    def test_docs_example_is_the_tested_one(self) -> None:
        """docs/configuration.md shows this very example, so the docs cannot drift from it."""
        docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
        assert EXAMPLE in docs

    def test_embedded_defaults(self) -> None:
        """No file: 100 failures per hour, freeze, sockets and state under the working directory."""
        config = Config()
        assert config.policy.failed_recipients == (Rate(100, 3600),)
        assert config.policy.verdict is Verdict.FREEZE
        assert config.server.query_socket == Path("run/spamguardd.sock")
        assert config.server.socket_mode == 0o660
        assert config.server.backlog >= 1024
        assert config.state.dir == Path("var")

    def test_empty_file_is_the_defaults(self, tmp_path: Path) -> None:
        """Every key is optional."""
        config = load_config(write(tmp_path, ""))
        assert config.policy == Config().policy
        assert config.server == Config().server

    def test_one_rate_as_a_string(self, tmp_path: Path) -> None:
        """failed_recipients may be one string instead of a list."""
        config = load_config(write(tmp_path, '[limits]\nfailed_recipients = "5/1h"\n'))
        assert config.policy.failed_recipients == (Rate(5, 3600),)

    def test_server_and_state_keys(self, tmp_path: Path) -> None:
        """Socket mode takes TOML octal or a string; times take seconds or Exim times."""
        config = load_config(
            write(
                tmp_path,
                '[server]\nquery_socket = "/run/x.sock"\nsocket_mode = 0o600\n'
                'read_timeout = "2s"\nmax_connections = 10\n'
                '[state]\ndir = "/var/lib/x"\ngroup = "Debian-exim"\n',
            )
        )
        assert config.server.query_socket == Path("/run/x.sock")
        assert config.server.socket_mode == 0o600
        assert config.server.read_timeout == 2.0
        assert config.server.max_connections == 10
        assert config.state.group == "Debian-exim"

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("inet:127.0.0.1:9925", ("127.0.0.1", 9925)),
            ("inet:[::1]:9925", ("::1", 9925)),
            ("inet:127.0.0.2:1", ("127.0.0.2", 1)),
            ("", None),
        ],
    )
    def test_query_listen(self, tmp_path: Path, text: str, expected: object) -> None:
        """The TCP listener is written as Exim writes a readsocket spec."""
        config = load_config(write(tmp_path, f'[server]\nquery_listen = "{text}"\n'))
        assert config.server.query_listen == expected


class TestErrors:
    def test_every_problem_is_reported_with_file_and_key(self, tmp_path: Path) -> None:
        """One run lists every mistake, each with the file, the dotted key and what was found."""
        path = write(
            tmp_path,
            'mode = "enforc"\n'
            '[limits]\nfailed_recipients = ["100/1h", "1x"]\ncount_defr = 1\n'
            '[block]\nverdict = "accept"\n'
            '[[override]]\nfailed_recipients = ["1000/1h"]\n'
            '[exempt]\nnetworks = ["192.0.2.0/33"]\n'
            '[server]\nsocket_mode = "999"\nbacklog = 0\n',
        )
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.problems == [
            f"{path}: mode: expected enforce | monitor (got 'enforc')",
            (
                f"{path}: limits.count_defr: unknown key "
                "(known: accepted_recipients, count_defer, failed_recipients, "
                "max_tracked_users, warn_at)"
            ),
            f"{path}: limits.failed_recipients[1]: expected a rate such as 100/1h (got '1x')",
            f"{path}: block.verdict: expected freeze | reject | defer (got 'accept')",
            f"{path}: override[0].user: missing required key",
            (
                f"{path}: exempt.networks[0]: expected an IP network such as 192.0.2.0/24 (got "
                "'192.0.2.0/33')"
            ),
            (
                f'{path}: server.socket_mode: expected octal permission bits such as "0660" (got '
                "'999')"
            ),
            f"{path}: server.backlog: must be between 1 and 1048576 (got 0)",
        ]

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("unknown = 1\n", "unknown: unknown key"),
            (
                '[limits]\ncount_defer = "yes"\n',
                "limits.count_defer: expected true or false (got a string)",
            ),
            ("[limits]\nfailed_recipients = []\n", "limits.failed_recipients: expected a rate"),
            (
                '[limits]\nfailed_recipients = ["1/1h", "2/60m"]\n',
                "limits.failed_recipients: two rates with the same period",
            ),
            ("limits = 3\n", "limits: expected a table (got an integer)"),
            (
                (
                    '[[override]]\nuser = "a"\nfailed_recipients = "1/1h"\n'
                    '[[override]]\nuser = "a"\nfailed_recipients = "2/1h"\n'
                ),
                "override[1].user: 'a' already has an override",
            ),
            ('[exempt]\nusers = [""]\n', "exempt.users: expected a user key"),
            ("[server]\nread_timeout = 0\n", "server.read_timeout: must be > 0"),
            ('[log]\nlevel = "loud"\n', "log.level: expected debug | info"),
            ('[server]\nquery_listen = "127.0.0.1:99"\n', "server.query_listen: expected inet:"),
            ('[server]\nquery_listen = "inet:127.0.0.1:0"\n', "server.query_listen: expected"),
            ('[server]\nquery_listen = "inet:127.0.0.1"\n', "server.query_listen: expected"),
            (
                '[server]\nquery_listen = "inet:192.0.2.1:99"\n',
                "server.query_listen: must be a loopback address",
            ),
        ],
    )
    def test_single_problem(self, tmp_path: Path, text: str, problem: str) -> None:
        """Each kind of mistake gets a message naming the key."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert any(f"{path}: {problem}" in p for p in info.value.problems), info.value.problems

    def test_not_toml(self, tmp_path: Path) -> None:
        """A syntax error names the file and the line."""
        path = write(tmp_path, "mode = \n")
        with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 1"):
            load_config(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a configuration error, not a traceback."""
        with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
            load_config(tmp_path / "nope.toml")


class TestNotifySection:
    def test_defaults_mail_nobody(self) -> None:
        """Without ``to`` no notice is mailed; sendmail is the default transport."""
        notify = Config().notify
        assert notify.to == ()
        assert not notify.mail_enabled
        assert notify.sendmail == ("/usr/sbin/sendmail", "-t", "-oi")
        assert notify.smtp is None
        assert notify.hook == ()

    def test_every_key(self, tmp_path: Path) -> None:
        """Each [notify] key is read; times take seconds or Exim times."""
        config = load_config(
            write(
                tmp_path,
                "[notify]\n"
                'to = ["abuse@example.com", "noc@example.com"]\n'
                'from = "spamguardd@relay.example.com"\n'
                'subject = "[relay1]"\n'
                'smtp = "[::1]:2525"\n'
                'send_timeout = "10s"\n'
                'hook = ["/usr/local/sbin/suspend-mailbox", "--reason=spam"]\n'
                "hook_timeout = 5\n"
                "notify_unblock = false\n"
                "queue_size = 10\n"
                'retry_for = "1h"\n'
                "shutdown_grace = 2.5\n",
            )
        )
        notify = config.notify
        assert notify.to == ("abuse@example.com", "noc@example.com")
        assert notify.sender == "spamguardd@relay.example.com"
        assert notify.subject == "[relay1]"
        assert notify.smtp == ("::1", 2525)
        assert notify.send_timeout == 10.0
        assert notify.hook == ("/usr/local/sbin/suspend-mailbox", "--reason=spam")
        assert notify.hook_timeout == 5.0
        assert notify.notify_unblock is False
        assert notify.queue_size == 10
        assert notify.retry_for == 3600.0
        assert notify.shutdown_grace == 2.5

    def test_one_address_as_a_string(self, tmp_path: Path) -> None:
        """``to`` may be one string."""
        config = load_config(write(tmp_path, '[notify]\nto = "abuse@example.com"\n'))
        assert config.notify.to == ("abuse@example.com",)

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ('to = ["abuse@example.com", "x"]', "notify.to[1]: expected a mail address"),
            ('to = ["a@b\\nBcc: victim@example.com"]', "notify.to[0]: expected a mail address"),
            ('from = "Abuse <a@b>"', "notify.from: expected a mail address"),
            ('subject = "x\\ny"', "notify.subject: expected one line of printable text"),
            ("sendmail = []", "notify.sendmail: expected a command (got an empty array)"),
            ('sendmail = "/usr/sbin/sendmail -t"', "notify.sendmail: expected a command as an"),
            ('smtp = "localhost"', 'notify.smtp: expected "host:port"'),
            ('smtp = "localhost:99999"', 'notify.smtp: expected "host:port"'),
            (
                'smtp = "localhost:25"\nsendmail = ["/usr/sbin/sendmail"]',
                "notify.smtp: set either notify.sendmail or notify.smtp, not both",
            ),
            ('hook = ["/bin/x", ""]', "notify.hook: expected a command as an array"),
            ("hook_timeout = 0", "notify.hook_timeout: must be > 0"),
            ("queue_size = 0", "notify.queue_size: must be between 1 and 1000000 (got 0)"),
            ('retry_for = "soon"', "notify.retry_for:"),
            ("notify_unblock = 1", "notify.notify_unblock: expected true or false"),
            ("tto = []", "notify.tto: unknown key"),
        ],
    )
    def test_single_problem(self, tmp_path: Path, text: str, problem: str) -> None:
        """Each mistake in [notify] names the file and the dotted key."""
        path = write(tmp_path, f"[notify]\n{text}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert any(f"{path}: {problem}" in p for p in info.value.problems), info.value.problems


class TestHostileFiles:
    @pytest.mark.parametrize("key", ["server.read_timeout", "state.snapshot_interval"])
    @pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.0"])
    def test_durations_must_be_finite_and_positive(
        self, tmp_path: Path, key: str, value: str
    ) -> None:
        """nan and inf are TOML numbers but no duration: refused, naming the key."""
        table, name = key.split(".")
        path = write(tmp_path, f"[{table}]\n{name} = {value}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.problems == [f"{path}: {key}: must be > 0 and finite (got {value})"]

    @pytest.mark.parametrize(
        ("text", "key", "message"),
        [
            ("[server]\nread_timeout = 1e-300\n", "server.read_timeout", "between 0.001 s"),
            ("[state]\nsnapshot_interval = 1e-300\n", "state.snapshot_interval", "between"),
            ("[state]\nsnapshot_interval = 0.01\n", "state.snapshot_interval", "at least 0.1"),
            ('[server]\nread_timeout = "99999999999999999999d"\n', "server.read_timeout", "100"),
            ('[block]\nexpire = "99999999999999999999d"\n', "block.expire", "100 years"),
            ('[block]\nexpire = "420000w"\n', "block.expire", "100 years"),
            ('[limits]\nfailed_recipients = "3/99999999999999999999d"\n', "limits", "100 years"),
        ],
    )
    def test_times_no_clock_can_hold_are_refused(
        self, tmp_path: Path, text: str, key: str, message: str
    ) -> None:
        """A time of thousands of years (which crashed the daemon at the first block that used
        it) or a snapshot interval near zero (which pegged the processor) is a config error."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        (problem,) = info.value.problems
        assert f"{path}: {key}" in problem
        assert message in problem

    @pytest.mark.parametrize("key", ["send_timeout", "hook_timeout", "retry_for", "shutdown_grace"])
    def test_notify_durations_refuse_nan(self, tmp_path: Path, key: str) -> None:
        """Every duration is checked the same way."""
        path = write(tmp_path, f"[notify]\n{key} = nan\n")
        with pytest.raises(ConfigError, match=f"notify.{key}: must be > 0 and finite"):
            load_config(path)

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is a configuration error naming the line, not a traceback."""
        path = tmp_path / "spamguardd.toml"
        path.write_bytes(b'mode = "monitor"\n[log]\nlevel = "\xff"\n')
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.problems == [f"{path}: not valid UTF-8 (line 3, byte 32)"]

    @pytest.mark.parametrize("nesting", ["x = " + "[" * 100_000, "x = " + "{a=" * 100_000])
    def test_deep_nesting(self, tmp_path: Path, nesting: str) -> None:
        """Nesting deep enough to exhaust the parser's recursion is a configuration error."""
        path = write(tmp_path, nesting + "\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(path)


class TestBuiltInCode:
    def test_evolved_sections_are_validated(self) -> None:
        """A section built or evolved in code is checked like one read from a file."""
        with pytest.raises(ValueError, match="must be between 1 and 1048576"):
            attrs.evolve(Config().server, backlog=0)
        with pytest.raises(ValueError, match="must be > 0 and finite"):
            attrs.evolve(Config().notify, hook_timeout=float("nan"))
        with pytest.raises(ValueError, match="two rates with the same period"):
            PolicyConfig(failed_recipients=(Rate(1, 3600), Rate(2, 3600)))

    def test_every_setting_has_one_key(self) -> None:
        """Each TOML key is declared once, in the field that holds it."""
        keys = toml_keys()
        assert len(keys) == len(set(keys))
        assert "notify.from" in keys
        assert "mode" in keys
