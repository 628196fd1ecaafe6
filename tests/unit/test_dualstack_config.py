"""Dual stack and IPv6-only: the net-conf keys, the lease both families share, and how the stores cut and
read IPv6 subnets. Pure logic; tests/test_dualstack_cluster.py runs it on simulated nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import netaddr
import pytest

from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease
from weftd.subnet import StoreError
from weftd.subnet.etcd import subnet_key, subnets_from_key
from weftd.subnet.file import FileStore
from weftd.subnet.kube import ANN_DATA6, ANN_IP, ANN_IP6, lease_from_node, node_annotations, pod_cidrs

DUAL = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
V6ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}


def test_dual_stack_defaults_follow_flannel() -> None:
    net = NetworkConfig.parse(DUAL)
    assert net.ipv4 is not None and net.ipv6 is not None
    assert (net.ipv6.subnet_len, str(net.ipv6.subnet_min), str(net.ipv6.subnet_max)) == (
        64, "fd00:10:244:1::/64", "fd00:10:244:ff::/64")
    assert [str(n) for n in net.networks] == ["10.244.0.0/16", "fd00:10:244::/56"]
    # A network longer than /62: prefix + 2.
    assert NetworkConfig.parse({**DUAL, "IPv6Network": "fd00::/120"}).ipv6.subnet_len == 122  # type: ignore[union-attr]
    assert NetworkConfig.parse(json.loads(json.dumps(net.to_json()))) == net


def test_ipv6_only_and_the_disabled_family_is_ignored() -> None:
    net = NetworkConfig.parse({**V6ONLY, "Network": "not even a CIDR"})
    assert net.ipv4 is None and net.network is None and [str(n) for n in net.networks] == ["fd00:10:244::/56"]
    assert NetworkConfig.parse({"Network": "10.1.0.0/16", "IPv6Network": "bogus"}).ipv6 is None


def test_subnet_min_and_max_bound_the_allocation() -> None:
    net = NetworkConfig.parse({**V6ONLY, "IPv6SubnetMin": "fd00:10:244:10::", "IPv6SubnetMax": "fd00:10:244:11::"})
    assert net.ipv6 is not None
    assert [str(s) for s in net.ipv6.subnets()] == ["fd00:10:244:10::/64", "fd00:10:244:11::/64"]
    # Huge networks are never enumerated up front.
    big = NetworkConfig.parse({**V6ONLY, "IPv6Network": "fd00::/8"}).ipv6
    assert big is not None and str(next(iter(big.subnets()))) == "fd00:0:0:1::/64"


@pytest.mark.parametrize(("conf", "error"), [
    ({"EnableIPv4": False}, "both false"),
    ({"Network": "10.1.0.0/16", "EnableIPv6": True}, "IPv6Network is required"),
    ({**DUAL, "EnableIPv6": "yes"}, "EnableIPv6 must be true or false"),
    ({**DUAL, "IPv6Network": "10.9.0.0/16"}, "must be an IPv6 CIDR"),
    ({**DUAL, "IPv6Network": "fd00::1/64"}, "host bits"),
    ({**DUAL, "IPv6Network": "fd00::/125"}, "too small"),
    ({**DUAL, "IPv6SubnetLen": 56}, "IPv6SubnetLen 56 must be longer than /56"),
    ({**DUAL, "IPv6SubnetLen": 127}, "at most 126"),
    ({**DUAL, "IPv6SubnetMin": "fd00:10:244:1::1"}, "must be the start of a /64"),
    ({**DUAL, "IPv6SubnetMax": "fd00:99::"}, "inside fd00:10:244::/56"),
    ({**DUAL, "IPv6SubnetMin": "fd00:10:244:9::", "IPv6SubnetMax": "fd00:10:244:8::"}, "above IPv6SubnetMax"),
    ({"EnableIPv4": True, "EnableIPv6": True, "IPv6Network": "fd00::/48"}, "Network is required"),
])
def test_bad_config_is_a_clear_error(conf: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        NetworkConfig.parse(conf)


ATTRS = Attrs(netaddr.IPAddress("192.0.2.1"), "vxlan", {"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:01"},
              netaddr.IPAddress("2001:db8::1"), {"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:02"})


def test_one_lease_carries_both_families_in_flannels_fields() -> None:
    lease = Lease("n1", netaddr.IPNetwork("10.244.1.0/24"), ATTRS, netaddr.IPNetwork("fd00:10:244:1::/64"))
    raw = lease.to_json()
    assert raw["PublicIPv6"] == "2001:db8::1" and raw["BackendV6Data"] == {"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:02"}
    assert Lease.from_json(json.loads(lease.dumps())) == lease
    only6 = Lease("n2", None, Attrs(None, "host-gw", public_ipv6=netaddr.IPAddress("2001:db8::2")),
                  netaddr.IPNetwork("fd00:10:244:2::/64"))
    assert only6.to_json()["PublicIP"] is None and Lease.from_json(only6.to_json()) == only6
    # etcd keys: Flannel's, one key per node holding both subnets.
    key = subnet_key("/weft/network", lease)
    assert key == "/weft/network/subnets/10.244.1.0-24&fd00:10:244:1::-64"
    assert subnets_from_key(key) == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert subnets_from_key(subnet_key("/p", only6)) == (None, "fd00:10:244:2::/64")


@pytest.mark.parametrize("conf", [DUAL, V6ONLY])
def test_file_store_gives_each_node_a_subnet_per_family(tmp_path: Path, conf: dict[str, Any]) -> None:
    store = FileStore(tmp_path / "store.json", NetworkConfig.parse(conf))
    got = [store.acquire(n, ATTRS) for n in ("n1", "n2", "n3")]
    v6 = [str(le.ipv6_subnet) for le in got]
    assert v6 == ["fd00:10:244:1::/64", "fd00:10:244:2::/64", "fd00:10:244:3::/64"]
    assert [le.subnet is None for le in got] == [conf is V6ONLY] * 3
    assert store.acquire("n2", ATTRS) == got[1] and store.leases()["n3"] == got[2]  # kept across restarts


def test_file_store_adds_ipv6_to_a_node_that_had_only_ipv4(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    v4 = FileStore(path, NetworkConfig.parse({"Network": "10.244.0.0/16"})).acquire("n1", ATTRS)
    data = json.loads(path.read_text())
    data["config"] = NetworkConfig.parse(DUAL).to_json()  # the operator turned IPv6 on
    path.write_text(json.dumps(data))
    both = FileStore(path).acquire("n1", ATTRS)
    assert both.subnet == v4.subnet and str(both.ipv6_subnet) == "fd00:10:244:1::/64"


def node(cidrs: list[str], ann: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "w1", "annotations": ann or {}}, "spec": {"podCIDRs": cidrs}}


def test_kube_pod_cidrs_one_per_family() -> None:
    dual, only6 = NetworkConfig.parse(DUAL), NetworkConfig.parse(V6ONLY)
    both = ["10.244.3.0/24", "fd00:10:244:3::/64"]
    assert pod_cidrs(node(both), dual) == (netaddr.IPNetwork(both[0]), netaddr.IPNetwork(both[1]))
    assert pod_cidrs(node(both[::-1]), only6) == (None, netaddr.IPNetwork(both[1]))
    with pytest.raises(StoreError, match="IPv6 pod cidr not assigned"):
        pod_cidrs(node(both[:1]), dual)
    with pytest.raises(StoreError, match="more than one IPv6 pod cidr"):
        pod_cidrs(node([*both, "fd00:10:244:4::/64"]), dual)
    with pytest.raises(StoreError, match="pod cidr fd00:99::/64 is outside the cluster network fd00:10:244::/56"):
        pod_cidrs(node(["10.244.3.0/24", "fd00:99::/64"]), dual)


def test_kube_annotations_carry_the_ipv6_address_and_data() -> None:
    ann = node_annotations(ATTRS)
    assert ann[ANN_IP6] == "2001:db8::1"
    assert json.loads(ann[ANN_DATA6] or "") == {"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:02"}
    lease = lease_from_node(node(["10.244.3.0/24", "fd00:10:244:3::/64"], {k: v for k, v in ann.items() if v}),
                            NetworkConfig.parse(DUAL))
    assert lease is not None and lease.attrs == ATTRS and str(lease.ipv6_subnet) == "fd00:10:244:3::/64"
    # An IPv6-only node publishes no IPv4 address: the annotation is removed, not left stale.
    only6 = node_annotations(Attrs(None, "host-gw", public_ipv6=netaddr.IPAddress("2001:db8::1")))
    assert only6[ANN_IP] is None and only6[ANN_IP6] == "2001:db8::1"
