"""Pure logic, without the kernel: range parsing, round-robin order, results, CNI_ARGS."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ipam.allocator import _candidates, allocate
from ipam.config import IPAMConfig, Range
from ipam.reservations import Owner, Reservations, parse_owner
from weftlib.cni.errors import CniError
from weftlib.cni.result import Result
from weftlib.cni.skel import parse_cni_args, validate_ifname


def _range(subnet: str, **kw: str) -> Range:
    return Range.parse({"subnet": subnet, **kw})


def test_range_defaults_follow_host_local() -> None:
    r = _range("10.1.2.0/24")
    assert (str(r.start), str(r.end), str(r.gateway)) == ("10.1.2.1", "10.1.2.254", "10.1.2.1")
    r6 = _range("fd00::/120")
    assert (str(r6.start), str(r6.end)) == ("fd00::1", "fd00::ff")


@pytest.mark.parametrize("subnet,words", [("10.0.0.1/24", "host bits"), ("10.0.0.0/31", "too small"),
                                          ("fd00::/127", "too small"), ("nope", "invalid subnet")])
def test_range_rejects(subnet: str, words: str) -> None:
    with pytest.raises(CniError) as e:
        _range(subnet)
    assert e.value.code == 7 and words in e.value.details


def test_round_robin_starts_after_last_and_wraps() -> None:
    rs = (_range("10.0.0.0/29"),)  # .1 (gateway) .. .6
    order = [str(ip) for ip, _ in _candidates(rs, ipaddress.ip_address("10.0.0.4"))]
    assert order == ["10.0.0.5", "10.0.0.6", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert next(str(ip) for ip, _ in _candidates(rs, None)) == "10.0.0.1"
    two = (_range("10.0.0.0/30"), _range("10.0.1.0/30"))
    assert [str(ip) for ip, _ in _candidates(two, ipaddress.ip_address("10.0.0.2"))] == [
        "10.0.1.1", "10.0.1.2", "10.0.0.1", "10.0.0.2"]


def test_allocation_skips_gateway_and_taken_and_is_idempotent(tmp_path: Path) -> None:
    rs = (_range("10.0.0.0/29"),)
    with Reservations(str(tmp_path), "n") as store:
        taken = store.all()
        got = [allocate(store, taken, rs, 0, f"c{i}", "eth0", [])[0] for i in range(5)]
        assert [str(ip) for ip in got] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        assert allocate(store, taken, rs, 0, "c1", "eth0", [])[0] == got[1]
        with pytest.raises(CniError) as e:
            allocate(store, taken, rs, 0, "c9", "eth0", [])
        assert e.value.code == 11 and "10.0.0.1-10.0.0.6" in e.value.details
        assert (tmp_path / "n" / "10.0.0.2").read_bytes() == b"c0\r\neth0"
        assert (tmp_path / "n" / "last_reserved_ip.0").read_text() == "10.0.0.6"


def test_corrupt_last_reserved_is_ignored(tmp_path: Path) -> None:
    rs = (_range("10.0.0.0/29"),)
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "last_reserved_ip.0").write_bytes(b"\xff garbage")
    with Reservations(str(tmp_path), "n") as store:
        assert str(allocate(store, store.all(), rs, 0, "c", "eth0", [])[0]) == "10.0.0.2"


def test_owner_parsing() -> None:
    assert parse_owner(b"abc\r\neth0") == Owner("abc", "eth0")
    assert parse_owner(b"abc") == Owner("abc", None)
    assert parse_owner(b"") is None and parse_owner(b"\xff\xfe") is None and parse_owner(b"a\r\nb\r\nc") is None


def test_requested_ip_and_ranges_from_runtime_config() -> None:
    conf = {"name": "n", "ipam": {"type": "weft-ipam", "subnet": "10.0.0.0/24"},
            "runtimeConfig": {"IPRanges": [[{"subnet": "10.9.0.0/24"}]], "IPs": ["10.9.0.7/24"]}}
    cfg = IPAMConfig.parse(conf)
    assert [str(rs[0].subnet) for rs in cfg.range_sets] == ["10.9.0.0/24", "10.0.0.0/24"]
    assert [str(ip) for ip in cfg.requested] == ["10.9.0.7"]


def test_result_round_trip_between_versions() -> None:
    raw = {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/x"}],
           "ips": [{"version": "4", "interface": 0, "address": "10.0.0.2/24", "gateway": "10.0.0.1"}],
           "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    r = Result.from_json(raw)
    assert r.to_json("0.3.1") == raw
    assert r.to_json("1.0.0")["ips"] == [{"interface": 0, "address": "10.0.0.2/24", "gateway": "10.0.0.1"}]
    with pytest.raises(CniError):
        Result.from_json({"ips": [{"address": "10.0.0.2/24", "interface": 3}]})


def test_cni_args_and_ifnames() -> None:
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a") == {"IgnoreUnknown": "1", "K8S_POD_NAME": "a"}
    for bad in ("A", "A=1=2", "=1"):
        with pytest.raises(CniError):
            parse_cni_args(bad)
    assert validate_ifname("eth0") is None
    for bad in ("", ".", "..", "a/b", "a b", "a:b", "x" * 16, "e\x01"):
        assert validate_ifname(bad) is not None
