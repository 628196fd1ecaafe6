"""NetworkPolicy on 3 simulated nodes (vxlan, file store, --policy-dir): the upstream e2e model.

Every table is derived from the policy's semantics (networking.k8s.io/v1 and the upstream suite's
expectations), never from observed output. A pod always reaches itself.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import ClusterNode
from tests.netpol import NetpolModel, policy_cluster, probe_once

ALL = (("x/a", "x/b", "x/c"), ("y/a", "y/b", "y/c"), ("z/a", "z/b", "z/c"))
X, Y, Z = ALL
EVERY = [*X, *Y, *Z]
T80, T81, U80, U81 = (80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")


def policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


@contextmanager
def upstream_model(base: Path, backend: str, weftd: list[str] | None = None) -> Iterator[NetpolModel]:
    """3 nodes, each weftd (this checkout's, or `weftd`) reading the same --policy-dir; 9 pods serving;
    every pod reaching every pod."""
    with policy_cluster(base, {"Network": "10.244.0.0/16", "Backend": {"Type": backend}},
                        extra=("--policy-nflog-group", "86"), weftd=weftd) as m:
        m.build()
        took = m.expect(m.reachability([T80, T81, U80, U81]))
        print(f"\n{backend}: first full 9x9x4 table in {took:.2f}s")
        yield m


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetpolModel]:
    with upstream_model(tmp_path_factory.mktemp("netpol"), "vxlan") as m:
        yield m


@pytest.fixture
def np(model: NetpolModel) -> Iterator[NetpolModel]:
    """Each case starts from the bare model: no policies, original labels, every pod reachable."""
    yield model
    model.clear_policies()
    for pid, pod in model.pods.items():
        if pod.labels != {"pod": pod.name}:
            model.set_pod_labels(pid, {"pod": pod.name})
    for ns in ("x", "y", "z"):
        if model.ns_labels[ns] != {"ns": ns}:
            model.set_namespace_labels(ns, {"ns": ns})
    model.expect(model.reachability())


def test_default_deny_ingress(np: NetpolModel) -> None:
    np.apply("deny", policy("deny-ingress", "x", {"podSelector": {}}))
    print(f"\npolicy create: y/a -> x/a denied after {np.effect('y/a', 'x/a', False):.2f}s")
    took = np.expect(np.reachability().set(EVERY, X, False))
    print(f"9x9 table (81 probes, 24 denied) matched in {took:.2f}s")
    n1 = np.nodes[0]
    _, metrics = n1.http("/metrics")
    assert 'weft_policy_selected_pods{policy="x/deny-ingress"} 1.0' in metrics
    m = re.search(r'^weft_policy_dropped_packets_total{direction="ingress",policy="x/deny-ingress"} (\S+)$', metrics,
                  re.M)
    assert m is not None and float(m.group(1)) > 0, metrics
    # Denied packets are logged from NFLOG with pod names, on the node of the pod they were denied to.
    pattern = r"denied TCP [\d.]+:\d+ -> [\d.]+:80: y/a -> x/a; ingress of x/a allowed by none of x/deny-ingress"
    np.cluster.until(lambda: re.search(pattern, np.pods["x/a"].node.log.read_text()) is not None, 60,
                     "a denied-packet log line", np.pods["x/a"].node)


def test_default_deny_egress(np: NetpolModel) -> None:
    np.apply("deny", policy("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]}))
    np.expect(np.reachability().set(X, EVERY, False))


def test_default_deny_all(np: NetpolModel) -> None:
    np.apply("deny", policy("deny-all", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    np.expect(np.reachability().set(EVERY, X, False).set(X, EVERY, False))


def ingress_to_a(np: NetpolModel, name: str, rules: list[dict[str, Any]]) -> None:
    np.apply(name, policy(name, "x", {"podSelector": sel(pod="a"), "ingress": rules}))


def test_allow_from_pods_in_server_ns_by_pod_selector(np: NetpolModel) -> None:
    ingress_to_a(np, "allow-b", [{"from": [{"podSelector": sel(pod="b")}]}])
    np.expect(np.reachability().ingress("x/a", False).set("x/b", "x/a", True))


def test_allow_ingress_for_a_target(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": {}}))
    ingress_to_a(np, "allow-a", [{}])
    np.expect(np.reachability().set(EVERY, ["x/b", "x/c"], False))


def test_allow_from_all_namespaces(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": {}}))
    ingress_to_a(np, "allow-all-ns", [{"from": [{"namespaceSelector": {}}]}])
    np.expect(np.reachability().set(EVERY, ["x/b", "x/c"], False))


def test_only_from_a_different_namespace_by_namespace_selector(np: NetpolModel) -> None:
    ingress_to_a(np, "from-y", [{"from": [{"namespaceSelector": sel(ns="y")}]}])
    np.expect(np.reachability().ingress("x/a", False).set(Y, "x/a", True))


def test_pod_selector_match_expressions(np: NetpolModel) -> None:
    ingress_to_a(np, "expr", [{"from": [{"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "In", "values": ["b"]}]}}]}])
    np.expect(np.reachability().ingress("x/a", False).set("x/b", "x/a", True))


def test_namespace_selector_match_expressions(np: NetpolModel) -> None:
    ingress_to_a(np, "expr", [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "ns", "operator": "In", "values": ["y"]}]}}]}])
    np.expect(np.reachability().ingress("x/a", False).set(Y, "x/a", True))


def test_pod_selector_or_namespace_selector(np: NetpolModel) -> None:
    ingress_to_a(np, "or", [{"from": [{"podSelector": sel(pod="b")}, {"namespaceSelector": sel(ns="y")}]}])
    np.expect(np.reachability().ingress("x/a", False).set(["x/b", *Y], "x/a", True))


def test_pod_selector_and_namespace_selector(np: NetpolModel) -> None:
    ingress_to_a(np, "and", [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "ns", "operator": "NotIn", "values": ["x"]}]}, "podSelector": sel(pod="b")}]}])
    np.expect(np.reachability().ingress("x/a", False).set(["y/b", "z/b"], "x/a", True))


def test_multiple_pod_and_namespace_selectors(np: NetpolModel) -> None:
    ingress_to_a(np, "multi", [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "ns", "operator": "NotIn", "values": ["x"]}]}, "podSelector": {"matchExpressions": [
            {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}])
    np.expect(np.reachability().ingress("x/a", False).set(["y/b", "y/c", "z/b", "z/c"], "x/a", True))


def test_only_from_a_pod_in_another_namespace(np: NetpolModel) -> None:
    ingress_to_a(np, "ya", [{"from": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")}]}])
    np.expect(np.reachability().ingress("x/a", False).set("y/a", "x/a", True))


def test_empty_pod_selector_peer_means_own_namespace(np: NetpolModel) -> None:
    ingress_to_a(np, "own-ns", [{"from": [{"podSelector": {}}]}])
    np.expect(np.reachability().ingress("x/a", False).set(X, "x/a", True))


def test_ports(np: NetpolModel) -> None:
    ingress_to_a(np, "port81", [{"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 81}]}])
    np.expect(np.reachability([T80, T81]).ingress("x/a", False).set(Y, "x/a", True, [T81]))


def test_end_port(np: NetpolModel) -> None:
    ingress_to_a(np, "range", [{"ports": [{"port": 79, "endPort": 80, "protocol": "TCP"}]}])
    np.expect(np.reachability([T80, T81]).ingress("x/a", False, [T81]))
    ingress_to_a(np, "range", [{"ports": [{"port": 80, "endPort": 81}]}])
    np.expect(np.reachability([T80, T81, U80]).ingress("x/a", False, [U80]))


def test_stacked_policies(np: NetpolModel) -> None:
    ingress_to_a(np, "y-80", [{"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 80}]}])
    ingress_to_a(np, "z-81", [{"from": [{"namespaceSelector": sel(ns="z")}], "ports": [{"port": 81}]}])
    np.expect(np.reachability([T80, T81]).ingress("x/a", False).set(Y, "x/a", True, [T80])
              .set(Z, "x/a", True, [T81]))


def test_allow_all_after_deny_all(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    np.expect(np.reachability().set(EVERY, X, False).set(X, EVERY, False))
    np.apply("allow", policy("allow", "x", {"podSelector": {}, "ingress": [{}], "egress": [{}]}))
    np.expect(np.reachability())


def test_ingress_on_one_named_port(np: NetpolModel) -> None:
    ingress_to_a(np, "named", [{"ports": [{"port": "serve-81-tcp"}]}])
    np.expect(np.reachability([T80, T81]).ingress("x/a", False, [T80]))


def test_ingress_from_namespace_on_one_named_port(np: NetpolModel) -> None:
    ingress_to_a(np, "named", [{"from": [{"namespaceSelector": sel(ns="y")}],
                                "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}])
    np.expect(np.reachability([T80, U80, U81]).ingress("x/a", False).set(Y, "x/a", True, [U80]))


def test_named_port_needs_the_matching_protocol(np: NetpolModel) -> None:
    # serve-80-tcp is a TCP port: asked for as UDP it resolves to nothing.
    ingress_to_a(np, "named", [{"ports": [{"port": "serve-80-tcp", "protocol": "UDP"}]}])
    np.expect(np.reachability([T80, U80]).ingress("x/a", False))


def test_egress_on_one_named_port(np: NetpolModel) -> None:
    np.apply("egress", policy("egress", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                              "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}))
    np.expect(np.reachability([T80, T81]).egress("x/a", False, [T81]))


def test_egress_named_port_resolves_on_each_peer(np: NetpolModel) -> None:
    # Only y/b calls its TCP 81 "serve-80-tcp" too: egress to that name reaches y/b on 81 and nobody else.
    yb = np.pods["y/b"]
    original = yb.obj
    try:
        def renamed() -> dict[str, Any]:
            obj = original()
            obj["spec"]["containers"].append({"name": "alt", "ports": [{"name": "alt-81", "containerPort": 81}]})
            return obj
        yb.obj = renamed  # type: ignore[method-assign]
        np.write_pod(yb)
        np.apply("egress", policy("egress", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                                  "egress": [{"ports": [{"port": "alt-81"}]}]}))
        np.expect(np.reachability([T80, T81]).egress("x/a", False).set("x/a", "y/b", True, [T81]))
    finally:
        yb.obj = original  # type: ignore[method-assign]
        np.write_pod(yb)


def test_updated_policy(np: NetpolModel) -> None:
    ingress_to_a(np, "upd", [{"from": [{"podSelector": sel(pod="b")}]}])
    np.expect(np.reachability().ingress("x/a", False).set("x/b", "x/a", True))
    ingress_to_a(np, "upd", [{"from": [{"podSelector": sel(pod="c")}]}])
    print(f"\npolicy update: x/c -> x/a allowed after {np.effect('x/c', 'x/a', True):.2f}s")
    np.expect(np.reachability().ingress("x/a", False).set("x/c", "x/a", True))


def test_ingress_from_updated_namespace(np: NetpolModel) -> None:
    ingress_to_a(np, "upd-ns", [{"from": [{"namespaceSelector": sel(team="blue")}]}])
    np.expect(np.reachability().ingress("x/a", False))
    np.set_namespace_labels("y", {"ns": "y", "team": "blue"})
    print(f"\nnamespace label change: y/a -> x/a allowed after {np.effect('y/a', 'x/a', True):.2f}s")
    np.expect(np.reachability().ingress("x/a", False).set(Y, "x/a", True))


def test_ingress_from_updated_pod(np: NetpolModel) -> None:
    ingress_to_a(np, "upd-pod", [{"from": [{"namespaceSelector": {}, "podSelector": sel(role="client")}]}])
    np.expect(np.reachability().ingress("x/a", False))
    np.set_pod_labels("z/c", {"pod": "c", "role": "client"})
    print(f"\npod label change (peer): z/c -> x/a allowed after {np.effect('z/c', 'x/a', True):.2f}s")
    np.expect(np.reachability().ingress("x/a", False).set("z/c", "x/a", True))


def test_deny_ingress_to_updated_pod(np: NetpolModel) -> None:
    np.apply("target", policy("target", "x", {"podSelector": sel(target="yes")}))
    np.expect(np.reachability())
    np.set_pod_labels("x/b", {"pod": "b", "target": "yes"})
    print(f"\npod label change (target): y/a -> x/b denied after {np.effect('y/a', 'x/b', False):.2f}s")
    np.expect(np.reachability().ingress("x/b", False))


def test_deny_ingress_from_other_namespaces(np: NetpolModel) -> None:
    np.apply("same-ns", policy("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
    np.expect(np.reachability().set([*Y, *Z], X, False))


def test_deny_egress_by_pod_selector(np: NetpolModel) -> None:
    np.apply("eg", policy("eg", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                      "egress": [{"to": [{"podSelector": sel(pod="b")}]}]}))
    np.expect(np.reachability().egress("x/a", False).set("x/a", "x/b", True))


def test_deny_egress_from_all_pods_in_namespace(np: NetpolModel) -> None:
    np.apply("eg", policy("eg", "x", {"podSelector": {}, "policyTypes": ["Egress"]}))
    np.expect(np.reachability().set(X, EVERY, False))


def test_ingress_and_egress_together(np: NetpolModel) -> None:
    np.apply("both", policy("both", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Ingress", "Egress"],
                                          "ingress": [{"from": [{"podSelector": sel(pod="b")}]}],
                                          "egress": [{"to": [{"podSelector": sel(pod="b")}]}]}))
    np.expect(np.reachability().ingress("x/a", False).egress("x/a", False).set("x/b", "x/a", True)
              .set("x/a", "x/b", True))


def test_deny_egress_on_client_side_even_when_server_allows(np: NetpolModel) -> None:
    np.apply("eg", policy("eg", "y", {"podSelector": {}, "policyTypes": ["Egress"],
                                      "egress": [{"to": [{"namespaceSelector": sel(ns="z")}]}]}))
    ingress_to_a(np, "allow-y", [{"from": [{"namespaceSelector": sel(ns="y")}]}])
    np.expect(np.reachability().ingress("x/a", False).set(Y, [*X, *Y], False))


def test_both_ends_are_checked(np: NetpolModel) -> None:
    """x/a's egress allows y/a, but y/a's ingress does not allow x: kube-router#916."""
    np.apply("eg", policy("eg", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                      "egress": [{"to": [{"namespaceSelector": {}}]}]}))
    np.apply("in", policy("in", "y", {"podSelector": sel(pod="a"),
                                      "ingress": [{"from": [{"namespaceSelector": sel(ns="z")}]}]}))
    np.expect(np.reachability().ingress("y/a", False).set(Z, "y/a", True))


