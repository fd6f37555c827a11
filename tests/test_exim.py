"""The shipped Exim integration against a real Exim 4.96, a fake remote MX and spamguardd.

Every test sends real SMTP (or runs ``exim -bh``) through a configuration that ``.include``-s the
files in ``contrib/exim/`` and looks at the real queue. With the lab's limit of 3/1h the third
failed recipient of a user blocks it. A missing Exim fails these tests; they never skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eximlab import (
    CONTRIB,
    FOREIGN_IP,
    LATE_DOMAIN,
    PASSWORD,
    RELAY_IP,
    EximLab,
    exim_binary,
    running_lab,
    wait_for,
)


def assert_frozen_for(lab: EximLab, message_id: str | None, user: str) -> None:
    """*message_id* is in the frozen queue and carries the header naming *user*."""
    assert message_id is not None
    lab.wait_queue_settled(message_id)
    assert message_id in lab.frozen_ids()
    assert re.search(rf"{message_id} <[^>]*> \*\*\* frozen \*\*\*", lab.queue())
    assert f"X-Spamguard-User: {user}\n" in lab.headers(message_id)


def assert_delivered(lab: EximLab, message_id: str | None, rcpt: str) -> None:
    assert message_id is not None
    wait_for(f"{rcpt} to reach the fake MX", lambda: lab.mx.delivered_to(rcpt))
    lab.wait_queue_settled(message_id)
    assert message_id not in lab.frozen_ids()


def no_panic(lab: EximLab) -> None:
    assert not lab.paniclog.exists(), lab.paniclog.read_text()


class TestCounting:
    def test_authenticated_user_is_frozen_after_n_failed_recipients(
        self, exim_lab: EximLab
    ) -> None:
        """Failures 1-2 pass, the 3rd blocks: that message and the next are frozen with the
        header, the block file holds the user, and another user's mail is delivered."""
        lab = exim_lab
        # a remote harvested address (callout) and a local unknown user (routing): 2 failures
        first = lab.send(
            ["ok1@remote.test", "bad1@remote.test", "bad2@example.test"], user="Mallory"
        )
        assert sorted(first.refused) == ["bad1@remote.test", "bad2@example.test"]
        assert first.refused["bad1@remote.test"][0] == 550
        assert b"Callout verification failed" in first.refused["bad1@remote.test"][1]
        assert first.refused["bad2@example.test"] == (550, b"Unrouteable address")
        assert_delivered(lab, first.message_id, "ok1@remote.test")
        assert not lab.spamguard.is_blocked("auth:mallory")

        tripping = lab.send(["ok2@remote.test", "bad3@remote.test"], user="Mallory")
        assert list(tripping.refused) == ["bad3@remote.test"]
        # the key is case-folded: the user logged in as "Mallory"
        assert_frozen_for(lab, tripping.message_id, "auth:mallory")
        assert '"auth:mallory": blocked_at=' in lab.spamguard.blocked.read_text()

        following = lab.send(["ok3@remote.test"], user="MALLORY")
        assert following.refused == {}
        assert_frozen_for(lab, following.message_id, "auth:mallory")

        other = lab.send(["friend@remote.test", "bad1@remote.test"], user="alice")
        assert_delivered(lab, other.message_id, "friend@remote.test")
        assert not lab.mx.delivered_to("ok2@remote.test")
        assert set(lab.frozen_ids()) == {tripping.message_id, following.message_id}
        no_panic(lab)

    def test_relay_host_is_keyed_by_ip_over_tcp(self) -> None:
        """A relay host without AUTH is counted as ip:ADDRESS, here through the daemon's
        loopback TCP listener (SPAMGUARD_SOCKET = inet:127.0.0.1:PORT)."""
        with running_lab(use_tcp=True) as lab:
            sent = lab.send(
                ["ok@remote.test", "bad1@remote.test", "bad2@remote.test", "bad3@example.test"],
                source_ip=RELAY_IP,
            )
            assert len(sent.refused) == 3
            assert_frozen_for(lab, sent.message_id, f"ip:{RELAY_IP}")
            assert f'"ip:{RELAY_IP}": blocked_at=' in lab.spamguard.blocked.read_text()
            # an authenticated user from the same machine is someone else
            other = lab.send(["ok2@remote.test"], user="alice", source_ip=RELAY_IP)
            assert_delivered(lab, other.message_id, "ok2@remote.test")
            no_panic(lab)

    def test_ipv6_clients_are_grouped_by_64(self, exim_lab: EximLab) -> None:
        """Two addresses of one IPv6 /64 share a key (exim -bh runs the same ACL)."""
        lab = exim_lab
        for host, rcpt in [("2001:db8:1:2::5", "bad1"), ("2001:db8:1:2:ff::9", "bad2")]:
            smtp = ["EHLO v6.test", "MAIL FROM:<u@v6.test>", f"RCPT TO:<{rcpt}@example.test>"]
            output = lab.host_test(host, [*smtp, "QUIT"])
            assert "550 Unrouteable address" in output
        assert not lab.spamguard.is_blocked("ip:2001.0db8.0001.0002.0000.0000.0000.0000/64")
        smtp = ["EHLO v6.test", "MAIL FROM:<u@v6.test>", "RCPT TO:<bad3@example.test>", "QUIT"]
        lab.host_test("2001:db8:1:2:abcd::1", smtp)
        assert lab.spamguard.is_blocked("ip:2001.0db8.0001.0002.0000.0000.0000.0000/64")

    def test_bounces_are_not_counted(self, exim_lab: EximLab) -> None:
        """A null-sender message is not verified here and its failures are not counted."""
        lab = exim_lab
        sent = lab.send(
            ["ok@remote.test", "bad1@remote.test", "bad2@remote.test", "bad3@remote.test"],
            user="mailer",
            sender="",
        )
        assert sent.refused == {}
        assert sent.message_id is not None
        wait_for("delivery", lambda: lab.mx.delivered_to("ok@remote.test"))
        lab.wait_queue_settled(sent.message_id)
        assert not lab.spamguard.is_blocked("auth:mailer")
        # Exim itself freezes a bounce it cannot deliver; that is not a spamguardd freeze
        if sent.message_id in lab.frozen_ids():
            assert "X-Spamguard-User" not in lab.headers(sent.message_id)

    def test_incoming_mail_is_not_counted(self, exim_lab: EximLab) -> None:
        """Mail from a foreign host to a local user is the admin's ACL's business only."""
        lab = exim_lab
        sent = lab.send(
            ["alice@example.test", "bad1@example.test", "bad2@example.test", "bad3@example.test"],
            source_ip=FOREIGN_IP,
        )
        assert len(sent.refused) == 3
        assert not lab.spamguard.is_blocked(f"ip:{FOREIGN_IP}")
        assert sent.message_id is not None
        lab.wait_queue_settled(sent.message_id)
        assert lab.frozen_ids() == []

    @pytest.mark.parametrize(
        ("verdict", "answer"),
        [
            ("reject", (550, b"sending suspended: too many failed recipients")),
            ("defer", (451, b"sending temporarily suspended, try later")),
        ],
    )
    def test_reject_and_defer_verdicts(self, verdict: str, answer: tuple[int, bytes]) -> None:
        """With block.verdict = reject or defer the blocked user's recipients get 550 / 451."""
        with running_lab(verdict=verdict) as lab:
            lab.send(["bad1@remote.test", "bad2@remote.test", "bad3@remote.test"], user="eve")
            sent = lab.send(["ok@remote.test"], user="eve")
            assert sent.refused == {"ok@remote.test": answer}
            assert lab.frozen_ids() == []

    def test_main_log_records_refusals_and_the_freeze(
        self, exim_lab: EximLab, exim_mainlog: Path
    ) -> None:
        """The log lines docs/exim.md shows are what Exim writes (and log readers get)."""
        sent = exim_lab.send(
            ["ok@remote.test", "bad1@remote.test", "bad2@remote.test", "bad3@remote.test"],
            user="mallory",
        )
        assert sent.message_id is not None
        exim_lab.wait_queue_settled(sent.message_id)
        log = exim_mainlog.read_text()
        assert re.search(
            r"A=plain:mallory rejected RCPT <bad1@remote\.test>: Callout verification failed:", log
        )
        assert log.count("spamguardd: freezing message from auth:mallory") == 1
        assert f"{sent.message_id} frozen by ACL" in log


