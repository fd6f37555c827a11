"""User keys typed by an admin become the keys the shipped ACL writes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamguardd.core.userkey import fold_auth_id, ip_key, normalise


class TestNormalise:
    @pytest.mark.parametrize(
        ("typed", "key"),
        [
            ("auth:Mallory@Example.COM", "auth:mallory@example.com"),
            ("auth:\u00c4BC", "auth:\u00c4bc"),  # ${lc:} folds ASCII only
            ("ip:2001:db8:1:2::5", "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64"),
            ("ip:2001:DB8:1:2::/64", "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64"),
            ("ip:::ffff:192.0.2.7", "ip:192.0.2.7"),
            (
                "ip:2001.0db8.0001.0002.0000.0000.0000.0005/64",
                "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64",
            ),
        ],
    )
    def test_rewritten(self, typed: str, key: str) -> None:
        """Keys typed another way are rewritten to the ACL's form, and say so."""
        result = normalise(typed)
        assert result.key == key
        assert result.changed

    @pytest.mark.parametrize(
        "typed",
        [
            "auth:mallory@example.com",
            "ip:192.0.2.7",
            "ip:2001.0db8.0001.0002.0000.0000.0000.0000/64",
            "uid:www-data",
            "uid:Web",  # Unix names are case-sensitive: left alone
            "ip:not-an-address",
            "ip:192.0.2.0/24",
            "something:else",
        ],
    )
    def test_left_alone(self, typed: str) -> None:
        """Keys already in the ACL's form, and keys it cannot mean, are used as typed."""
        result = normalise(typed)
        assert result.key == typed
        assert not result.changed

    @given(st.text())
    def test_idempotent(self, typed: str) -> None:
        """Normalising a normalised key changes nothing."""
        once = normalise(typed).key
        assert normalise(once).key == once

    @given(st.ip_addresses(v=6))
    def test_every_address_of_a_64_has_one_key(self, address: ipaddress.IPv6Address) -> None:
        """Any address of a /64 and the /64 itself give the same key."""
        network = ipaddress.IPv6Network(f"{address}/64", strict=False)
        if address.ipv4_mapped is None:
            assert normalise(f"ip:{address}").key == normalise(f"ip:{network}").key
            assert ip_key(address) == normalise(f"ip:{address}").key


def test_fold_is_ascii_only() -> None:
    """Only A-Z are lowered, as C's tolower() in Exim's C locale does."""
    assert fold_auth_id("ÄÖÜ-ABC") == "ÄÖÜ-abc"
