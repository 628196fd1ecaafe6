"""Every store keeps the leases it parsed: a round parses again only the records that changed since the last
one (weftd.subnet.LeaseCache). Counted in parses, on each store with recorded objects; no server."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_kube_objects import NET, RECORDED, StubAPI
from weftd.config import NetworkConfig
from weftd.lease import Lease
from weftd.subnet.etcd import EtcdStore, subnet_key
from weftd.subnet.file import FileStore
from weftd.subnet.kube import ANN_IP_OVERWRITE, KubeStore

NETWORK = NetworkConfig.parse({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})


def lease_json(i: int, ip: str | None = None) -> dict[str, Any]:
    return {"Node": f"n{i}", "Subnet": f"10.244.{i}.0/24", "PublicIP": ip or f"192.168.77.{10 + i}",
            "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": f"02:00:00:00:00:{i:02x}"}}


def test_file_store_parses_only_changed_leases(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store.json", NETWORK)
    path = tmp_path / "store.json"
    data = json.loads(path.read_text())
    data["leases"] = {f"n{i}": lease_json(i) for i in range(1, 6)}
    path.write_text(json.dumps(data))
    assert sorted(store.leases()) == [f"n{i}" for i in range(1, 6)]
    assert store.cache.parses == 5
    assert len(store.leases()) == 5 and store.cache.parses == 5  # nothing changed: nothing parsed
    data["leases"]["n2"] = lease_json(2, "192.168.77.99")
    data["leases"]["n6"] = lease_json(6)
    del data["leases"]["n5"]
    path.write_text(json.dumps(data))
    leases = store.leases()
    assert store.cache.parses == 7  # the changed one and the new one
    assert sorted(leases) == ["n1", "n2", "n3", "n4", "n6"] and str(leases["n2"].public_ip) == "192.168.77.99"


def test_kube_store_parses_only_changed_nodes() -> None:
    store = KubeStore(NET, api=StubAPI(), watch=False)
    store.replace_all(iter(RECORDED["items"]))
    assert sorted(store.leases()) == ["weft-control-plane", "weft-worker"]
    first = store.cache.parses
    assert first == len(RECORDED["items"])  # the unmanaged and unallocated nodes are parsed (and passed over) too
    assert sorted(store.leases()) == ["weft-control-plane", "weft-worker"] and store.cache.parses == first
    moved = json.loads(json.dumps(RECORDED["items"][0]))
    moved["metadata"]["resourceVersion"] = "2000"
    moved["metadata"]["annotations"][ANN_IP_OVERWRITE] = "203.0.113.9"
    store.apply("MODIFIED", moved)
    leases = store.leases()
    assert store.cache.parses == first + 1
    assert str(leases["weft-control-plane"].public_ip) == "203.0.113.9"
    assert str(leases["weft-worker"].public_ip) == "203.0.113.7"
    store.apply("DELETED", RECORDED["items"][1])
    assert sorted(store.leases()) == ["weft-control-plane"] and store.cache.parses == first + 1
    beat = json.loads(json.dumps(moved))  # a status heartbeat: nothing weftd reads changed
    beat["metadata"]["resourceVersion"] = "2001"
    beat["status"] = {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-12-07T23:00:00Z"}]}
    store.apply("MODIFIED", beat)
    assert sorted(store.leases()) == ["weft-control-plane"] and store.cache.parses == first + 1


class RecordedEtcd:
    """etcd3gw's Etcd3Client as the store uses it, over recorded keys: get() and get_prefix() with metadata."""

    def __init__(self, **_: Any) -> None:
        self.kv: dict[str, tuple[str, int]] = {"/weft/network/config": (json.dumps(NETWORK.to_json()), 1)}

    def get(self, key: str, metadata: bool = False) -> list[Any]:
        return [self.kv[key][0]] if key in self.kv else []

    def get_prefix(self, prefix: str) -> list[tuple[bytes, dict[str, Any]]]:
        return [(value.encode(), {"key": key.encode(), "create_revision": str(rev), "mod_revision": str(rev)})
                for key, (value, rev) in sorted(self.kv.items()) if key.startswith(prefix)]


def test_etcd_store_parses_only_changed_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module (the package's attribute `client` is a function of that name).
    monkeypatch.setattr(importlib.import_module("etcd3gw.client"), "Etcd3Client", RecordedEtcd)
    store = EtcdStore("http://192.0.2.1:2379")
    client: RecordedEtcd = store.client  # type: ignore[assignment]
    put = {i: Lease.from_json(lease_json(i)) for i in range(1, 6)}
    for i, lease in put.items():
        client.kv[subnet_key(store.prefix, lease)] = (lease.dumps(), 10 + i)
    client.kv["/weft/network/subnets/10.244.99.0-24"] = ("not json", 20)
    assert sorted(store.leases()) == [f"n{i}" for i in range(1, 6)]
    assert store.cache.parses == 6
    assert len(store.leases()) == 5 and store.cache.parses == 6
    changed = Lease.from_json(lease_json(3, "192.168.77.99"))
    client.kv[subnet_key(store.prefix, changed)] = (changed.dumps(), 30)
    del client.kv[subnet_key(store.prefix, put[5])]
    leases = store.leases()
    assert store.cache.parses == 7
    assert sorted(leases) == ["n1", "n2", "n3", "n4"] and str(leases["n3"].public_ip) == "192.168.77.99"