class TestDaemonDown:
    def test_block_file_keeps_a_blocked_user_frozen(self, exim_lab: EximLab) -> None:
        """With the daemon stopped, the ACL reads the block file: the blocked user is still
        frozen, an unknown user's mail is accepted and delivered, nothing is counted."""
        lab = exim_lab
        lab.send(["bad1@remote.test", "bad2@remote.test", "bad3@remote.test"], user="mallory")
        assert lab.spamguard.is_blocked("auth:mallory")
        lab.spamguard.stop()
        assert lab.spamguard.ask("ping") is None

        frozen = lab.send(["ok@remote.test", "bad4@remote.test"], user="mallory")
        assert_frozen_for(lab, frozen.message_id, "auth:mallory")
        unknown = lab.send(["ok@remote.test", "bad4@remote.test"], user="alice")
        assert list(unknown.refused) == ["bad4@remote.test"]  # still verified and refused
        assert_delivered(lab, unknown.message_id, "ok@remote.test")
        log = lab.mainlog.read_text()
        assert "spamguardd: daemon unreachable, using the block file for this connection" in log
        no_panic(lab)

    def test_fail_closed_defers_while_the_daemon_is_down(self) -> None:
        """SPAMGUARD_WHEN_DOWN = defer: outgoing recipients get 451 until the daemon is back."""
        with running_lab(macros={"SPAMGUARD_WHEN_DOWN": "defer"}) as lab:
            lab.spamguard.stop()
            sent = lab.send(["ok@remote.test"], user="alice")
            assert sent.refused == {
                "ok@remote.test": (451, b"sending temporarily suspended, try later")
            }
            lab.spamguard.start()
            again = lab.send(["ok@remote.test"], user="alice")
            assert_delivered(lab, again.message_id, "ok@remote.test")

    @pytest.mark.parametrize(("when_down", "code"), [("accept", 250), ("defer", 451)])
    def test_unreadable_block_file_fails_open(self, when_down: str, code: int) -> None:
        """A block file Exim's group cannot read (a restore, a chgrp) is treated like a down
        daemon: no 451 for everyone, a log line naming the file; 451 only when fail closed."""
        with running_lab(macros={"SPAMGUARD_WHEN_DOWN": when_down}) as lab:
            lab.send(["bad1@remote.test", "bad2@remote.test", "bad3@remote.test"], user="mallory")
            assert lab.spamguard.is_blocked("auth:mallory")
            lab.spamguard.stop()
            os.chown(lab.spamguard.blocked, 0, 0)
            lab.spamguard.blocked.chmod(0o600)
            sent = lab.send(["ok@remote.test"], user="alice")
            if code == 250:
                assert sent.refused == {}
                assert_delivered(lab, sent.message_id, "ok@remote.test")
            else:
                assert sent.refused == {
                    "ok@remote.test": (451, b"sending temporarily suspended, try later")
                }
            log = lab.mainlog.read_text()
            assert "Temporary local problem" not in log
            assert (
                f"spamguardd: daemon unreachable, and Exim cannot read {lab.spamguard.blocked}: "
                "nobody is frozen for this connection"
            ) in log
            no_panic(lab)


