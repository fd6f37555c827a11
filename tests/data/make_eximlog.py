"""Regenerate ``tests/data/exim/``: main and reject logs written by a real Exim.

The replay tests read what Exim itself writes, never hand-made lines. This script runs Debian's
Exim (4.96) as a loopback daemon with its own configuration (below), a fake remote MX that refuses
some recipients, and a scripted set of SMTP sessions: authenticated submissions with odd ids (real
``AUTH PLAIN``), relaying by IP over IPv4 and IPv6 (``-bs -oMa`` for a relay in 2001:db8::/32),
recipients failed at RCPT time (unroutable, callout refused, cached callout failure), and failures
found only at delivery (a router ``:fail:`` and a 550 from the fake MX after acceptance).

Another capture repeats the traffic with spamguardd itself answering the ACL (``mainlog-live``):
its logged verdicts are what a replay must reproduce. The fleet capture runs two Exims side by
side (``fleet/relay-a/``, ``fleet/relay-b/``), each with its own spool and logs, and a spammer
spraying through both.

Run as root (``exim -C`` keeps root only for root), with the interpreter of the checkout's
virtualenv (the live capture starts ``python -m spamguardd``):
``.venv/bin/python tests/data/make_eximlog.py [main|selectors|live|fleet ...]`` (all by
default). A new capture changes the times and message ids in the logs, so the golden outputs of
the replay (``tests/test_replay_golden.py``) must be written again and their diff reviewed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import shutil
import smtplib
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

EXIM = "/usr/sbin/exim4"
OUT = Path(__file__).parent / "exim"
SMTP_PORT = 2547
MX_PORT = 2548

CONFIG = r"""
primary_hostname = relay.example.test
qualify_domain = example.test
domainlist local_domains = example.test
hostlist relay_from_hosts = <; 127.0.0.1 ; ::1 ; 2001:db8::/32
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
local_interfaces = <; 127.0.0.1 ; ::1
daemon_smtp_ports = {smtp_port}
deliver_drop_privilege = true
log_selector = {log_selector}
log_timezone = {log_timezone}
host_lookup = :
rfc1413_hosts = :
never_users = root
freeze_tell =
keep_environment =
acl_smtp_rcpt = acl_check_rcpt

begin acl

{acl}
begin routers

latefail:
  driver = redirect
  domains = latefail.test
  no_verify
  allow_fail
  data = :fail: mailbox unknown (discovered at delivery time)

latefail_verify:
  driver = accept
  domains = latefail.test
  verify_only

fake_remote:
  driver = manualroute
  domains = callout.test : remote.test
  route_list = * 127.0.0.1
  self = send
  transport = fake_remote_smtp
  no_more

local_users:
  driver = accept
  domains = +local_domains
  local_parts = alice : bob
  transport = local_file

begin transports

local_file:
  driver = appendfile
  file = {dir}/mail/$local_part_data
  user = Debian-exim

fake_remote_smtp:
  driver = smtp
  port = {mx_port}
  hosts_try_fastopen = :

begin retry

*   *   F,2h,15m

begin authenticators

plain_server:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${{if eq{{$auth3}}{{secret}}}}
  server_set_id = $auth2
"""


# Exim's own verification and rejection, as most configurations do it.
REQUIRE_ACL = r"""acl_check_rcpt:
  accept hosts = !+relay_from_hosts
         !authenticated = *
         domains = +local_domains
         verify = recipient
  deny   hosts = !+relay_from_hosts
         !authenticated = *
         message = relay not permitted
  # no callout for remote.test: its bad recipients are found only at delivery
  require verify = recipient/defer_ok\
                   ${if eq{$domain}{remote.test}{}{/callout=5s,defer_ok}}
  accept
