"""A seeded cluster's worth of NetworkPolicy objects, and the changes that happen to it: for the policy scale
benchmark (bench/policy_scale.py) and for tests that compare an incremental state with a fresh compile.

`World.build` makes Namespaces, Pods spread over nodes and NetworkPolicies of every kind upstream has: pod
and namespace selectors (matchLabels and matchExpressions with In, NotIn, Exists, DoesNotExist, and empty
selectors), numeric and named ports, endPort ranges, protocols, ipBlocks with except, ingress and egress.
Everything comes out as the API server would serve it (plain dicts), and the same seed gives the same world
and the same sequence of changes.

Pods of the node under test (`local_node`) have addresses from `local_subnet`, or none until `assign` gives
them one (as when a benchmark ADDs them and learns their address). Other nodes' pods have addresses in
10.100.<node>.0/24. The policy `probe` in the first local pod's namespace selects every pod there and admits
pods labelled probe=on: setting or removing that label (`set_probe`) always changes what the node enforces.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

APPS, TIERS, ROLES = 20, ("tier0", "tier1", "tier2"), ("frontend", "backend", "db")
REMOTE_NET = ipaddress.ip_network("10.100.0.0/16")  # node k's pods: 10.100.k.0/24 (k from 1)
PROBE = "probe"
Obj = dict[str, Any]


@dataclass
class WorldPod:
    namespace: str
    name: str
    node: str
    labels: dict[str, str]
    ip: str | None
    http_port: int

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def object(self) -> Obj:
        ports: list[Obj] = [{"name": "http", "containerPort": self.http_port, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        if self.labels.get("role") == "backend":
            ports.append({"name": "grpc", "containerPort": 50051, "protocol": "TCP"})
        obj: Obj = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels)},
                    "spec": {"nodeName": self.node, "containers": [{"name": "main", "ports": ports}]},
                    "status": {"phase": "Running"}}
        if self.ip is not None:
            obj["status"].update({"podIP": self.ip, "podIPs": [{"ip": self.ip}]})
        else:
            obj["status"]["phase"] = "Pending"
        return obj


@dataclass
class Change:
    """One change of the world: `obj` is the object as it is now, None if it was deleted."""

    kind: str  # Pod, Namespace or NetworkPolicy
    namespace: str  # "" for a Namespace
    name: str
    obj: Obj | None
    what: str  # create, delete, relabel, update


@dataclass
class World:
    seed: int
    nodes: int
    local_node: str
    local_subnet: str | None
    rnd: random.Random
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    pods: dict[tuple[str, str], WorldPod] = field(default_factory=dict)
    policies: dict[tuple[str, str], Obj] = field(default_factory=dict)
    _next_host: dict[str, int] = field(default_factory=dict)  # per node: the next host number to give out
    _serial: int = 0

    @classmethod
    def build(cls, pods: int = 10_000, nodes: int = 100, namespaces: int = 50, policies: int = 1000,
              seed: int = 22, local_node: str = "node000", local_subnet: str | None = None) -> World:
        """`pods` spread evenly over `nodes` (node 0 is `local_node`), in `namespaces`, with `policies`."""
        if nodes > 255:
            raise ValueError("at most 255 nodes")
        w = cls(seed, nodes, local_node, local_subnet, random.Random(seed))
        for n in range(namespaces):
            name = f"ns{n}"
            w.namespaces[name] = {"kubernetes.io/metadata.name": name, "team": f"t{n % 10}",
                                  "env": ("prod", "staging", "dev")[n % 3]}
        for i in range(pods):
            node = i % nodes
            # the first local pod is in ns0, where the probe policy is
            ns = "ns0" if i == 0 else f"ns{w.rnd.randrange(namespaces)}"
            w._add_pod(ns, w.node_name(node))
        rules = random.Random(seed + 1)  # policies of their own: the same at every number of pods
        for j in range(policies):
            pol = w._policy(j, f"ns{j % namespaces}", PROBE if j == 0 else f"pol{j}", rules)
            w.policies[(pol["metadata"]["namespace"], pol["metadata"]["name"])] = pol
        return w

    def node_name(self, k: int) -> str:
        return self.local_node if k == 0 else f"node{k:03d}"

    # ---- what the world holds ----

    def objects(self) -> list[Obj]:
        return [*self.namespace_objects(), *self.policy_objects(), *(p.object() for p in self.pods.values())]

    def namespace_objects(self) -> list[Obj]:
        return [self.namespace_object(n) for n in self.namespaces]

    def namespace_object(self, name: str) -> Obj:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": self.namespaces[name]}}

    def policy_objects(self) -> list[Obj]:
        return list(self.policies.values())

    def local_pods(self) -> list[WorldPod]:
        return [p for p in self.pods.values() if p.node == self.local_node]

    def remote_pods(self) -> list[WorldPod]:
        return [p for p in self.pods.values() if p.node != self.local_node]

    # ---- changes ----

    def assign(self, pod: WorldPod, ip: str) -> Change:
        """A local pod got its address (the kubelet reports it after the ADD)."""
        pod.ip = ip
        return self._pod_change(pod, "update")

    def new_pod(self, namespace: str | None = None, node: int | None = None, labels: dict[str, str] | None = None,
                ) -> tuple[WorldPod, Change]:
        """A pod created on another node (or on `node`, 0 being the local one), running with its address."""
        ns = namespace or self.rnd.choice(sorted(self.namespaces))
        k = node if node is not None else self.rnd.randrange(1, self.nodes) if self.nodes > 1 else 0
        pod = self._add_pod(ns, self.node_name(k), labels)
        return pod, self._pod_change(pod, "create")

    def delete_pod(self, pod: WorldPod) -> Change:
        del self.pods[pod.key]
        return Change("Pod", pod.namespace, pod.name, None, "delete")

    def relabel(self, pod: WorldPod, labels: dict[str, str]) -> Change:
        pod.labels = dict(labels)
        return self._pod_change(pod, "relabel")

    def set_probe(self, pod: WorldPod, on: bool) -> Change:
        labels = {k: v for k, v in pod.labels.items() if k != PROBE}
        return self.relabel(pod, {**labels, PROBE: "on"} if on else labels)

    def random_change(self) -> Change:
        """One change such as a cluster sees all the time: mostly pods (created, deleted, relabelled), now and
        then a namespace's labels or a policy (created, updated, deleted)."""
        r = self.rnd.random()
        remote = [p for p in self.pods.values() if p.node != self.local_node and p.ip is not None]
        if r < 0.3 or not remote:
            return self.new_pod()[1]
        if r < 0.55:
            return self.delete_pod(self.rnd.choice(remote))
        if r < 0.85:
            pod = self.rnd.choice(sorted(self.pods.values(), key=lambda p: p.key))
            return self.relabel(pod, self._labels())
        if r < 0.9:
            name = self.rnd.choice(sorted(self.namespaces))
            self.namespaces[name]["team"] = f"t{self.rnd.randrange(10)}"
            return Change("Namespace", "", name, self.namespace_object(name), "relabel")
        key = self.rnd.choice(sorted(k for k in self.policies if k[1] != PROBE))
        if r < 0.95:
            del self.policies[key]
            return Change("NetworkPolicy", key[0], key[1], None, "delete")
        self._serial += 1
        name = key[1] if r < 0.975 and key[1] != PROBE else f"pol-new{self._serial}"
        pol = self._policy(self.rnd.randrange(1, 10_000), key[0], name, self.rnd)
        what = "update" if pol["metadata"]["name"] == key[1] else "create"
        self.policies[(key[0], pol["metadata"]["name"])] = pol
        return Change("NetworkPolicy", key[0], pol["metadata"]["name"], pol, what)

    def changes(self, n: int) -> Iterator[Change]:
        for _ in range(n):
            yield self.random_change()

    # ---- making things ----

    def _pod_change(self, pod: WorldPod, what: str) -> Change:
        return Change("Pod", pod.namespace, pod.name, pod.object(), what)

    def _labels(self) -> dict[str, str]:
        r = self.rnd
        labels = {"app": f"app{r.randrange(APPS)}", "tier": r.choice(TIERS), "role": r.choice(ROLES)}
        if r.random() < 0.5:
            labels["version"] = f"v{r.randrange(1, 4)}"
        return labels

    def _address(self, node: str) -> str | None:
        if node == self.local_node:
            if self.local_subnet is None:
                return None
            net = ipaddress.ip_network(self.local_subnet)
        else:
            k = int(node[4:])
            net = ipaddress.ip_network(f"{REMOTE_NET.network_address + (k << 8)}/24")
        host = self._next_host.get(node, 2)  # .1 is the node's bridge
        if host >= net.num_addresses - 1:
            raise ValueError(f"{node}: no addresses left in {net}")
        self._next_host[node] = host + 1
        return str(net.network_address + host)

    def _add_pod(self, namespace: str, node: str, labels: dict[str, str] | None = None) -> WorldPod:
        self._serial += 1
        pod = WorldPod(namespace, f"pod{self._serial}", node, labels if labels is not None else self._labels(),
                       self._address(node), 8080 + self._serial % 4)
        self.pods[pod.key] = pod
        return pod

    @staticmethod
    def _policy(j: int, ns: str, name: str, r: random.Random) -> Obj:
        """Policy `name` in `ns`, of kind j % 8 (0: the probe policy), its details drawn from `r`."""
        app = {"matchLabels": {"app": f"app{r.randrange(APPS)}"}}
        spec: Obj
        if j == 0:
            spec = {"podSelector": {}, "ingress": [
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {PROBE: "on"}}}],
                 "ports": [{"port": 7000}]},
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": "metrics"}]}]}
        elif j % 8 == 0:
            spec = {"podSelector": app, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": f"app{r.randrange(APPS)}"}}}],
                 "ports": [{"port": 8080}, {"port": "http"}]}]}
        elif j % 8 == 1:
            spec = {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                                          "values": ["tier0", "tier1"]}]},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{r.randrange(10)}"}},
                                           "podSelector": {"matchExpressions": [
                                               {"key": "role", "operator": "In", "values": ["frontend"]}]}}],
                                 "ports": [{"port": 9000, "endPort": 9200, "protocol": "TCP"}]}]}
        elif j % 8 == 2:
            third = r.randrange(1, 100)
            spec = {"podSelector": app, "ingress": [
                {"from": [{"ipBlock": {"cidr": "10.100.0.0/16",
                                       "except": [f"10.100.{third}.0/24", f"10.100.{third + 1}.128/25"]}}],
                 "ports": [{"port": 8443}]}]}
        elif j % 8 == 3:
            spec = {"podSelector": {"matchLabels": {"role": "backend"}}, "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": "metrics"}, {"protocol": "UDP"}]}]}
        elif j % 8 == 4:
            spec = {"podSelector": app, "policyTypes": ["Ingress", "Egress"],
                    "ingress": [{"from": [{"podSelector": {}}]}],
                    "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
                        {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}], "ports": [{"port": "http"}]}]}
        elif j % 8 == 5:
            spec = {"podSelector": {"matchExpressions": [{"key": "version", "operator": "Exists"}]},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
                                "ports": [{"port": 443}]},
                               {"to": [{"podSelector": {}}]},
                               {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}},
                                        "podSelector": {"matchLabels": {"app": "app0"}}}],
                                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}
        elif j % 8 == 6:
            spec = {"podSelector": {"matchExpressions": [
                        {"key": "version", "operator": "DoesNotExist"},
                        {"key": "app", "operator": "NotIn", "values": [f"app{r.randrange(APPS)}"]}]},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}},
                                           "podSelector": {"matchExpressions": [{"key": "role",
                                                                                 "operator": "Exists"}]}}],
                                 "ports": [{"port": "grpc"}, {"port": 7777, "protocol": "SCTP"}]}]}
        else:
            spec = {"podSelector": {}, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{r.randrange(10)}"}}},
                          {"ipBlock": {"cidr": f"192.168.{r.randrange(256)}.0/24"}}]}]}
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}
