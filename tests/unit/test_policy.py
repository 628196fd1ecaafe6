"""The NetworkPolicy engine's pure logic: parsing with API defaults, selectors, compiling. No root needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import netaddr
import pytest

from weftd.policy import model
from weftd.policy.compile import PortBinding, State, compile_ruleset
from weftd.policy.source import DirSource, parse_file


def pol(spec: dict[str, Any], name: str = "p", ns: str = "x") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pod(ns: str, name: str, ip: str, labels: dict[str, str] | None = None, **spec: Any) -> model.Pod:
    obj = model.parse({"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                       "spec": spec, "status": {"podIPs": [{"ip": ip}]} if ip else {}})
    assert isinstance(obj, model.Pod)
    return obj


def test_policy_types_default_like_the_api_server() -> None:
    p = model.parse(pol({"podSelector": {}}))
    assert isinstance(p, model.NetworkPolicy) and p.policy_types == {"Ingress"}
    p = model.parse(pol({"podSelector": {}, "egress": [{}]}))
    assert isinstance(p, model.NetworkPolicy) and p.policy_types == {"Ingress", "Egress"}
    p = model.parse(pol({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}))
    assert isinstance(p, model.NetworkPolicy) and p.policy_types == {"Egress"}


def test_port_protocol_defaults_to_tcp_and_sctp_stays_sctp() -> None:
    p = model.parse(pol({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"protocol": "SCTP", "port": 80}]}]}))
    assert isinstance(p, model.NetworkPolicy)
    assert [s.protocol for s in p.ingress[0].ports] == ["TCP", "SCTP"]


def test_namespace_gets_its_name_label() -> None:
    ns = model.parse({"kind": "Namespace", "metadata": {"name": "y", "labels": {"ns": "y"}}})
    assert isinstance(ns, model.Namespace) and ns.labels == {"ns": "y", model.NAME_LABEL: "y"}


@pytest.mark.parametrize(("spec", "error"), [
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "protocol must be one of"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 80}]}]}, "endPort must be an integer"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "endPort needs a numeric"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}, "port must be an integer from 1"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, "is not a valid port name"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
     "must lie strictly inside cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]}, "must be a CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "cannot be combined"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "must have a podSelector"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "needs values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}}, "takes no values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}}, "operator must be"),
    ({"podSelector": {"matchLabels": {"a": 1}}}, "must be a string to a string"),
    ({"podSelector": {}, "policyTypes": ["Sideways"]}, "is not Ingress or Egress"),
    ({}, "spec.podSelector is required"),
    ({"podSelector": {}, "ingres": []}, "unknown field 'ingres'"),
])
def test_bad_policies_name_the_object_and_the_field(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(model.ObjectError) as e:
        model.parse(pol(spec, name="bad"))
    assert str(e.value).startswith("NetworkPolicy x/bad: ") and error in str(e.value)


def test_bad_kind_and_api_version() -> None:
    with pytest.raises(model.ObjectError, match="kind 'Service' is not one of"):
        model.parse({"kind": "Service", "metadata": {"name": "s"}})
    with pytest.raises(model.ObjectError, match="apiVersion 'extensions/v1beta1'"):
        model.parse({**pol({"podSelector": {}}), "apiVersion": "extensions/v1beta1"})


def test_selectors() -> None:
    s = model.parse_selector({"matchLabels": {"a": "1"}, "matchExpressions": [
        {"key": "b", "operator": "NotIn", "values": ["x"]}, {"key": "c", "operator": "Exists"},
        {"key": "d", "operator": "DoesNotExist"}]}, "s")
    assert s.matches({"a": "1", "c": ""})
    assert s.matches({"a": "1", "b": "y", "c": "z"})
    assert not s.matches({"a": "1", "b": "x", "c": ""})
    assert not s.matches({"a": "1", "c": "", "d": ""})
    assert not s.matches({"a": "2", "c": ""})
    assert model.LabelSelector().matches({})


def test_pod_addresses_named_ports_and_peers() -> None:
    p = model.parse({"kind": "Pod", "metadata": {"name": "a", "namespace": "x"},
                     "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080},
                                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
                     "status": {"podIP": "10.0.0.5"}})
    assert isinstance(p, model.Pod)
    assert p.ips == (netaddr.IPAddress("10.0.0.5"),) and p.is_peer
    assert p.named_port("http", "TCP") == [8080] and p.named_port("http", "UDP") == [] and \
        p.named_port("dns", "UDP") == [53]
    assert not pod("x", "h", "10.0.0.6", hostNetwork=True).is_peer
    assert not pod("x", "n", "").is_peer
    done = model.parse({"kind": "Pod", "metadata": {"name": "d"}, "status": {"phase": "Succeeded", "podIP": "1.2.3.4"}})
    assert isinstance(done, model.Pod) and not done.is_peer and done.namespace == "default"


def test_lists_and_multi_document_files(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    text = ("kind: List\nitems:\n- {kind: Namespace, metadata: {name: x}}\n- {kind: Namespace, metadata: {name: 7}}\n"
            "---\nkind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: x}\n"
            "spec: {podSelector: {}}\n---\nkind: PodList\nitems:\n- {metadata: {name: a, namespace: x}}\n")
    objs, errors = parse_file(f, text, {})
    assert set(objs) == {("Namespace", "", "x"), ("NetworkPolicy", "x", "p"), ("Pod", "x", "a")}
    assert len(errors) == 1 and "metadata.name must be a non-empty string; ignored" in errors[0]


def test_a_bad_version_keeps_the_last_good_one_and_a_broken_file_keeps_its_objects(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    good = tmp_path / "p.json"
    good.write_text('{"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"}, '
                    '"spec": {"podSelector": {}}}')
    key = ("NetworkPolicy", "x", "p")
    assert src.poll() == {key}
    kept = src.objects()[key]
    good.write_text('{"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"}, "spec": {}}   ')
    assert src.poll() == set()  # the bad version changes nothing
    assert src.objects()[key] is kept and src.error_count() == 1
    good.write_text('{"kind": ')
    assert src.poll() == set()
    assert src.objects()[key] is kept and src.error_count() == 1
    assert src.poll() == set()
    good.unlink()
    assert src.poll() == {key} and src.objects() == {} and src.error_count() == 0


def test_the_dir_source_reports_the_keys_that_changed_and_the_last_file_wins(tmp_path: Path) -> None:
    src = DirSource(tmp_path)
    ns = {"kind": "Namespace", "metadata": {"name": "x", "labels": {"a": "1"}}}
    (tmp_path / "a.json").write_text(json.dumps({"kind": "List", "items": [
        ns, {"kind": "Pod", "metadata": {"name": "p", "namespace": "x"}}]}))
    assert src.poll() == {("Namespace", "", "x"), ("Pod", "x", "p")}
    (tmp_path / "b.json").write_text(json.dumps({**ns, "metadata": {"name": "x", "labels": {"a": "2"}}}))
    assert src.poll() == {("Namespace", "", "x")}
    x = src.objects()[("Namespace", "", "x")]
    assert isinstance(x, model.Namespace) and x.labels["a"] == "2"
    (tmp_path / "a.json").write_text(json.dumps(ns))  # the pod leaves; the namespace in a.json is overridden
    assert src.poll() == {("Pod", "x", "p")}
    (tmp_path / "b.json").unlink()
    assert src.poll() == {("Namespace", "", "x")} and set(src.objects()) == {("Namespace", "", "x")}


def _state(*objs: dict[str, Any]) -> State:
    return State.of(model.parse(raw) for raw in objs)


def test_compile_peers_ipblocks_and_named_ports() -> None:
    ports = {"containers": [{"ports": [{"name": "web", "containerPort": 8080}]}]}
    s = State(pods=[pod("x", "a", "10.0.1.1", {"pod": "a"}, **ports), pod("y", "b", "10.0.2.1", {"pod": "b"}, **ports),
                    pod("y", "c", "10.0.2.2", {"pod": "c"}), pod("y", "h", "10.0.2.3", {"pod": "b"}, hostNetwork=True)])
    s.policies = [model.parse(pol({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress", "Egress"],
                                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                                       model.NAME_LABEL: "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}},
                                       {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                                       "ports": [{"port": "web"}, {"port": 80, "endPort": 90, "protocol": "UDP"}]}],
                                   "egress": [{"ports": [{"port": "web"}]}]}))]  # type: ignore[list-item]
    c = compile_ruleset(s, [s.pods[0]], [PortBinding("weftabcdef01", (netaddr.IPAddress("10.0.1.1"),))])
    text = c.text
    # y/b by selector (y/h is hostNetwork) in the peer's set, the ipBlock minus its except in a set of its own
    assert "type ipv4_addr; elements = { 10.0.2.1 } }" in text and "10.0.2.3" not in text
    assert "flags interval; elements = { 192.168.0.0-192.168.0.255, 192.168.2.0-192.168.255.255 }" in text
    assert "meta l4proto tcp th dport { 8080 } return" in text  # named port on the target
    assert "meta l4proto udp th dport { 80-90 } return" in text
    assert "10.0.1.1 . tcp . 8080, 10.0.2.1 . tcp . 8080" in text  # egress: on each peer that has it
    assert "10.0.1.1 : jump i_" in text and "10.0.1.1 : jump e_" in text
    assert '"weftabcdef01" . 10.0.1.1' in text
    assert c.selected == {"x/p": {"x/a"}}


def test_compile_dual_stack_pods_ipv6_blocks_and_named_ports() -> None:
    ports = {"containers": [{"ports": [{"name": "web", "containerPort": 8080}]}]}
    a, b = (model.parse({"kind": "Pod", "metadata": {"name": n, "namespace": "x", "labels": {"pod": n}},
                         "spec": ports, "status": {"podIPs": [{"ip": f"10.0.1.{i}"}, {"ip": f"fd00:1::{i}"}]}})
            for i, n in ((1, "a"), (2, "b")))
    assert isinstance(a, model.Pod) and isinstance(b, model.Pod)
    s = State(pods=[a, b], policies=[model.parse(pol({  # type: ignore[list-item]
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                              {"ipBlock": {"cidr": "fd00:2::/32", "except": ["fd00:2:0:1::/64"]}}]}],
        "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "web"}]}]}))])
    c = compile_ruleset(s, [a], [PortBinding("weftabcdef01", a.ips)])
    text = c.text
    assert "ip saddr @p4_" in text and "ip6 saddr @p6_" in text  # both families of the peer pod
    assert "type ipv6_addr; elements = { fd00:1::2 } }" in text
    assert "fd00:2::-fd00:2::ffff:ffff:ffff:ffff" in text
    assert "fd00:2:0:2::-fd00:2:ffff:ffff:ffff:ffff:ffff:ffff" in text
    assert "fd00:1::1 . tcp . 8080, fd00:1::2 . tcp . 8080" in text  # egress named port over IPv6
    assert "ip6 daddr . meta l4proto . th dport @n6_" in text
    assert "fd00:1::1 : jump i_" in text and "fd00:1::1 : jump e_" in text and "10.0.1.1 : jump i_" in text
    # anti-spoofing: both families, and the neighbour advertisement's target as a 128-bit number
    assert '"weftabcdef01" . 10.0.1.1' in text and '"weftabcdef01" . fd00:1::1' in text
    assert '"weftabcdef01" . 0xfd000001000000000000000000000001' in text
    assert "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report } return" in text


def test_unselected_pods_have_no_verdicts_and_ingress_type_without_rules_denies() -> None:
    s = _state(pol({"podSelector": {"matchLabels": {"pod": "a"}}}))
    s.pods = [pod("x", "a", "10.0.1.1", {"pod": "a"}), pod("x", "b", "10.0.1.2", {"pod": "b"})]
    text = compile_ruleset(s, s.pods, []).text
    assert "10.0.1.1 : jump i_" in text and "10.0.1.2 :" not in text
    chain = text.split("chain i_")[1].split("}")[0]
    name = "i_" + chain.split()[0]
    assert [x.strip() for x in chain.strip().splitlines()[1:]] == [
        "ct state invalid drop", "fib saddr type local return", f'counter name "{name}" drop']


def test_identical_pod_chains_are_shared() -> None:
    s = _state(pol({"podSelector": {}}))
    s.pods = [pod("x", n, f"10.0.1.{i}") for i, n in enumerate("abcdef", 1)]
    c = compile_ruleset(s, s.pods, [])
    assert c.chains == 1 and c.text.count(": jump i_") == 6


def test_denied_packets_are_described_from_their_headers() -> None:
    import socket
    import struct

    from weftd.policy.nflog import describe_packet

    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton("10.0.0.1"),
                     socket.inet_aton("10.0.0.2"))
    assert describe_packet(ip + struct.pack(">HH", 40000, 80) + b"\0" * 16) == ("TCP", "10.0.0.1:40000",
                                                                                "10.0.0.2:80")
    icmp = ip[:9] + b"\x01" + ip[10:]
    assert describe_packet(icmp + b"\0" * 8) == ("ICMP", "10.0.0.1", "10.0.0.2")
    assert describe_packet(b"") is None


def _random_world(rnd: Any, pods: int, policies: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                list[dict[str, Any]]]:
    """Namespaces, pods and policies with everything a rule can depend on drawn at random."""
    def labels() -> dict[str, str]:
        return {k: rnd.choice(["a", "b", "c"]) for k in ("app", "tier", "team") if rnd.random() < 0.6}

    def selector() -> dict[str, Any]:
        sel: dict[str, Any] = {}
        if rnd.random() < 0.6:
            sel["matchLabels"] = {rnd.choice(["app", "tier"]): rnd.choice(["a", "b"])}
        if rnd.random() < 0.3:
            op = rnd.choice(["In", "NotIn", "Exists", "DoesNotExist"])
            sel["matchExpressions"] = [{"key": rnd.choice(["app", "team"]), "operator": op,
                                        **({"values": ["a", "c"]} if op in ("In", "NotIn") else {})}]
        return sel

    def peer() -> dict[str, Any]:
        kind = rnd.randrange(4)
        if kind == 0:
            cidr = rnd.choice(["10.1.0.0/16", "10.1.1.0/24", "fd00:1::/64", "10.0.0.0/8"])
            block: dict[str, Any] = {"cidr": cidr}
            if cidr == "10.1.0.0/16" and rnd.random() < 0.5:
                block["except"] = ["10.1.1.0/25"]
            return {"ipBlock": block}
        if kind == 1:
            return {"podSelector": selector()}
        if kind == 2:
            return {"namespaceSelector": {"matchLabels": {"team": rnd.choice(["a", "b"])}} if rnd.random() < 0.7
                    else {}}
        return {"namespaceSelector": {}, "podSelector": selector()}

    def ports() -> list[dict[str, Any]]:
        return rnd.choice([[], [{"port": "web"}], [{"port": 80}, {"port": "web", "protocol": "UDP"}],
                           [{"port": 8000, "endPort": 8100}], [{"protocol": "UDP"}],
                           [{"port": "dns", "protocol": "UDP"}]])

    def rule(peers_key: str) -> dict[str, Any]:
        r: dict[str, Any] = {"ports": ports()}
        if rnd.random() < 0.8:
            r[peers_key] = [peer() for _ in range(rnd.randrange(1, 3))]
        return r

    nss = [{"kind": "Namespace", "metadata": {"name": f"n{i}", "labels": {"team": rnd.choice("ab")}}}
           for i in range(3)]
    pod_objs = [_random_pod(rnd, i, labels()) for i in range(pods)]
    pols = []
    for j in range(policies):
        spec: dict[str, Any] = {"podSelector": selector()}
        if rnd.random() < 0.8:
            spec["ingress"] = [rule("from") for _ in range(rnd.randrange(0, 3))]
        if rnd.random() < 0.5:
            spec["egress"] = [rule("to") for _ in range(rnd.randrange(0, 3))]
        if rnd.random() < 0.3:
            spec["policyTypes"] = rnd.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]])
        pols.append(pol(spec, f"p{j}", f"n{rnd.randrange(4)}"))  # n3 has no Namespace object
    return nss, pod_objs, pols


def _random_pod(rnd: Any, i: int, labels: dict[str, str]) -> dict[str, Any]:
    ips = rnd.choice([[f"10.1.{rnd.randrange(3)}.{i + 1}"], [f"10.1.0.{i + 1}", f"fd00:1::{i + 1:x}"],
                      [f"10.2.0.{i + 1}"], [], [f"10.1.0.{rnd.randrange(1, 4)}"]])  # the last may be taken
    spec: dict[str, Any] = {"nodeName": rnd.choice(["me", "other"]),
                            "containers": [{"ports": [{"name": "web", "containerPort": rnd.choice([80, 8080])},
                                                      {"name": "dns", "protocol": "UDP", "containerPort": 53}]}]}
    if rnd.random() < 0.05:
        spec["hostNetwork"] = True
    return {"kind": "Pod", "metadata": {"name": f"q{i}", "namespace": f"n{rnd.randrange(4)}", "labels": labels},
            "spec": spec, "status": {"podIPs": [{"ip": ip} for ip in ips]}}


def random_steps(seed: int, steps: int = 40) -> Any:
    """The raw objects of a cluster after each of `steps` random changes: pods come, go, change labels,
    addresses and nodes; policies and namespaces change too."""
    import random

    rnd = random.Random(seed)
    nss, pods, pols = _random_world(rnd, 30, 12)
    serial = 100
    for step in range(steps):
        op = rnd.randrange(10)
        if op <= 2:  # an ADD: a new pod, with its labels
            serial += 1
            pods.append(_random_pod(rnd, serial, {"app": rnd.choice("abc"), "tier": rnd.choice("ab")}))
        elif op == 3 and pods:  # a DEL
            pods.pop(rnd.randrange(len(pods)))
        elif op == 4 and pods:  # relabelled
            rnd.choice(pods)["metadata"]["labels"] = {"app": rnd.choice("abc"), "team": rnd.choice("ab")}
        elif op == 5 and pods:  # another address, or another node
            p = rnd.choice(pods)
            p.update({k: v for k, v in _random_pod(rnd, serial + step, p["metadata"]["labels"]).items()
                      if k in ("spec", "status")})
        elif op == 6:  # a policy added or removed
            if pols and rnd.random() < 0.5:
                pols.pop(rnd.randrange(len(pols)))
            else:
                pols.append(_random_world(rnd, 0, 1)[2][0] | {"metadata": {"name": f"s{step}", "namespace": "n1"}})
        elif op == 7:  # a namespace relabelled
            rnd.choice(nss)["metadata"]["labels"] = {"team": rnd.choice("abc")}
        yield nss + pods + pols


def compile_raw(raw: list[dict[str, Any]]) -> Any:
    """The ruleset of node `me` for raw objects."""
    s = State.of(map(model.parse, raw))
    s.pods.sort(key=lambda p: p.key)
    local = [p for p in s.pods if p.node_name == "me"]
    return compile_ruleset(s, local, bindings_of(local), 5)


def bindings_of(local: list[model.Pod]) -> list[PortBinding]:
    """A veth per pod, named after it."""
    return [PortBinding(f"weft{p.namespace}{p.name}"[:15], p.ips) for p in local]