"""

# The same, asking spamguardd on the way: the user key exactly as contrib/exim/acl_spamguardd_rcpt
# computes it, the verdict logged (``spamguardd: ... reply=...``) so that a replay can be checked
# against the live daemon. Exim 4.96 logs "Taint mismatch, Ustrncpy: string_is_ip_addressX" and
# drops the session when ``isip6``/``${mask:}`` meet the address ``-bs -oMa`` sets, so the live
# capture has no 2001:db8 relay; over real SMTP (the ::1 client) it works.
LIVE_ACL = r"""acl_check_rcpt:
  warn   set acl_m_vfy  = ok
         set acl_m_vmsg =
         set acl_m_user = ${if def:authenticated_id {auth:${lc:$authenticated_id}}\
           {ip:${if isip6{$sender_host_address}\
                {${mask:$sender_host_address/64}}{$sender_host_address}}}}
  accept hosts = !+relay_from_hosts
         !authenticated = *
         domains = +local_domains
         verify = recipient
  deny   hosts = !+relay_from_hosts
         !authenticated = *
         message = relay not permitted
  warn   !verify = recipient/defer_ok${if eq{$domain}{remote.test}{}{/callout=5s,defer_ok}}
         set acl_m_vfy  = fail
         set acl_m_vmsg = $acl_verify_message
  warn   set acl_m_sg = ${readsocket{@SOCKET@}\
           {rcpt user=${quote:$acl_m_user} rcpt=${quote:$local_part@$domain} \
            verify=$acl_m_vfy ip=$sender_host_address\n}{2s}{}{SOCKFAIL}}
         logwrite = spamguardd: user=${quote:$acl_m_user} rcpt=$local_part@$domain \
           verify=$acl_m_vfy reply=${sg{$acl_m_sg}{\n}{}}
  warn   condition = ${if match{$acl_m_sg}{\N^freeze\b\N}}
         control = freeze/no_tell
  deny   condition = ${if eq{$acl_m_vfy}{fail}}
         message = $acl_m_vmsg
  accept
