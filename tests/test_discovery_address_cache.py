"""Addresses in records are parsed once (core/records.py): the cache is bounded and changes no
verdict (a malformed or unusable address is refused every time it comes)."""

from __future__ import annotations

import ipaddress

import pytest

from zmqfabric.constants import ADDRESS_CACHE
from zmqfabric.core.records import _parsed_address, _valid_address, address_in_scope
from zmqfabric.errors import RemoteProtocolError


def test_a_flood_of_distinct_addresses_stays_within_the_cache() -> None:
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for i in range(3 * ADDRESS_CACHE):
        address = str(ipaddress.IPv4Address(base + i))
        assert _valid_address("n", address) == address
        assert address_in_scope(address, ("10.0.0.0/16",)) is (i < 65536)
    assert _parsed_address.cache_info().currsize <= ADDRESS_CACHE
    assert address_in_scope.cache_info().currsize <= ADDRESS_CACHE


@pytest.mark.parametrize("address", ["224.0.0.251", "0.0.0.0", "300.1.1.1", "x", "::ffff:1.2.3"])
def test_an_unusable_address_is_refused_every_time(address: str) -> None:
    for _ in range(3):  # the second and third time from the cache, if cached
        with pytest.raises(RemoteProtocolError):
            _valid_address("n", address)


def test_a_written_form_is_made_canonical_from_the_cache_too() -> None:
    for _ in range(2):
        assert _valid_address("n", "::FFFF:7f00:1") == "::ffff:7f00:1"
        assert address_in_scope("127.0.0.9", ("127.0.0.0/8",))
        with pytest.raises(ValueError):
            address_in_scope("bad", ("127.0.0.0/8",))
