"""A real Exim, a fake remote MX and spamguardd on loopback, for tests and the demo.

The Exim configuration is assembled from the shipped ``contrib/exim/`` files with ``.include``,
so what is tested is what ships. Everything lives in one scratch directory under ``/tmp`` that
Exim's user can reach (pytest's own temp directories are mode 0700): spool, logs, sockets, the
daemon's state and the mailbox files. Exim runs with ``-C`` as root, which is why the config
sets ``deliver_drop_privilege`` (docs/exim-facts.md §7.5).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

import attrs

T = TypeVar("T")

ROOT: Final = Path(__file__).resolve().parent.parent
CONTRIB: Final = ROOT / "contrib" / "exim"
EXIM_USER: Final = "Debian-exim"
#: Password every test user authenticates with.
PASSWORD: Final = "secret"  # noqa: S105 - a throwaway loopback test server
#: Client address the test config lists in relay_from_hosts (no AUTH needed to relay).
RELAY_IP: Final = "127.0.0.2"
#: An IPv6 relay network (for ``exim -bh`` runs: the lab listens on IPv4 only).
RELAY_NET6: Final = "2001:db8:1:2::/64"
#: Client address that is neither a relay host nor authenticated: incoming mail.
FOREIGN_IP: Final = "127.0.0.3"
#: Domain routed to the fake MX without a callout: its bad recipients fail only at delivery.
LATE_DOMAIN: Final = "late.test"


def exim_binary() -> str:
    """Path of Exim; fails (never skips) when Debian's exim4-daemon-light is missing."""
    path = shutil.which("exim") or shutil.which("exim", path="/usr/sbin:/usr/bin")
    if path is None:
        raise AssertionError("Exim not found: `make test` installs Debian's exim4-daemon-light")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll *probe* until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The fake remote MX


@attrs.define
class Received:
    """One message the fake MX accepted."""

    sender: str
    recipients: list[str]
    data: bytes


def rejects(address: str) -> bool:
    """The fake MX's only rule: local parts starting with ``bad`` do not exist."""
    return address.lower().startswith("bad")


class _SMTPHandler(socketserver.StreamRequestHandler):
    server: FakeMX

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 mx.fake ESMTP")
        sender = ""
        recipients: list[str] = []
        while line := self.rfile.readline():
            command = line.decode("utf-8", "replace").strip()
            verb = command[:4].upper()
            if verb in {"EHLO", "HELO"}:
                self.reply("250 mx.fake")
            elif verb == "MAIL":
                sender, recipients = _address(command), []
                self.reply("250 OK")
            elif verb == "RCPT":
                address = _address(command)
                self.server.rcpt_log.append(address)
                if self.server.rejects(address):
                    self.reply(f"550 5.1.1 <{address}>: no such user here")
                else:
                    recipients.append(address)
                    self.reply("250 Accepted")
            elif verb == "DATA":
                self.reply("354 go ahead")
                data = b""
                while (chunk := self.rfile.readline()) and chunk != b".\r\n":
                    data += chunk
                self.server.received.append(Received(sender, recipients, data))
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")


def _address(command: str) -> str:
    match = re.search(r"<([^>]*)>", command)
    return match.group(1) if match else ""


