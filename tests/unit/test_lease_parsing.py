"""Lease parsing: the fast paths for plain spellings give exactly what netaddr gives, and the rest
goes through netaddr (accepted or refused by it); the backend data is carried as it came, and only
its backend reads it."""

from __future__ import annotations

import netaddr
import pytest

from weftd.backend.vxlan import VtepData, canonical_mac
from weftd.lease import Lease, LeaseError, _ip, _net


@pytest.mark.parametrize("raw", ["10.3.4.5/24", "10.3.4.0/24", "0.0.0.0/0", "10.1.2.3/32", "fd00:1::5/64", "::/0",
                                 "fd00::1/128", "FD00:0:0::/48", "10.3.4.5", "10.244.0.0/016"])
def test_networks_as_netaddr_makes_them(raw: str) -> None:
    got, want = _net(raw), netaddr.IPNetwork(raw).cidr
    assert (got, str(got), got.version, got.prefixlen, hash(got)) == (want, str(want), want.version,
                                                                       want.prefixlen, hash(want))


@pytest.mark.parametrize("raw", ["10.1.2.3/33", "10.1.2.3/x", "10.1.2.3/-1", "fd00::/129", "x/24", "10.1/8/8", ""])
def test_bad_networks_refused(raw: str) -> None:
    with pytest.raises(netaddr.AddrFormatError):
        _net(raw)


@pytest.mark.parametrize("raw", ["192.168.3.4", "0.0.0.0", "fd00::1", "::ffff:1.2.3.4", "FE80::1"])
def test_addresses_as_netaddr_makes_them(raw: str) -> None:
    got, want = _ip(raw), netaddr.IPAddress(raw)
    assert (got, str(got), got.version) == (want, str(want), want.version)


@pytest.mark.parametrize("raw", ["02:aa:00:00:00:01", "02:AA:00:00:00:01", "02-aa-00-00-00-01", "02aa.0000.0001"])
def test_macs_canonical(raw: str) -> None:
    assert canonical_mac(raw) == "02:aa:00:00:00:01"


def test_unreadable_lease_refused() -> None:
    with pytest.raises(LeaseError):
        Lease.from_json({"Subnet": "10.0.0.0/24", "PublicIP": "300.1.1.1", "BackendType": "vxlan"})
    with pytest.raises(LeaseError, match="backend data must be a JSON object"):
        Lease.from_json({"Subnet": "10.0.0.0/24", "PublicIP": "10.1.1.1", "BackendType": "vxlan",
                         "BackendData": ["02:aa:00:00:00:01"]})


def test_backend_data_is_carried_as_it_came_and_read_by_its_backend() -> None:
    raw = {"Node": "n1", "Subnet": "10.0.0.0/24", "PublicIP": "10.1.1.1", "BackendType": "vxlan",
           "BackendData": {"VNI": 1, "VtepMAC": "02:AA:00:00:00:01", "Future": [1, 2]}}
    lease = Lease.from_json(raw)
    assert lease.attrs.backend_data == raw["BackendData"] and lease.to_json()["BackendData"] == raw["BackendData"]
    assert VtepData.from_json(lease.attrs.backend_data) == VtepData(1, "02:aa:00:00:00:01")
    bad = Lease.from_json({**raw, "BackendData": {"VtepMAC": "02:aa:00:00:00"}})
    with pytest.raises(ValueError):
        VtepData.from_json(bad.attrs.backend_data)
