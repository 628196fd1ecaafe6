"""The etcd subnet manager against a real etcd server (Debian's etcd-server) in its own namespace."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import pytest

from tests.cluster import ETCD_IP, Cluster
from tests.lab import Lab, ping


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}, store="etcd")
    c.etcd_ttl = 6
    c.start_etcd()
    try:
        yield c
    finally:
        c.close()


def etcd_keys(c: Cluster) -> dict[str, object]:
    assert c.etcd_ns is not None
    code = ("from etcd3gw.client import Etcd3Client;import json\n"
            f"c=Etcd3Client(host='{ETCD_IP}',port=2379)\n"
            "print(json.dumps({m['key'].decode():json.loads(v) for v,m in c.get_prefix('/weft/network/')}))")
    return json.loads(c.etcd_ns.run(sys.executable, "-c", code).stdout)


def test_leases_ttl_renewal_reuse_and_outage(cluster: Cluster) -> None:
    c = cluster
    n1, n2, n3 = c.boot()
    keys = etcd_keys(c)
    assert "/weft/network/config" in keys
    subnets = {k: v for k, v in keys.items() if "/subnets/" in k}
    assert sorted(v["Node"] for v in subnets.values()) == ["n1", "n2", "n3"]  # type: ignore[index]
    assert all(v["BackendData"]["VtepMAC"] for v in subnets.values())  # type: ignore[index]
    for cn in (n1, n2, n3):
        c.pod(cn, f"pod-{cn.name}")
    a, _ = n1.pods["pod-n1"]
    for cn in (n2, n3):
        assert ping(a, cn.pods[f"pod-{cn.name}"][1])

    # Renewal keeps a lease alive well past its 6 s TTL: four renewals, a third of the TTL apart, later.
    c.until(lambda: n1.metric("weft_lease_renewals_total") >= 4, 60, "four renewals", n1)
    assert "n1" in json.dumps(etcd_keys(c))

    # A restarted node gets its own subnet back, and its VTEP MAC.
    before = n2.state()["WEFT_SUBNET"], n2.ns.links()["weft.1"]["address"]
    c.stop(n2)
    c.start(n2)
    c.wait_ready(n2)
    assert (n2.state()["WEFT_SUBNET"], n2.ns.links()["weft.1"]["address"]) == before

    # A node that dies stops renewing; its lease expires and the others drop its routes.
    c.stop(n3, signal.SIGKILL)
    for cn in (n1, n2):
        c.until(lambda cn=cn: len(cn.routes()) == 1, 60, f"{cn.name} forgets n3", cn)

    # etcd down: weftd keeps the last good state, reports it, and converges once etcd is back.
    c.stop_etcd()
    c.until(lambda: "weft_store_up 0.0" in n1.http("/metrics")[1], 60, "store down noticed", n1)
    assert len(n1.routes()) == 1
    assert ping(a, n2.pods["pod-n2"][1])
    c.start_etcd()
    c.until(lambda: "weft_store_up 1.0" in n1.http("/metrics")[1], 60, "store back", n1)
    n4 = c.add_node("n4")
    c.start(n4)
    c.wait_ready(n4)
    c.until(lambda: len(n1.routes()) == 2, 60, "n1 learns n4", n1)
    _, ip4 = c.pod(n4, "pod-n4")
    assert ping(a, ip4)


def test_remove_node_from_etcd(cluster: Cluster) -> None:
    c = cluster
    n1, n2, n3 = c.boot()
    c.stop(n3)
    n1.ns.run(sys.executable, "-m", "weftd", "remove-node", "--node-name", "n3", *c.store_args())
    for cn in (n1, n2):
        c.until(lambda cn=cn: len(cn.routes()) == 1, 60, f"{cn.name} drops n3", cn)