class FakeMX(socketserver.ThreadingTCPServer):
    """A remote MX on 127.0.0.1 that refuses chosen recipients (``bad*`` by default) at RCPT.

    The same refusal serves a callout at RCPT time and a delivery: recipients at
    :data:`LATE_DOMAIN` get no callout, so theirs happens only at delivery time.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, rejects: Callable[[str], bool] = rejects) -> None:
        super().__init__(("127.0.0.1", 0), _SMTPHandler)
        #: Which recipients do not exist here (refused at RCPT, for callouts and deliveries).
        self.rejects = rejects
        self.port = int(self.server_address[1])
        self.received: list[Received] = []
        self.rcpt_log: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()

    def delivered_to(self, address: str) -> bool:
        """Whether a message for *address* has arrived."""
        return any(address in message.recipients for message in self.received)


# ---------------------------------------------------------------------------------------------
# spamguardd


class Spamguard:
    """``python -m spamguardd`` as Exim's peer, with its JSON log in a file."""

    def __init__(
        self, lab: EximLab, *, limit: str, query_listen: str | None, verdict: str = "freeze"
    ) -> None:
        self.lab = lab
        self.socket = lab.dir / "run" / "query.sock"
        self.state = lab.dir / "state"
        self.log = lab.dir / "spamguardd.daemon.log"
        self.config = lab.dir / "spamguardd.toml"
        server = [f'socket_group = "{EXIM_USER}"']
        if query_listen:
            server.append(f'query_listen = "{query_listen}"')
        self.config.write_text(
            f'[limits]\nfailed_recipients = "{limit}"\n[block]\nverdict = "{verdict}"\n'
            f"[server]\n{chr(10).join(server)}\n"
            f'[state]\ngroup = "{EXIM_USER}"\n[log]\nformat = "json"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def blocked(self) -> Path:
        """The block file Exim's fallback reads."""
        return self.state / "blocked"

    def start(self) -> None:
        """Start the daemon and wait until it answers ``ping``."""
        self.socket.parent.mkdir(exist_ok=True)
        os.chown(self.socket.parent, -1, grp.getgrnam(EXIM_USER).gr_gid)
        self.socket.parent.chmod(0o750)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spamguardd",
                    "--config",
                    str(self.config),
                    "--query-socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.state),
                    "--admin-socket",
                    str(self.socket.parent / "admin.sock"),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("spamguardd to answer ping", lambda: self.ask("ping") == "pong")

    def stop(self) -> None:
        """SIGTERM and wait; the daemon removes the socket file it bound."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the socket file stays behind with nobody listening, so a connect is refused."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None

    def ask(self, request: str) -> str | None:
        """One readsocket-style exchange; None when the daemon is not there."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.socket))
                sock.sendall(request.encode() + b"\n")
                sock.shutdown(socket.SHUT_WR)
                return sock.makefile("rb").read().decode().strip()
        except OSError:
            return None

    def is_blocked(self, user: str) -> bool:
        """Whether the daemon answers a block verdict for *user*."""
        answer = self.ask(f'check user="{user}"')
        return answer is not None and answer.startswith("freeze")


# ---------------------------------------------------------------------------------------------
# Exim

_MAIN_CONFIG: Final = """\
# Assembled by tests/eximlab.py from the shipped contrib/exim files.
SPAMGUARD_SOCKET = {spamguard_socket}
SPAMGUARD_BLOCKED = {blocked}
# bad recipients at {late} are found only at delivery time (event_action)
{extra_macros}
SPAMGUARD_CALLOUT = ${{if eq{{$domain}}{{{late}}}{{}}{{/callout=5s,defer_ok,use_sender}}}}
.include {contrib}/spamguardd-macros.conf

primary_hostname = exim-lab.test
qualify_domain = example.test
domainlist local_domains = example.test
hostlist relay_from_hosts = <; {relay_ip} ; {relay_net6}
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
local_interfaces = 127.0.0.1
tls_advertise_hosts =
daemon_smtp_ports = {port}
deliver_drop_privilege = true
log_selector = +smtp_connection +received_recipients +acl_warn_skipped
host_lookup = :
rfc1413_hosts = :
never_users = root
freeze_tell =
keep_environment =
acl_smtp_rcpt = acl_check_rcpt
acl_not_smtp = acl_check_not_smtp

begin acl

acl_check_rcpt:
.include {contrib}/spamguardd.conf
  accept hosts = +relay_from_hosts
  accept authenticated = *
  accept domains = +local_domains
         verify = recipient
  deny   message = relay not permitted

acl_check_not_smtp:
.include {contrib}/spamguardd-not-smtp.conf
  accept

begin routers

remote:
  driver = manualroute
  domains = ! +local_domains
  route_list = * 127.0.0.1
  self = send
  transport = remote_smtp
  no_more

local_users:
  driver = accept
  domains = +local_domains
  local_parts = ! ^bad : *
  transport = mailbox

begin transports

remote_smtp:
  driver = smtp
  port = {mx_port}
  hosts_try_fastopen = :
.include {contrib}/spamguardd-event.conf

mailbox:
  driver = appendfile
  file = {dir}/mail/$local_part_data
  user = {exim_user}

begin retry

*   *   F,2h,15m

begin authenticators

plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${{if eq{{$auth3}}{{{password}}}}}
  server_set_id = $auth2
"""


@attrs.define
class Sent:
    """What the Exim server said to one message."""

    refused: dict[str, tuple[int, bytes]]
    #: Queue id from the 250 after DATA, None when no recipient was accepted.
    message_id: str | None


class EximLab:
    """Exim + fake MX + spamguardd on loopback, all state in one scratch directory."""

    def __init__(
        self,
        *,
        limit: str = "3/1h",
        use_tcp: bool = False,
        keep: bool = False,
        macros: dict[str, str] | None = None,
        verdict: str = "freeze",
    ) -> None:
        self.exim = exim_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="eximlab-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.keep = keep
        #: Macros defined before spamguardd-macros.conf, as an admin would override them.
        self.macros = dict(macros or {})
        self.port = free_port()
        self.mx = FakeMX()
        self.tcp_port = free_port() if use_tcp else None
        listen = None if self.tcp_port is None else f"inet:127.0.0.1:{self.tcp_port}"
        self.spamguard = Spamguard(self, limit=limit, query_listen=listen, verdict=verdict)
        self.config = self.dir / "exim.conf"
        self.pidfile = self.dir / "exim.pid"

    @property
    def mainlog(self) -> Path:
        """Exim's main log: real log lines for log-reading tests."""
        return self.dir / "log" / "mainlog"

    @property
    def paniclog(self) -> Path:
        """Exim's panic log; it should never exist."""
        return self.dir / "log" / "paniclog"

    def build_config(self) -> None:
        """Write the test main configuration that ``.include``-s the shipped files."""
        user = pwd.getpwnam(EXIM_USER)
        for sub in ("spool", "log", "mail"):
            path = self.dir / sub
            path.mkdir(exist_ok=True)
            os.chown(path, user.pw_uid, user.pw_gid)
        socket_spec = (
            str(self.spamguard.socket)
            if self.tcp_port is None
            else f"inet:127.0.0.1:{self.tcp_port}"
        )
        self.config.write_text(
            _MAIN_CONFIG.format(
                spamguard_socket=socket_spec,
                blocked=self.spamguard.blocked,
                late=LATE_DOMAIN,
                contrib=CONTRIB,
                relay_ip=RELAY_IP,
                relay_net6=RELAY_NET6,
                extra_macros="\n".join(f"{k} = {v}" for k, v in self.macros.items()),
                dir=self.dir,
                port=self.port,
                mx_port=self.mx.port,
                exim_user=EXIM_USER,
                password=PASSWORD,
            )
        )

    def start(self) -> None:
        """Start the fake MX, spamguardd and the Exim daemon; wait until all accept."""
        self.build_config()
        self.mx.start()
        self.spamguard.start()
        self.run_exim("-bd", "-oX", str(self.port), "-oP", str(self.pidfile))
        wait_for("Exim to listen", self._exim_listens)

    def _exim_listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop everything and remove the scratch directory (unless *keep*).

        Waits for every Exim process of this lab (the daemon and any delivery it started, all
        run with ``-C`` this config) to end first: one still running would recreate its log or
        spool directory after the removal.
        """
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(self.pidfile.read_text().split()[0]), signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            wait_for("this lab's Exim processes to end", lambda: not self._exim_processes(), 15)
        self.spamguard.stop()
        self.mx.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _exim_processes(self) -> list[int]:
        """Pids of processes whose command line names this lab's config."""
        needle = os.fsencode(self.config)
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if needle in (entry / "cmdline").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
        return found

    # -- running Exim ---------------------------------------------------------------------

    def run_exim(self, *args: str, stdin: str | None = None, config: Path | None = None) -> str:
        """Run ``exim -C CONFIG ARGS`` and return its standard output (and error, for -bh)."""
        result = subprocess.run(
            [self.exim, "-C", str(config or self.config), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0 and "-bh" not in args:
            raise AssertionError(f"exim {args} failed: {result.stderr}")
        return result.stdout + (result.stderr if "-bh" in args else "")

    def host_test(self, ip: str, smtp: list[str], *extra: str, config: Path | None = None) -> str:
        """``exim -bh IP``: run the ACLs for an SMTP dialogue from *ip*; nothing is queued."""
        return self.run_exim("-bh", ip, *extra, stdin="\r\n".join(smtp) + "\r\n", config=config)

    def queue(self) -> str:
        """``exim -bp``: the queue listing, frozen messages marked ``*** frozen ***``."""
        return self.run_exim("-bp")

    def frozen_ids(self) -> list[str]:
        """``exiqgrep -z -i``: ids of the frozen messages."""
        result = subprocess.run(
            ["exiqgrep", "-C", str(self.config), "-z", "-i"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.split()

    def headers(self, message_id: str) -> str:
        """``exim -Mvh ID``: the spool header file of a queued message."""
        return self.run_exim("-Mvh", message_id)

    def wait_queue_settled(self, message_id: str) -> None:
        """Wait until *message_id* is frozen or has left the queue (delivered or bounced)."""
        wait_for(
            f"{message_id} to be frozen or delivered",
            lambda: message_id in self.frozen_ids() or message_id not in self.queue(),
        )

    # -- sending mail ---------------------------------------------------------------------

    def send(
        self,
        recipients: list[str],
        *,
        user: str | None = None,
        source_ip: str = "127.0.0.1",
        sender: str | None = None,
        subject: str = "test",
    ) -> Sent:
        """One message over real SMTP, one RCPT per recipient; AUTH PLAIN when *user* is given.

        Refused recipients are reported, not raised: a spammer's message goes ahead with the
        recipients that were accepted.
        """
        envelope = sender if sender is not None else f"{user or 'relay'}@example.test"
        with smtplib.SMTP(
            "127.0.0.1", self.port, source_address=(source_ip, 0), timeout=30
        ) as smtp:
            smtp.ehlo("client.test")
            if user is not None:
                smtp.login(user, PASSWORD)
            smtp.mail(envelope)
            refused: dict[str, tuple[int, bytes]] = {}
            for rcpt in recipients:
                code, text = smtp.rcpt(rcpt)
                if code >= 300:
                    refused[rcpt] = (code, text)
            if len(refused) == len(recipients):
                smtp.rset()
                return Sent(refused, None)
            body = f"From: {envelope}\r\nSubject: {subject}\r\n\r\nhello\r\n"
            code, text = smtp.data(body.encode())
            assert code == 250, (code, text)
            match = re.search(rb"id=(\S+)", text)
            return Sent(refused, match.group(1).decode() if match else None)

    def submit_local(self, recipients: list[str], *, login: str, subject: str = "test") -> str:
        """One message submitted on this host without SMTP, as ``sendmail -t`` from *login*'s
        script would (Exim's ``-oMt`` gives the caller's login, as only a trusted caller may),
        delivered at once (``-odi``); returns its queue id."""
        lines = [f"From: {login}@example.test", f"To: {', '.join(recipients)}"]
        message = "\n".join([*lines, f"Subject: {subject}", "", "hello", ""])
        self.run_exim("-odi", "-oMt", login, "-f", f"{login}@example.test", "-t", stdin=message)
        ids = re.findall(
            rf"(\S+) <= {re.escape(login)}@example.test U={re.escape(login)} ",
            self.mainlog.read_text(),
        )
        assert ids, f"no arrival from {login} in the main log"
        return str(ids[-1])


@contextlib.contextmanager
def running_lab(
    *,
    limit: str = "3/1h",
    use_tcp: bool = False,
    macros: dict[str, str] | None = None,
    verdict: str = "freeze",
) -> Iterator[EximLab]:
    """An :class:`EximLab` that is started and always stopped."""
    lab = EximLab(limit=limit, use_tcp=use_tcp, macros=macros, verdict=verdict)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