def test_egress_to_server_in_other_namespace_by_pod_and_namespace_selector(np: NetpolModel) -> None:
    np.apply("eg", policy("eg", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                      "egress": [
        {"to": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="a")}]}]}))
    np.expect(np.reachability().egress("x/a", False).set("x/a", "y/a", True))


def test_any_port_on_a_specific_protocol(np: NetpolModel) -> None:
    ingress_to_a(np, "udp", [{"ports": [{"protocol": "UDP"}]}])
    np.expect(np.reachability([T80, T81, U80, U81]).ingress("x/a", False, [T80, T81]))


def test_ingress_allow_all_precedence(np: NetpolModel) -> None:
    ingress_to_a(np, "only81", [{"ports": [{"port": 81}]}])
    np.expect(np.reachability([T80, T81]).ingress("x/a", False, [T80]))
    ingress_to_a(np, "all", [{}])
    np.expect(np.reachability([T80, T81]))


def test_egress_allow_all_precedence(np: NetpolModel) -> None:
    np.apply("only81", policy("only81", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                              "egress": [{"ports": [{"port": 81}]}]}))
    np.expect(np.reachability([T80, T81]).egress("x/a", False, [T80]))
    np.apply("all", policy("all", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [{}]}))
    np.expect(np.reachability([T80, T81]))


