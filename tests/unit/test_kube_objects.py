"""The kube subnet manager's logic, against Node objects recorded from a kind cluster.

Pure logic, no API server: podCIDR handling, the annotations weftd reads and sends, the watch
cache. tests/test_kube.py runs the same code against a real kube-apiserver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import netaddr
import pytest
from kubernetes import client

from weftd.backend.vxlan import VtepData
from weftd.config import NetworkConfig
from weftd.lease import Attrs
from weftd.subnet import StoreError
from weftd.subnet.kube import ANN_DATA, ANN_IP, ANN_MANAGED, KubeStore, lease_from_node, node_record

RECORDED = json.loads((Path(__file__).parent / "data" / "kind-nodes.json").read_text())
NET = NetworkConfig.parse({"Network": "10.244.0.0/16"})


def vxlan_attrs(ip: str, mac: str) -> Attrs:
    return Attrs(netaddr.IPAddress(ip), "vxlan", VtepData(1, mac).to_json())


class Response:
    """An answer read unparsed (_preload_content=False), as weftd reads every Node."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = json.dumps(obj).encode()


class StubAPI:
    """Returns recorded objects and records what weftd sends."""

    def __init__(self) -> None:
        self.api_client = client.ApiClient()
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def read_node(self, name: str, **kwargs: Any) -> Any:
        assert kwargs.get("_preload_content") is False
        for n in RECORDED["items"]:
            if n["metadata"]["name"] == name:
                return Response(n)
        raise client.ApiException(status=404, reason="Not Found")

    def patch_node_status(self, name: str, body: dict[str, Any], **_: Any) -> None:
        self.patches.append((name, body))


def test_leases_from_recorded_nodes() -> None:
    by_name = {n["metadata"]["name"]: lease_from_node(n, NET) for n in RECORDED["items"]}
    cp = by_name["weft-control-plane"]
    assert cp is not None and str(cp.subnet) == "10.244.0.0/24" and str(cp.public_ip) == "172.18.0.3"
    assert VtepData.from_json(cp.attrs.backend_data) == VtepData(1, "0a:58:0a:f4:00:01")
    worker = by_name["weft-worker"]
    # Dual-stack podCIDRs: the IPv4 one; an operator's public-ip-overwrite wins; MACs are normalised.
    assert worker is not None and str(worker.subnet) == "10.244.1.0/24"
    worker_vtep = VtepData.from_json(worker.attrs.backend_data)
    assert str(worker.public_ip) == "203.0.113.7" and worker_vtep is not None and worker_vtep.mac == "0a:58:0a:f4:01:01"
    assert by_name["weft-worker2"] is None  # not (yet) running weftd
    assert by_name["weft-worker3"] is None  # no podCIDR allocated yet


def test_node_record_keeps_what_weftd_reads() -> None:
    worker = RECORDED["items"][1]
    record = node_record(worker)
    assert record["metadata"]["name"] == "weft-worker" and record["spec"]["podCIDRs"] == worker["spec"]["podCIDRs"]
    kept = record["metadata"]["annotations"]
    assert kept and all(k.startswith("weft.dev/") for k in kept)
    assert "status" not in record and "labels" not in record["metadata"]
    assert lease_from_node(record, NET) == lease_from_node(worker, NET)


def test_acquire_patches_status_annotations() -> None:
    api = StubAPI()
    mgr = KubeStore(NET, api=api, watch=False)  # no watch thread against the stub
    attrs = vxlan_attrs("172.18.0.4", "0a:58:0a:f4:02:01")
    lease = mgr.acquire("weft-worker2", attrs)
    assert str(lease.subnet) == "10.244.2.0/24"
    (name, body), = api.patches
    ann = body["metadata"]["annotations"]
    assert name == "weft-worker2" and ann[ANN_MANAGED] == "true" and ann[ANN_IP] == "172.18.0.4"
    assert json.loads(ann[ANN_DATA]) == {"VNI": 1, "VtepMAC": "0a:58:0a:f4:02:01"}


def test_acquire_without_pod_cidr_or_outside_the_network() -> None:
    mgr = KubeStore(NET, api=StubAPI())
    with pytest.raises(StoreError, match="pod cidr not assigned"):
        mgr.acquire("weft-worker3", vxlan_attrs("172.18.0.5", "0a:58:0a:f4:03:01"))
    other = KubeStore(NetworkConfig.parse({"Network": "10.0.0.0/16"}), api=StubAPI())
    with pytest.raises(StoreError, match="outside the cluster network"):
        other.acquire("weft-worker", vxlan_attrs("172.18.0.2", "0a:58:0a:f4:01:01"))


def test_watch_cache_follows_events() -> None:
    mgr = KubeStore(NET, api=StubAPI())
    with pytest.raises(StoreError, match="not synced"):
        mgr.leases()
    mgr.replace_all(iter(RECORDED["items"]))
    assert sorted(mgr.leases()) == ["weft-control-plane", "weft-worker"]
    joined = json.loads(json.dumps(RECORDED["items"][2]))
    joined["metadata"]["annotations"].update({ANN_MANAGED: "true", "weft.dev/backend-type": "vxlan",
                                              ANN_DATA: '{"VNI": 1, "VtepMAC": "0a:58:0a:f4:02:01"}',
                                              ANN_IP: "172.18.0.4"})
    mgr.apply("MODIFIED", joined)
    assert sorted(mgr.leases()) == ["weft-control-plane", "weft-worker", "weft-worker2"]
    mgr.apply("DELETED", RECORDED["items"][1])
    assert sorted(mgr.leases()) == ["weft-control-plane", "weft-worker2"]