@contextlib.contextmanager
def a_daemon_that_dies_with_every_query(path: Path) -> Iterator[list[bytes]]:
    """On *path*, a listener that reads each request and closes without an answer, as a daemon
    does that crashes or fails its start with the query in hand; yields the requests seen."""
    seen: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    path.chmod(0o666)
    listener.listen(16)
    listener.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    seen.append(conn.recv(4096))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        listener.close()
        path.unlink()


class TestDaemonDiesWithTheQuery:
    """Exim reads a connection closed or reset without an answer as an empty answer, not as a
    failure (docs/exim-facts.md): the ACL must take it as an unreachable daemon, not let the
    mail of a blocked user through."""

    def test_rcpt_acl_falls_back_to_the_block_file(self, exim_lab: EximLab) -> None:
        lab = exim_lab
        lab.send(["bad1@remote.test", "bad2@remote.test", "bad3@remote.test"], user="mallory")
        assert lab.spamguard.is_blocked("auth:mallory")
        lab.spamguard.stop()
        with a_daemon_that_dies_with_every_query(lab.spamguard.socket) as seen:
            frozen = lab.send(["ok@remote.test"], user="mallory")
            assert_frozen_for(lab, frozen.message_id, "auth:mallory")
            other = lab.send(["ok@remote.test"], user="alice")
            assert_delivered(lab, other.message_id, "ok@remote.test")
        assert seen
        assert all(request.startswith(b"rcpt user=") for request in seen)
        log = lab.mainlog.read_text()
        assert "spamguardd: daemon unreachable, using the block file for this connection" in log
        no_panic(lab)

    def test_not_smtp_acl_falls_back_to_the_block_file(self, exim_lab: EximLab) -> None:
        lab = exim_lab
        lab.submit_local([f"bad{i}@remote.test" for i in range(3)], login="www-data")
        wait_for("the block", lambda: lab.spamguard.is_blocked("uid:www-data"))
        lab.spamguard.stop()
        with a_daemon_that_dies_with_every_query(lab.spamguard.socket) as seen:
            frozen = lab.submit_local(["friend@remote.test"], login="www-data")
            assert_frozen_for(lab, frozen, "uid:www-data")
        assert seen == [b'check user="uid:www-data"\n']
        assert "using the block file for this message" in lab.mainlog.read_text()
        no_panic(lab)