def test_stop_enforcing_after_deletion(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": {}}))
    np.expect(np.reachability().set(EVERY, X, False))
    np.delete("deny")
    print(f"\npolicy delete: y/a -> x/a allowed after {np.effect('y/a', 'x/a', True):.2f}s")
    np.expect(np.reachability())


def test_egress_to_cidr_with_except(np: NetpolModel) -> None:
    yb = np.pods["y/b"].ip
    np.apply("cidr", policy("cidr", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"{yb}/32"]}}]}]}))
    np.expect(np.reachability().set("x/a", "y/b", False))


def test_ip_in_both_cidr_and_except_of_another_peer(np: NetpolModel) -> None:
    yb = np.pods["y/b"].ip
    np.apply("cidr", policy("cidr", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"{yb}/32"]}}, {"ipBlock": {"cidr": f"{yb}/32"}}]}]}))
    np.expect(np.reachability())


def test_ingress_from_cidr(np: NetpolModel) -> None:
    za = np.pods["z/a"].ip
    ingress_to_a(np, "cidr", [{"from": [{"ipBlock": {"cidr": f"{za}/32"}}]}])
    np.expect(np.reachability().ingress("x/a", False).set("z/a", "x/a", True))


def test_ingress_and_egress_are_independent(np: NetpolModel) -> None:
    np.apply("eg", policy("eg", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"]}))
    np.expect(np.reachability().egress("x/a", False))


def test_sctp_is_not_tcp(np: NetpolModel) -> None:
    # The kernel here has no SCTP module, so SCTP is not probed; what matters is that allowing SCTP
    # does not open TCP (or UDP) on the same port.
    ingress_to_a(np, "sctp", [{"ports": [{"protocol": "SCTP", "port": 80}]}])
    np.expect(np.reachability([T80, U80]).ingress("x/a", False))
    rules = np.pods["x/a"].node.ns.run("nft", "list", "table", "inet", "weft_policy").stdout
    assert "sctp dport 80 return" in rules, rules


def test_no_tcp_when_only_udp_allowed(np: NetpolModel) -> None:
    ingress_to_a(np, "udp80", [{"ports": [{"protocol": "UDP", "port": 80}]}])
    np.expect(np.reachability([T80, U80]).ingress("x/a", False, [T80]))


def test_automatic_namespace_name_label(np: NetpolModel) -> None:
    """The Namespace objects carry only ns=<name>; kubernetes.io/metadata.name is added by weftd."""
    ingress_to_a(np, "meta", [{"from": [{"namespaceSelector": sel(**{"kubernetes.io/metadata.name": "y"})}]}])
    np.expect(np.reachability().ingress("x/a", False).set(Y, "x/a", True))
    ingress_to_a(np, "meta", [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}]}}]}])
    np.expect(np.reachability().set(Y, "x/a", False))


