"""Concurrent ADDs and DELs on one node, as containerd runs them for pods starting together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab import Node, ping, weft_conf

N = 50


@pytest.mark.slow
def test_parallel_adds_get_distinct_addresses_and_dels_empty_the_store(node: Node) -> None:
    conflist = node.write_conflist("weftnet", [weft_conf(data_dir=node.data_dir, ipMasq=True)])
    pods = [node.pod(f"p{i}") for i in range(N)]
    with ThreadPoolExecutor(N) as pool:
        results = list(pool.map(lambda i: node.drive("add", conflist, f"c{i}", pods[i].path, check=False), range(N)))
    failed = [r.stdout + r.stderr for r in results if r.rc != 0]
    assert not failed, failed[:3]
    ips = [r.json["ips"][0]["address"] for r in results]
    assert len(set(ips)) == N
    assert len(node.reservations("weftnet")) == N
    assert sum(1 for n in node.ns.links() if n.startswith("weft")) == N
    assert sorted(node.masqueraded()) == sorted(ip.split("/")[0] for ip in ips)
    assert ping(pods[0], ips[-1].split("/")[0])

    with ThreadPoolExecutor(N) as pool:
        dels = list(pool.map(lambda i: node.drive("del", conflist, f"c{i}", pods[i].path, check=False), range(N)))
    assert not [d.stderr for d in dels if d.rc != 0]
    assert node.reservations("weftnet") == {}
    assert not any(n.startswith("weft") for n in node.ns.links())
    assert node.masqueraded() == []