def messages_in_one_session(lab: EximLab, count: int) -> list[int]:
    """Send *count* messages over one SMTP connection, each with a bad and a good recipient;
    return the reply code to each good RCPT (stops at the first 421)."""
    codes = []
    smtp = smtplib.SMTP("127.0.0.1", lab.port, timeout=30)
    try:
        smtp.ehlo("client.test")
        smtp.login("alice", PASSWORD)
        for n in range(count):
            smtp.mail("alice@example.test")
            assert smtp.rcpt(f"bad{n}@example.test")[0] == 550
            code = smtp.rcpt(f"ok{n}@remote.test")[0]
            codes.append(code)
            if code == 421:
                break
            assert smtp.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
    return codes


class TestStaleDescriptor:
    """Exim 4.96 reuses a closed descriptor after a failed Unix-socket connect
    (docs/exim-facts.md §1.4). The ACL never asks a Unix socket whose file is gone, and the
    daemon removes the file it bound when it stops: only a socket file left behind by a killed
    daemon that was not socket-activated still gets the refused connect."""

    def test_tcp_listener_keeps_a_multi_message_session_clean(self) -> None:
        """With SPAMGUARD_SOCKET = inet:..., a stopped daemon costs nothing but counting."""
        with running_lab(use_tcp=True) as lab:
            lab.spamguard.stop()
            assert messages_in_one_session(lab, 3) == [250, 250, 250]
            no_panic(lab)

    def test_a_stopped_daemon_leaves_no_socket_and_sessions_stay_clean(self) -> None:
        """A clean stop removes the socket file; the ACL then uses the block file without a
        readsocket, and a session of several messages goes through."""
        with running_lab() as lab:
            lab.spamguard.stop()
            assert not lab.spamguard.socket.exists()
            assert messages_in_one_session(lab, 3) == [250, 250, 250]
            log = lab.mainlog.read_text()
            assert "spamguardd: daemon unreachable, using the block file for this connection" in log
            no_panic(lab)

    def test_refused_unix_socket_breaks_the_next_message_of_the_session(self) -> None:
        """The documented Exim bug, with a socket file nobody listens on (a killed daemon
        without socket activation): the 2nd message of the session gets 421 (temporary, the
        client retries; nothing is lost). If this starts failing, Exim has been fixed."""
        with running_lab() as lab:
            lab.spamguard.kill()
            assert lab.spamguard.socket.exists()
            assert messages_in_one_session(lab, 2) == [250, 421]
            assert "failed to write to reject log" in lab.paniclog.read_text()


class TestDeliveryTimeFailures:
    def test_rejection_at_delivery_is_reported_and_counted_once(self, exim_lab: EximLab) -> None:
        """A recipient accepted at RCPT time (no callout for late.test) and refused by the
        remote MX at delivery reaches the daemon through event_action; the same recipient
        failing again counts once; with two RCPT-time failures the user is blocked."""
        lab = exim_lab
        late = f"bad@{LATE_DOMAIN}"
        for _ in range(2):
            sent = lab.send(["ok@remote.test", late], user="mallory")
            assert sent.refused == {}
            assert sent.message_id is not None
            lab.wait_queue_settled(sent.message_id)
        wait_for("the bounce in the main log", lambda: f"** {late}" in lab.mainlog.read_text())
        assert lab.mx.rcpt_log.count(late) == 2
        lab.send(["bad1@remote.test"], user="mallory")
        assert not lab.spamguard.is_blocked("auth:mallory")  # 1 delivery + 1 RCPT failure
        lab.send(["bad2@remote.test"], user="mallory")
        assert lab.spamguard.is_blocked("auth:mallory")
        no_panic(lab)