def test_policy_types_default_egress_only_with_egress_rules(np: NetpolModel) -> None:
    """No policyTypes and only egress rules: Ingress (no rules: deny all) and Egress both apply."""
    np.apply("def", policy("def", "x", {"podSelector": sel(pod="a"), "egress": [{"to": [{"podSelector": {}}]}]}))
    np.expect(np.reachability().ingress("x/a", False).egress("x/a", False).set("x/a", X, True))


def diagnose(np: NetpolModel, node: ClusterNode) -> str:
    rules = node.ns.run("nft", "list", "table", "inet", "weft_policy", check=False).stdout
    return f"{rules}\n--- {node.name} ---\n{node.log.read_text()[-3000:]}"


def test_pod_added_after_its_policy_is_isolated_when_its_add_returns(np: NetpolModel) -> None:
    np.apply("new", policy("new", "x", {"podSelector": sel(pod="d"), "policyTypes": ["Ingress", "Egress"],
                                        "ingress": [{"ports": [{"port": 81}]}]}))
    np.expect(np.reachability())  # the policy is in force everywhere (it selects nobody yet)
    client = np.pods["y/b"]  # on another node than x/d
    d = np.add_pod("x", "d", np.nodes[2], serve=True)
    # Right after the ADD returned: ingress only on 81, no egress at all.
    assert not probe_once(client, d.ip, 80), diagnose(np, d.node)
    assert probe_once(client, d.ip, 81)
    assert not probe_once(d, np.pods["x/a"].ip, 80)
    try:
        r = np.reachability([T80, T81]).ingress("x/d", False, [T80]).egress("x/d", False)
        np.expect(r)
    finally:
        np.remove_pod("x/d")