"""

#: The daemon's limit in the live capture: low enough for the scripted spammer to reach.
LIVE_LIMIT = "5/1h"


class _FakeMx(socketserver.StreamRequestHandler):
    """A remote MX: refuses local parts starting with ``bad``, accepts the rest."""

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 mx.remote.test ESMTP")
        while raw := self.rfile.readline():
            line = raw.decode("latin-1").strip()
            verb = line[:4].upper()
            if verb in {"EHLO", "HELO"}:
                self.reply("250 mx.remote.test")
            elif verb == "RCPT":
                address = line.partition(":")[2].strip().strip("<>")
                if address.startswith("bad"):
                    self.reply(f"550 5.1.1 <{address}>: no such user here")
                else:
                    self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 go ahead")
                while self.rfile.readline() not in {b".\r\n", b".\n", b""}:
                    pass
                self.reply("250 OK queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 OK")


def _send(  # noqa: PLR0913 - the knobs of one SMTP session
    host: str,
    rcpts: list[str],
    *,
    user: str | None = None,
    sender: str = "sender@example.test",
    helo: str = "client.test",
    port: int = SMTP_PORT,
) -> None:
    """One message over SMTP: AUTH PLAIN as *user* (if any), then every recipient, then DATA."""
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=30) as smtp:
        smtp.ehlo()
        if user is not None:
            token = base64.b64encode(b"\0" + user.encode() + b"\0secret").decode()
            code, text = smtp.docmd("AUTH", "PLAIN " + token)
            if code != 235:
                raise RuntimeError(f"AUTH as {user!r}: {code} {text!r}")
        smtp.mail(sender)
        accepted = [rcpt for rcpt in rcpts if smtp.rcpt(rcpt)[0] == 250]
        if accepted:
            smtp.data(b"Subject: test\r\n\r\nhello\r\n")


def _send_bs(conf: Path, address: str, rcpts: list[str], *auth: str) -> None:
    """One message through ``exim -bs`` as if from *address* (``-oMaa``/``-oMai`` in *auth*)."""
    proc = subprocess.Popen(
        [EXIM, "-C", str(conf), "-bs", "-oMa", address, *auth],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None

    def say(line: str | None) -> None:
        if line is not None:
            proc.stdin.write(line + "\r\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        while (answer := proc.stdout.readline()) and answer[3:4] == "-":  # type: ignore[union-attr]
            pass

    say(None)
    say("EHLO client.test")
    say("MAIL FROM:<relay@example.test>")
    for rcpt in rcpts:
        say(f"RCPT TO:<{rcpt}>")
    say("DATA")
    say("Subject: test\r\n\r\nhello\r\n.")
    say("QUIT")
    proc.wait(timeout=30)


@contextlib.contextmanager
def _fake_mx() -> Iterator[None]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", MX_PORT), _FakeMx) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown()


def _traffic(conf: Path) -> None:
    # legitimate users with the odd typo
    _send("127.0.0.1", ["alice@example.test", "nobody@example.test"], user="alice@example.test")
    _send("127.0.0.1", ["bob@example.test", "good@remote.test"], user="Mixed.Case@Example.TEST")
    # odd ids: spaces and quotes, a backslash, a colon, UTF-8
    _send("127.0.0.1", ["ghost@example.test", "alice@example.test"], user='we ird "q"')
    _send("127.0.0.1", ["bob@example.test", "x@nowhere.test"], user="back\\slash")
    _send("127.0.0.1", ["bob@example.test", "y@nowhere.test"], user="colon:in:id")
    _send("127.0.0.1", ["bob@example.test", "z@nowhere.test"], user="caf\u00e9@example.test")
    # a mixed-case login of the same account must count as the same user
    _send("127.0.0.1", ["nobody2@example.test", "bob@example.test"], user="ALICE@example.test")
    # delivery-time failures: a router :fail: and a 550 from the remote MX after acceptance
    _send("127.0.0.1", ["late@latefail.test", "bob@example.test"], user="alice@example.test")
    _send("127.0.0.1", ["badlate@remote.test", "good@remote.test"], user="carol@example.test")
    # relays by address, v4 and v6; the 2001:db8:1:2::/64 hosts are one user
    # an address literal as HELO name: logged as H=([192.0.2.99]) [127.0.0.1]
    _send("127.0.0.1", ["bob@example.test", "nope@example.test"], helo="[192.0.2.99]")
    _send("::1", ["bob@example.test", "nope6@example.test"])
    _send_bs(conf, "2001:db8:1:2::5", ["bob@example.test", "v6a@example.test"])
    _send_bs(conf, "2001:db8:1:2::77", ["v6b@example.test", "alice@example.test"])
    # a spammer: callout refusals (the second run hits Exim's callout cache), unroutable guesses,
    # then more mail that still gets through
    rounds = [
        ["bad1@callout.test", "bad2@callout.test", "ok1@callout.test", "lost1@example.test"],
        ["bad1@callout.test", "bad3@callout.test", "lost2@example.test", "lost3@example.test"],
        ["alice@example.test", "bad4@callout.test", "lost4@example.test", "ok2@callout.test"],
        ["bob@example.test", "ok3@callout.test", "badlate2@remote.test"],
    ]
    for rcpts in rounds:
        _send("127.0.0.1", rcpts, user="spammer@example.test", sender="promo@example.test")
        time.sleep(1.1)  # distinct timestamps, as a real run would have


def _prepare(
    work: Path, acl: str = REQUIRE_ACL, *, port: int = SMTP_PORT, **settings: object
) -> Path:
    for sub in ("spool", "log", "mail"):
        (work / sub).mkdir()
        shutil.chown(work / sub, "Debian-exim", "Debian-exim")
    shutil.chown(work, "Debian-exim", "Debian-exim")
    conf = work / "exim.conf"
    text = CONFIG.format(dir=work, smtp_port=port, mx_port=MX_PORT, acl=acl, **settings)
    conf.write_text(text.replace("@SOCKET@", str(work / "spamguardd.sock")))
    return conf


def _capture_main(work: Path, *, live: bool = False) -> None:
    """The main fixture: Exim's default line format plus connections and recipients.

    With *live*, spamguardd (this checkout, run by this interpreter) answers the ACL, with
    ``failed_recipients = LIVE_LIMIT``; the logs go to ``*-live``.
    """
    conf = _prepare(
        work,
        LIVE_ACL if live else REQUIRE_ACL,
        log_selector="+smtp_connection +received_recipients",
        log_timezone="false",
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fake_mx())
        if live:
            stack.enter_context(_spamguardd(work))
        pidfile = work / "exim.pid"
        subprocess.run([EXIM, "-C", str(conf), "-bd", "-oY", "-oP", str(pidfile)], check=True)
        try:
            time.sleep(0.5)
            _traffic(conf)
            subprocess.run([EXIM, "-C", str(conf), "-qf"], check=True)  # flush deliveries
            time.sleep(2)
        finally:
            subprocess.run(["kill", pidfile.read_text().strip()], check=False)
    suffix = "-live" if live else ""
    for name in ("mainlog", "rejectlog"):
        shutil.copyfile(work / "log" / name, OUT / (name + suffix))


@contextlib.contextmanager
def _spamguardd(work: Path) -> Iterator[None]:
    config = work / "spamguardd.toml"
    config.write_text(
        f'[limits]\nfailed_recipients = "{LIVE_LIMIT}"\n'
        f'[server]\nquery_socket = "{work / "spamguardd.sock"}"\nsocket_group = "Debian-exim"\n'
        f'[state]\ndir = "{work / "state"}"\n[log]\nformat = "json"\n'
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spamguardd", "--config", str(config)],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if (work / "spamguardd.sock").exists():
                break
            time.sleep(0.05)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def _capture_selectors(work: Path) -> None:
    """Every optional prefix at once: fractions of a second, a zone, the process id."""
    conf = _prepare(work, log_selector="+pid +millisec +incoming_port", log_timezone="true")
    auth = ("-oMaa", "plain_server", "-oMai", "Sel.User@Example.test")
    _send_bs(conf, "192.0.2.25.4321", ["bob@example.test", "gone@example.test"], *auth)
    shutil.copyfile(work / "log" / "mainlog", OUT / "mainlog-selectors")


#: The two relays of the fleet capture: name -> SMTP port. They share the fake MX.
FLEET = {"relay-a": SMTP_PORT, "relay-b": SMTP_PORT + 2}


def _fleet_traffic() -> None:
    """A fleet's traffic: a spammer sprays through both relays, neither of which alone sees
    enough failures for ``5/1h``; a legitimate user writes through both."""
    a, b = FLEET["relay-a"], FLEET["relay-b"]
    _send("127.0.0.1", ["alice@example.test", "nobody@example.test"], user="alice", port=a)
    _send("127.0.0.1", ["bob@example.test", "good@remote.test"], user="alice", port=b)
    rounds = [
        (a, ["bad1@callout.test", "lost1@example.test", "ok1@callout.test"]),
        (b, ["bad2@callout.test", "lost2@example.test", "ok2@callout.test"]),
        # bad1 again: relay-a's callout cache answers, and the policy counts it once
        (a, ["bad3@callout.test", "bad1@callout.test", "ok3@callout.test"]),
        # badlate is accepted and refused by the remote MX at delivery, on relay-b
        (b, ["lost3@example.test", "badlate@remote.test", "ok4@callout.test"]),
        (a, ["bob@example.test", "ok5@callout.test"]),
        (b, ["alice@example.test", "ok6@callout.test"]),
    ]
    for port, rcpts in rounds:
        _send("127.0.0.1", rcpts, user="spammer", sender="promo@example.test", port=port)
        time.sleep(1.1)  # distinct timestamps, as a real run would have


def _capture_fleet(work: Path) -> None:
    """Two Exims side by side, each with its own spool and logs: ``fleet/<relay>/``."""
    work.chmod(0o755)  # Exim's user goes through it to each relay's directory
    confs = {}
    for name, port in FLEET.items():
        (work / name).mkdir()
        conf = _prepare(
            work / name,
            port=port,
            log_selector="+smtp_connection +received_recipients",
            log_timezone="false",
        )
        conf.write_text(conf.read_text().replace("relay.example.test", f"{name}.example.test"))
        confs[name] = conf
    with _fake_mx():
        for name, conf in confs.items():
            pidfile = work / name / "exim.pid"
            subprocess.run([EXIM, "-C", str(conf), "-bd", "-oY", "-oP", str(pidfile)], check=True)
        try:
            time.sleep(0.5)
            _fleet_traffic()
            for conf in confs.values():
                subprocess.run([EXIM, "-C", str(conf), "-qf"], check=True)
            time.sleep(2)
        finally:
            for name in confs:
                pid = (work / name / "exim.pid").read_text().strip()
                subprocess.run(["kill", pid], check=False)
    for name in FLEET:
        (OUT / "fleet" / name).mkdir(parents=True, exist_ok=True)
        for log in ("mainlog", "rejectlog"):
            shutil.copyfile(work / name / "log" / log, OUT / "fleet" / name / log)


CAPTURES = {
    "main": _capture_main,
    "selectors": _capture_selectors,
    "live": lambda work: _capture_main(work, live=True),
    "fleet": _capture_fleet,
}


def main() -> int:
    """Capture the logs into ``tests/data/exim/``: every capture, or those named."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("captures", nargs="*", metavar="CAPTURE", help=", ".join(CAPTURES))
    names = parser.parse_args().captures or list(CAPTURES)
    if unknown := set(names) - set(CAPTURES):
        parser.error(f"no such capture: {', '.join(sorted(unknown))}")
    if Path("/proc/self").owner() != "root":
        print("run as root: exim -C keeps root only for root", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix="eximlog.") as tmp:
            CAPTURES[name](Path(tmp))
        print(f"captured {name} into {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