class TestLocalSubmissions:
    def test_a_web_script_spraying_harvested_addresses_is_counted_blocked_and_frozen(
        self, exim_lab: EximLab
    ) -> None:
        """sendmail -t from www-data's script to harvested addresses: the recipients the remote
        MX refuses at delivery are counted under uid:www-data until it is blocked; its next
        message is frozen, another local user's is not."""
        lab = exim_lab
        spray = [f"bad{i}@remote.test" for i in range(3)] + ["ok@remote.test"]
        first = lab.submit_local(spray, login="www-data")
        lab.wait_queue_settled(first)
        wait_for("three refusals to be counted", lambda: lab.spamguard.is_blocked("uid:www-data"))
        assert_delivered(lab, first, "ok@remote.test")  # submitted before the block: delivered
        frozen = lab.submit_local(["friend@remote.test"], login="www-data")
        assert_frozen_for(lab, frozen, "uid:www-data")
        other = lab.submit_local(["friend2@remote.test"], login="alice")
        assert_delivered(lab, other, "friend2@remote.test")
        assert not lab.spamguard.is_blocked("uid:alice")
        assert "spamguardd: freezing message from uid:www-data" in lab.mainlog.read_text()
        no_panic(lab)

    def test_block_file_freezes_a_blocked_local_user_while_the_daemon_is_down(
        self, exim_lab: EximLab
    ) -> None:
        """With the daemon stopped the non-SMTP ACL reads the block file, as the RCPT ACL does."""
        lab = exim_lab
        lab.submit_local([f"bad{i}@remote.test" for i in range(3)], login="www-data")
        wait_for("the block", lambda: lab.spamguard.is_blocked("uid:www-data"))
        lab.spamguard.stop()
        frozen = lab.submit_local(["friend@remote.test"], login="www-data")
        assert_frozen_for(lab, frozen, "uid:www-data")
        other = lab.submit_local(["friend2@remote.test"], login="alice")
        assert_delivered(lab, other, "friend2@remote.test")
        assert "using the block file for this message" in lab.mainlog.read_text()
        no_panic(lab)

    def test_the_daemons_own_notices_and_bounces_are_left_alone(self, exim_lab: EximLab) -> None:
        """uid:spamguardd (the daemon's notices) is never counted, even to refused recipients."""
        lab = exim_lab
        notice = lab.submit_local([f"bad{i}@remote.test" for i in range(4)], login="spamguardd")
        lab.wait_queue_settled(notice)
        assert not lab.spamguard.is_blocked("uid:spamguardd")
        assert "uid:spamguardd" not in lab.spamguard.log.read_text()


class TestSessionFuse:
    def test_the_fuse_drops_the_connection_after_n_failures(self) -> None:
        """SPAMGUARD_SESSION_FUSE = 2: two refused recipients in one connection, across two
        messages, and the next RCPT drops the connection before the daemon is asked; the
        daemon counted the two it saw."""
        with running_lab(
            limit="10/1h",
            macros={"SPAMGUARD_SESSION_FUSE": "2", "SPAMGUARD_FUSE_DELAY": "0s"},
        ) as lab:
            with smtplib.SMTP("127.0.0.1", lab.port, timeout=30) as smtp:
                smtp.ehlo("client.test")
                smtp.login("mallory", PASSWORD)
                smtp.mail("mallory@example.test")
                assert smtp.rcpt("bad1@remote.test")[0] == 550
                smtp.rset()  # a new message: Exim's own $rcpt_fail_count starts again
                smtp.mail("mallory@example.test")
                assert smtp.rcpt("bad2@remote.test")[0] == 550
                code, text = smtp.rcpt("ok@remote.test")
                assert (code, text) == (550, b"too many failed recipients in this connection")
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    smtp.noop()
            shown = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "spamguardd.ctl",
                    "--socket",
                    str(lab.spamguard.socket.parent / "admin.sock"),
                    "--json",
                    "show",
                    "auth:mallory",
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            assert '"counted": 2' in shown
            log = lab.mainlog.read_text()
            assert "dropped the connection of auth:mallory after 2 failed recipients" in log
            assert "ok@remote.test" not in lab.mx.rcpt_log  # no callout for the dropped RCPT
            no_panic(lab)

    def test_off_by_default(self, exim_lab: EximLab) -> None:
        """Without the macro no connection is dropped, however many recipients fail; each is
        refused for good (550), the ninth and later too: the count of failures is decimal
        (``${eval:08+1}`` would read an octal 08 and answer 451)."""
        bad = [f"bad{i}@example.test" for i in range(12)]
        sent = exim_lab.send([*bad, "ok@remote.test"], user="alice")
        assert list(sent.refused) == bad
        assert {code for code, _ in sent.refused.values()} == {550}
        assert sent.message_id is not None


