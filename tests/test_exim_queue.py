"""Reading Exim's queue listing and spool headers, and calling Exim without a shell."""

from __future__ import annotations

import pytest

from spamguardd.tools.exim_queue import (
    EximQueue,
    QueuedMessage,
    parse_acl_variables,
    parse_queue,
    parse_spool_headers,
)

SPOOL_HEADER = """\
1xX8Rv-0003Wh-0a-H
root 0 0
<mallory@example.com>
1795833963 0
-frozen 1795833963
XX
1
victim@example.org

177P Received: from root by test.example with local (Exim 4.96)
\t(envelope-from <mallory@example.com>)
\tid 1xX8Rv-0003Wh-0a
012  Subject: hi
030* X-Spamguard-User: auth:other
043  X-Spamguard-User: auth:mallory@example.com
"""


class TestEximParsing:
    def test_queue_listing(self) -> None:
        """exim -bp lines give ids and whether each message is frozen."""
        listing = (
            " 0m   347 1xX8Rv-0003Wh-0a <mallory@example.com> *** frozen ***\n"
            "          victim@example.org\n\n"
            "25h  1.2K 1xX8Rv-0003Wk-0e <> \n"
            "          D alice@example.org\n"
        )
        assert list(parse_queue(listing)) == [
            QueuedMessage("1xX8Rv-0003Wh-0a", frozen=True),
            QueuedMessage("1xX8Rv-0003Wk-0e", frozen=False),
        ]

    def test_spool_headers_skip_deleted(self) -> None:
        """Headers are unfolded, and one Exim marked deleted (*) does not count."""
        headers = parse_spool_headers(SPOOL_HEADER)
        assert ("X-Spamguard-User", "auth:mallory@example.com") in headers
        assert ("X-Spamguard-User", "auth:other") not in headers
        assert headers[0][1].endswith("id 1xX8Rv-0003Wh-0a")

    def test_acl_variables_are_read_by_length(self) -> None:
        """Values are taken by their stated length: empty ones, ones holding newlines, and a
        value that looks like another variable's line stay what they are."""
        data = (
            b"1xYhZu-0004VX-1P-H\nDebian-exim 102 105\n<m@example.test>\n1796207326 0\n"
            b"--aclm _sg_user 12\nauth:mallory\n-aclm _sg_frozen 1\n1\n"
            b'-aclm _sg 46\nfreeze reason="3 failed recipients within 1h"\n\n'
            b"-aclm _sg_vmsg 0\n\n-aclm _x 18\n-aclm _sg_user 3\nx\n"
            b"-aclc _sg_fails 1\n3\n-frozen 1796207326\nXX\n1\nok@remote.test\n\n"
            b"031  X-Spamguard-User: auth:carol\n"
        )
        assert parse_acl_variables(data) == {
            "acl_m_sg_user": b"auth:mallory",
            "acl_m_sg_frozen": b"1",
            "acl_m_sg": b'freeze reason="3 failed recipients within 1h"\n',
            "acl_m_sg_vmsg": b"",
            "acl_m_x": b"-aclm _sg_user 3\nx",
            "acl_c_sg_fails": b"3",
        }

    def test_command_is_split_not_shelled(self) -> None:
        """The Exim command is split into argv with shell quoting rules, and never run by one."""
        assert EximQueue("exim -C '/etc/exim4/my conf'").argv == [
            "exim",
            "-C",
            "/etc/exim4/my conf",
        ]
        with pytest.raises(ValueError, match="empty"):
            EximQueue("  ")
        with pytest.raises(ValueError, match="not an Exim message id"):
            EximQueue("exim").thaw("x; rm -rf /")