def test_pod_without_a_known_object_gets_its_namespace_policies(np: NetpolModel) -> None:
    """Documented choice: a pod ADDed before weftd knows its Pod object is bound by namespace and name with
    no labels, so policies selecting its whole namespace isolate it from the first packet."""
    np.apply("w", policy("deny", "w", {"podSelector": {}}))
    np.expect(np.reachability())
    e = np.add_pod("w", "e", np.nodes[1], serve=True, known=False)
    try:
        assert not probe_once(np.pods["x/a"], e.ip, 80)
        assert probe_once(e, np.pods["x/a"].ip, 80)  # egress is not isolated
    finally:
        np.remove_pod("w/e")


def test_weftd_restart_and_kill_keep_policy_in_force_without_a_gap(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": sel(pod="a")}))
    np.expect(np.reachability().ingress("x/a", False))
    xa, ya, yb = np.pods["x/a"], np.pods["y/a"], np.pods["y/b"]
    node = xa.node
    # Each probe is recorded with the phase it ran in; the test waits for whole probe rounds in every
    # phase instead of sleeping, so a fast machine cannot skip the window where weftd is down.
    phase = ["before"]
    probes: list[tuple[str, bool, bool]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            current = phase[0]
            # The denied probe's short wait is honest (an answer is the failure); the allowed one may take
            # as long as a loaded machine needs.
            probes.append((current, probe_once(ya, xa.ip, 80, timeout=0.3), probe_once(ya, yb.ip, 80, timeout=5)))

    def rounds_in(name: str, n: int = 3) -> None:
        np.cluster.until(lambda: sum(1 for p in probes if p[0] == name) >= n, 60, f"{n} probe rounds {name}", node)

    t = threading.Thread(target=watch)
    t.start()
    try:
        rounds_in("before")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            np.cluster.stop(node, sig)
            phase[0] = f"down after {sig.name}"
            rounds_in(phase[0])
            np.cluster.start(node, "--policy-dir", str(np.dir))
            np.cluster.wait_ready(node)
            # The new weftd has replaced the table with its own compiled view (one transaction).
            np.cluster.until(lambda: "weft_policies 1.0" in node.http("/metrics")[1], 60, "policy applied", node)
            phase[0] = f"restarted after {sig.name}"
            rounds_in(phase[0])
    finally:
        stop.set()
        t.join()
    through = [p for p in probes if p[1]]
    failed = [p for p in probes if not p[2]]
    assert not through, f"{len(through)} of {len(probes)} probes got through the policy: {through}"
    assert not failed, f"{len(failed)} of {len(probes)} allowed probes failed: {failed}"
    np.expect(np.reachability().ingress("x/a", False))  # the restarted weftd enforces the same


def test_bad_objects_are_reported_and_everything_else_applies(np: NetpolModel) -> None:
    np.apply("keep", policy("keep", "x", {"podSelector": sel(pod="c")}))
    np.expect(np.reachability().ingress("x/c", False))
    (np.dir / "broken.yaml").write_text("kind: NetworkPolicy\nmetadata: {name: [oops\n")
    np.apply("mixed",
             policy("bad-proto", "x", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
             policy("good", "x", {"podSelector": sel(pod="b")}))
    # A new version of "keep" that is invalid: the previous one stays in force.
    np.apply("keep", policy("keep", "x", {"podSelector": sel(pod="c"), "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]}))
    np.expect(np.reachability().ingress("x/c", False).ingress("x/b", False))
    log = np.nodes[0].log.read_text()
    assert "broken.yaml: not valid YAML" in log
    assert "mixed.yaml: NetworkPolicy x/bad-proto: spec.ingress[0].ports[0].protocol must be one of" in log
    assert "keep.yaml: NetworkPolicy x/keep: spec.ingress[0].from[0].ipBlock.except[0] 192.168.0.0/16 must " \
           "lie strictly inside cidr 10.0.0.0/8; keeping its previous version" in log
    _, metrics = np.nodes[0].http("/metrics")
    assert "weft_policy_invalid_objects 3.0" in metrics


def test_a_pod_cannot_send_from_another_pods_address(np: NetpolModel) -> None:
    xa, xb, yc = np.pods["x/a"], np.pods["x/b"], np.pods["y/c"]
    listener = subprocess.Popen(["ip", "netns", "exec", yc.netns.name, sys.executable, "-c",
                                 "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                                 "s.bind(('0.0.0.0',9999));print('up',flush=True);s.settimeout(60);n=0\n"
                                 # Until the genuine three (sent after the spoofed ones) are in, not a
                                 # quiet spell: under load the sends can be seconds apart.
                                 "while n<3: a=s.recvfrom(64)[1][0];print(a,flush=True);n+=a==sys.argv[1]",
                                 xa.ip], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        send = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((sys.argv[1],0));"
                "[s.sendto(b'x',(sys.argv[2],9999)) for _ in range(3)]")
        xa.netns.run("ip", "addr", "add", f"{xb.ip}/32", "dev", "eth0")
        try:
            xa.netns.run(sys.executable, "-c", send, xb.ip, yc.ip)  # spoofed: x/b's address from x/a's port
        finally:
            xa.netns.run("ip", "addr", "del", f"{xb.ip}/32", "dev", "eth0")
        xa.netns.run(sys.executable, "-c", send, xa.ip, yc.ip)  # genuine
        out, _ = listener.communicate(timeout=90)
    finally:
        listener.kill()
    assert out.split() == [xa.ip] * 3
    rules = xa.node.ns.run("nft", "list", "table", "bridge", "weft_policy").stdout
    assert "packets 3 " in rules or "packets 3\n" in rules, rules


def test_host_gw_backend(tmp_path: Path) -> None:
    """The same enforcement when pods on other nodes are reached by plain routes instead of vxlan."""
    with upstream_model(tmp_path, "host-gw") as np:
        np.apply("same-ns", policy("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
        np.apply("eg", policy("eg", "y", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                          "egress": [{"to": [{"namespaceSelector": sel(ns="z")}],
                                                      "ports": [{"port": "serve-81-tcp"}]}]}))
        np.expect(np.reachability([T80, T81]).set([*Y, *Z], X, False).egress("y/a", False)
                  .set("y/a", Z, True, [T81]))


def test_frozen_weftd_enforces_policy(tmp_path: Path, bundle: Path) -> None:
    """Production runs the PyInstaller bundle: its weftd must carry the policy engine, load libnftables
    and enforce, as the source tree's does."""
    with upstream_model(tmp_path, "vxlan", weftd=[str(bundle / "weftd")]) as np:
        np.apply("from-y", policy("from-y", "x", {"podSelector": sel(pod="a"),
                                                  "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]}))
        np.expect(np.reachability([T80, U80]).ingress("x/a", False).set(Y, "x/a", True))
        np.delete("from-y")
        np.expect(np.reachability([T80, U80]))
        assert "policies is followed by inotify" in np.nodes[0].log.read_text()  # libc's inotify from the bundle


def test_a_policy_file_written_in_place_is_applied_only_once_whole(np: NetpolModel) -> None:
    """--policy-dir reads a file once its writer closes it: the kernel never holds a half-written file's rules."""
    deny_a, deny_b = (policy(f"deny-{p}", "x", {"podSelector": sel(pod=p)}) for p in "ab")
    np.apply("inplace", deny_a)
    denied_a = np.reachability().ingress("x/a", False)
    np.expect(denied_a)
    whole = yaml.safe_dump_all([deny_b, deny_a])
    half = whole[:whole.index("---")]  # a whole document: applied, it would free x/a and isolate x/b
    with open(np.dir / "inplace.yaml", "r+") as f:
        f.truncate(0)
        f.write(half)
        f.flush()
        until = time.monotonic() + 3
        while time.monotonic() < until:
            got = np.probe(denied_a)
            assert got == denied_a.want, denied_a.render(got)
        f.write(whole[len(half):])
    np.expect(denied_a.ingress("x/b", False))


def test_tables_changed_behind_weftds_back_are_restored(np: NetpolModel) -> None:
    np.apply("deny", policy("deny", "x", {"podSelector": sel(pod="a")}))
    want = np.reachability().ingress("x/a", False)
    np.expect(want)
    node = np.pods["x/a"].node
    rules = node.ns.run("nft", "list", "table", "inet", "weft_policy").stdout
    chain = next(line.split()[1] for line in rules.splitlines() if line.strip().startswith("chain i_"))
    node.ns.run("nft", "flush", "chain", "inet", "weft_policy", chain)  # the pod chain no longer drops
    np.expect(want)  # within weftd's resync (1 s here)
    node.ns.run("nft", "delete", "table", "inet", "weft_policy")
    np.expect(want)
    assert node.log.read_text().count("changed behind weftd's back; applying them again") >= 2