class TestDebian:
    @pytest.mark.parametrize("flavour", ["unsplit", "split"])
    def test_wrapper_acl_against_debians_generated_config(
        self, exim_lab: EximLab, flavour: str
    ) -> None:
        """acl_spamguardd_rcpt as MAIN_ACL_CHECK_RCPT of update-exim4.conf's output, under
        exim -bh: unknown recipients are refused and counted, the 3rd freezes, Debian's own
        ACL still accepts good ones and refuses relaying for a foreign host.

        unsplit: Debian's configuration as installed, the macro given with -D. split: a copy of
        /etc/exim4 switched to the split files, the macro in conf.d/main/000_localmacros as
        docs/exim.md says (update-exim4.conf reads the unsplit localmacros file only from
        /etc/exim4, whatever --confdir says, so that flavour cannot be tested from a copy).
        """
        lab = exim_lab
        acl = lab_acl(lab)
        debian = lab.dir / "debian.conf"
        update = shutil.which("update-exim4.conf") or "/usr/sbin/update-exim4.conf"
        defines: list[str] = []
        if flavour == "unsplit":
            subprocess.run([update, "--output", str(debian)], check=True, timeout=60)
            defines = [f"-DMAIN_ACL_CHECK_RCPT={acl}"]
        else:
            confdir = lab.dir / "exim4"
            shutil.copytree("/etc/exim4", confdir)
            settings = confdir / "update-exim4.conf.conf"
            settings.write_text(
                re.sub(
                    r"^dc_use_split_config=.*$",
                    "dc_use_split_config='true'",
                    settings.read_text(),
                    flags=re.MULTILINE,
                )
            )
            (confdir / "conf.d" / "main" / "000_localmacros").write_text(
                f"MAIN_ACL_CHECK_RCPT = {acl}\n"
            )
            subprocess.run(
                [update, "--confdir", str(confdir), "--output", str(debian)],
                check=True,
                timeout=60,
            )
        auth = ["-oMaa", "PLAIN", "-oMai", "Mallory"]
        smtp = ["EHLO client.test", "MAIL FROM:<mallory@localhost>"]
        rcpts = [f"RCPT TO:<nosuch{i}@localhost>" for i in range(3)]
        output = lab.host_test(
            "127.0.0.1",
            [*smtp, *rcpts, "RCPT TO:<postmaster@localhost>", "QUIT"],
            *defines,
            *auth,
            config=debian,
        )
        replies = re.findall(r"^(\d{3})[ -].*$", output, re.MULTILINE)
        assert output.count("550 Unrouteable address") == 3, output
        assert "spamguardd: freezing message from auth:mallory" in output
        assert lab.spamguard.is_blocked("auth:mallory")
        assert replies[-2] == "250", output  # postmaster accepted by Debian's ACL
        foreign = lab.host_test(
            "192.0.2.9",
            ["EHLO far.test", "MAIL FROM:<x@far.test>", "RCPT TO:<x@elsewhere.example>", "QUIT"],
            *defines,
            config=debian,
        )
        assert "550 relay not permitted" in foreign

    def test_local_submissions_are_keyed_by_unix_user(self, exim_lab: EximLab) -> None:
        """exim -bs without a client address: Debian's empty relay_from_hosts item makes it
        outgoing, and the key is uid:NAME of the submitting user, never the empty ip:. The
        daemon's own user is never counted; postmaster stays reachable for a blocked user."""
        lab = exim_lab
        debian, defines = debian_config(lab)
        rcpts = [f"RCPT TO:<nosuch{i}@localhost>" for i in range(3)]

        def local_smtp(*extra: str, lines: list[str]) -> str:
            return lab.run_exim(
                *defines, "-bs", *extra, stdin="\r\n".join(lines) + "\r\n", config=debian
            )

        smtp = ["EHLO localhost", "MAIL FROM:<root@localhost>"]
        output = local_smtp(lines=[*smtp, *rcpts, "QUIT"])
        assert output.count("550 Unrouteable address") == 3, output
        assert lab.spamguard.is_blocked("uid:root")
        assert not lab.spamguard.is_blocked("ip:")
        # the daemon's notices come as uid:spamguardd: never counted, even with bad recipients
        own = local_smtp("-oMt", "spamguardd", lines=[*smtp, *rcpts, "QUIT"])
        assert "freezing" not in own
        assert not lab.spamguard.is_blocked("uid:spamguardd")
        # a blocked user still reaches postmaster: not asked about, not frozen
        to_postmaster = local_smtp(lines=[*smtp, "RCPT TO:<postmaster@localhost>", "QUIT"])
        assert re.search(r"^250 Accepted", to_postmaster, re.MULTILINE), to_postmaster
        assert "freezing" not in to_postmaster


def lab_acl(lab: EximLab) -> Path:
    """The shipped Debian ACL file with its socket and block file pointed at the lab's (and
    nothing else changed)."""
    text = (CONTRIB / "acl_spamguardd_rcpt").read_text()
    assert "{/run/spamguardd/query.sock}" in text
    assert "{/var/lib/spamguardd/blocked}" in text
    acl = lab.dir / "acl_spamguardd_rcpt"
    acl.write_text(
        text.replace("/run/spamguardd/query.sock", str(lab.spamguard.socket)).replace(
            "/var/lib/spamguardd/blocked", str(lab.spamguard.blocked)
        )
    )
    acl.chmod(0o644)
    return acl


def debian_config(lab: EximLab) -> tuple[Path, list[str]]:
    """Debian's generated configuration (unsplit) and the -D that points it at the shipped ACL
    file (:func:`lab_acl`)."""
    acl = lab_acl(lab)
    debian = lab.dir / "debian.conf"
    update = shutil.which("update-exim4.conf") or "/usr/sbin/update-exim4.conf"
    subprocess.run([update, "--output", str(debian)], check=True, timeout=60)
    # -bs logs like a real submission: into the lab's log directory, not the machine's
    debian.write_text(f"log_file_path = {lab.dir}/log/%slog\n" + debian.read_text())
    return debian, [f"-DMAIN_ACL_CHECK_RCPT={acl}"]


class TestShippedFiles:
    def test_debian_acl_is_the_include_with_the_default_macros(self) -> None:
        """acl_spamguardd_rcpt cannot use macros; it must stay spamguardd.conf with the
        defaults of spamguardd-macros.conf filled in, followed by the hand-over."""
        debian = statements((CONTRIB / "acl_spamguardd_rcpt").read_text())
        assert debian == with_default_macros("spamguardd.conf") + (
            "require acl = acl_check_rcpt\naccept\n"
        )

    def test_debian_not_smtp_acl_is_the_include_with_the_default_macros(self) -> None:
        """acl_spamguardd_not_smtp is spamguardd-not-smtp.conf with the defaults filled in."""
        debian = statements((CONTRIB / "acl_spamguardd_not_smtp").read_text())
        assert debian == with_default_macros("spamguardd-not-smtp.conf") + "accept\n"

    def test_exim_is_installed(self) -> None:
        """The integration tests need a real Exim; its absence is a failure, not a skip."""
        assert Path(exim_binary()).exists()


def with_default_macros(include: str) -> str:
    """The statements of the shipped *include* with spamguardd-macros.conf's defaults filled in,
    as the Debian files (which cannot use macros) must hold them."""
    macros = dict(
        re.findall(
            r"^(SPAMGUARD_\w+) = (.*)$",
            (CONTRIB / "spamguardd-macros.conf").read_text(),
            re.MULTILINE,
        )
    )
    text = statements((CONTRIB / include).read_text())
    for name in sorted(macros, key=len, reverse=True):
        text = text.replace(name, macros[name])
    return text


def statements(text: str) -> str:
    """The non-comment, non-blank lines of an Exim configuration fragment."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(lines) + "\n"


def test_demo_tells_the_story() -> None:
    """``make demo`` runs to the end: block, frozen queue, fallback, release."""
    result = subprocess.run(
        [sys.executable, str(CONTRIB.parent / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    story = result.stdout
    assert "user_blocked user=auth:mallory reason='5 failed recipients within 1h'" in story
    assert "*** frozen ***" in story
    assert "with the daemon stopped the message is frozen" in story
    assert re.search(r"here: exim -Mt \S+; exim -M \S+ -> delivered", story)
