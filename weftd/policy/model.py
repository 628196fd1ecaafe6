"""Namespace, Pod and NetworkPolicy objects, parsed from API dicts with the API server's defaults.

Validation happens here, at the edge: a bad object raises ObjectError naming it, and nothing from
it is used. Defaults follow `pkg/apis/networking/v1/defaults.go` and the API reference: policyTypes
is Ingress, plus Egress when egress rules exist; a port's protocol is TCP; Namespaces carry
`kubernetes.io/metadata.name`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import netaddr

NAME_LABEL = "kubernetes.io/metadata.name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
KINDS = ("Namespace", "Pod", "NetworkPolicy")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class ObjectError(ValueError):
    """An object that cannot be used; the message names it."""


Key = tuple[str, str, str]  # kind, namespace ('' for Namespaces), name


def describe(key: Key) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels and matchExpressions, ANDed. The empty selector matches everything."""

    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels) and all(r.matches(labels) for r in self.expressions)


@dataclass(frozen=True)
class ContainerPort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str]

    @property
    def key(self) -> Key:
        return ("Namespace", "", self.name)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[netaddr.IPAddress, ...] = ()
    host_network: bool = False
    node_name: str = ""
    ports: tuple[ContainerPort, ...] = ()

    @cached_property
    def key(self) -> Key:  # asked for often by every compile
        return ("Pod", self.namespace, self.name)

    @property
    def is_peer(self) -> bool:
        """hostNetwork pods look like their node, and pods without an address cannot be matched."""
        return not self.host_network and bool(self.ips)

    @cached_property
    def intervals(self) -> tuple[tuple[int, int, int], ...]:
        """Its addresses as (IP version, first, last), like IPBlock.intervals."""
        return tuple((ip.version, int(ip), int(ip)) for ip in self.ips)

    @cached_property
    def texts(self) -> tuple[tuple[int, str], ...]:
        """Its addresses as (IP version, text): netaddr's str() is slow, and every compile writes them."""
        return tuple((ip.version, str(ip)) for ip in self.ips)

    def named_port(self, name: str, protocol: str) -> list[int]:
        return sorted({p.port for p in self.ports if p.name == name and p.protocol == protocol})


@dataclass(frozen=True)
class IPBlock:
    cidr: netaddr.IPNetwork
    excepts: tuple[netaddr.IPNetwork, ...] = ()

    @cached_property
    def intervals(self) -> tuple[tuple[int, int, int], ...]:
        """The cidr minus its excepts as (IP version, first, last) integer ranges."""
        rest = netaddr.IPSet([self.cidr]) - netaddr.IPSet(self.excepts)
        return tuple((r.version, r.first, r.last) for r in rest.iter_ipranges())

    def __contains__(self, ip: netaddr.IPAddress) -> bool:
        value = int(ip)
        return any(v == ip.version and first <= value <= last for v, first, last in self.intervals)


@dataclass(frozen=True)
class Peer:
    """podSelector and/or namespaceSelector (both: AND), or an ipBlock alone."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PortSpec:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol; str: a named port
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] = ()  # empty: every source (ingress) or destination (egress)
    ports: tuple[PortSpec, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[str]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> Key:
        return ("NetworkPolicy", self.namespace, self.name)


Object = Namespace | Pod | NetworkPolicy


# ---- parsing -------------------------------------------------------------------------------------------------


def _dict(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where} must be a mapping, not {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{where} must be a list, not {type(v).__name__}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where} must be a non-empty string")
    return v


def _labels(v: Any, where: str) -> dict[str, str]:
    out = {}
    for k, val in _dict(v, where).items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise ValueError(f"{where}: label {k!r}: {val!r} must be a string to a string (quote numbers and booleans)")
        out[sys.intern(k)] = sys.intern(val)  # the same labels recur on many pods: one string each
    return out


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where} must be an integer from {lo} to {hi}, not {v!r}")
    return v


def parse_selector(v: Any, where: str) -> LabelSelector:
    d = _dict(v, where)
    unknown = set(d) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    reqs = []
    for i, e in enumerate(_list(d.get("matchExpressions"), f"{where}.matchExpressions")):
        w = f"{where}.matchExpressions[{i}]"
        e = _dict(e, w)
        key, op = _str(e.get("key"), f"{w}.key"), e.get("operator")
        if op not in _OPERATORS:
            raise ValueError(f"{w}.operator must be one of {', '.join(_OPERATORS)}, not {op!r}")
        values = _list(e.get("values"), f"{w}.values")
        if not all(isinstance(x, str) for x in values):
            raise ValueError(f"{w}.values must be strings")
        if op in ("In", "NotIn") and not values:
            raise ValueError(f"{w}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{w}: operator {op} takes no values")
        reqs.append(Requirement(key, op, frozenset(values)))
    labels = _labels(d.get("matchLabels"), f"{where}.matchLabels")
    return LabelSelector(tuple(sorted(labels.items())), tuple(reqs))


def _network(v: Any, where: str) -> netaddr.IPNetwork:
    try:
        if not isinstance(v, str) or "/" not in v:
            raise ValueError
        net = netaddr.IPNetwork(v)
    except (ValueError, netaddr.AddrFormatError):
        raise ValueError(f"{where} must be a CIDR, not {v!r}") from None
    return net.cidr


def parse_peer(v: Any, where: str) -> Peer:
    d = _dict(v, where)
    unknown = set(d) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    if "ipBlock" in d:
        if "podSelector" in d or "namespaceSelector" in d:
            raise ValueError(f"{where}: ipBlock cannot be combined with a selector")
        b = _dict(d["ipBlock"], f"{where}.ipBlock")
        cidr = _network(b.get("cidr"), f"{where}.ipBlock.cidr")
        excepts = []
        for i, x in enumerate(_list(b.get("except"), f"{where}.ipBlock.except")):
            net = _network(x, f"{where}.ipBlock.except[{i}]")
            if net.version != cidr.version or net not in cidr or net == cidr:
                raise ValueError(f"{where}.ipBlock.except[{i}] {net} must lie strictly inside cidr {cidr}")
            excepts.append(net)
        return Peer(ip_block=IPBlock(cidr, tuple(excepts)))
    if "podSelector" not in d and "namespaceSelector" not in d:
        raise ValueError(f"{where} must have a podSelector, a namespaceSelector or an ipBlock")
    pods = parse_selector(d["podSelector"], f"{where}.podSelector") if "podSelector" in d else None
    nss = parse_selector(d["namespaceSelector"], f"{where}.namespaceSelector") if "namespaceSelector" in d else None
    return Peer(pods, nss)


def parse_port(v: Any, where: str) -> PortSpec:
    d = _dict(v, where)
    proto = d.get("protocol", "TCP")
    if proto not in PROTOCOLS:
        raise ValueError(f"{where}.protocol must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
    port = d.get("port")
    end = d.get("endPort")
    if isinstance(port, str):
        if not _PORT_NAME.match(port):
            raise ValueError(f"{where}.port {port!r} is not a valid port name")
        if end is not None:
            raise ValueError(f"{where}.endPort needs a numeric port")
        return PortSpec(proto, port)
    if port is None:
        if end is not None:
            raise ValueError(f"{where}.endPort needs a port")
        return PortSpec(proto)
    port = _int(port, f"{where}.port", 1, 65535)
    if end is not None:
        end = _int(end, f"{where}.endPort", port, 65535)
    return PortSpec(proto, port, end)


def parse_rule(v: Any, where: str, peers_key: str) -> Rule:
    d = _dict(v, where)
    unknown = set(d) - {peers_key, "ports"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    peers = [parse_peer(p, f"{where}.{peers_key}[{i}]") for i, p in enumerate(_list(d.get(peers_key), where))]
    ports = [parse_port(p, f"{where}.ports[{i}]") for i, p in enumerate(_list(d.get("ports"), where))]
    return Rule(tuple(peers), tuple(ports))


def _meta(obj: dict[str, Any], namespaced: bool) -> tuple[str, str, dict[str, str]]:
    meta = _dict(obj.get("metadata"), "metadata")
    name = _str(meta.get("name"), "metadata.name")
    ns = ""
    if namespaced:
        ns = meta.get("namespace", "default")
        ns = sys.intern(_str(ns, "metadata.namespace"))
    return ns, name, _labels(meta.get("labels"), "metadata.labels")


def _ips(status: dict[str, Any]) -> tuple[netaddr.IPAddress, ...]:
    raw = [_dict(x, "status.podIPs[]").get("ip") for x in _list(status.get("podIPs"), "status.podIPs")]
    if not raw and status.get("podIP"):
        raw = [status["podIP"]]
    out = []
    for ip in raw:
        try:
            if not isinstance(ip, str):
                raise ValueError
            out.append(netaddr.IPAddress(ip))
        except (ValueError, netaddr.AddrFormatError):
            raise ValueError(f"status.podIPs: {ip!r} is not an IP address") from None
    return tuple(out)


def object_key(obj: Any) -> Key | None:
    """kind, namespace, name of a raw object, as far as they can be read (for error messages)."""
    if not isinstance(obj, dict):
        return None
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    kind, name = obj.get("kind"), meta.get("name")
    if not isinstance(kind, str) or not isinstance(name, str):
        return None
    ns = "" if kind == "Namespace" else meta.get("namespace", "default")
    return kind, ns if isinstance(ns, str) else "?", name


def parse(obj: Any) -> Object:
    """One API object. Raises ObjectError naming the object."""
    key = object_key(obj)
    label = describe(key) if key else "an object without kind or metadata.name"
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"must be a mapping, not {type(obj).__name__}")
        kind = obj.get("kind")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        api = obj.get("apiVersion")
        want = "networking.k8s.io/v1" if kind == "NetworkPolicy" else "v1"
        if api is not None and api != want:
            raise ValueError(f"apiVersion {api!r}: {kind} must be {want}")
        if kind == "Namespace":
            _, name, labels = _meta(obj, False)
            labels.setdefault(NAME_LABEL, name)
            return Namespace(name, labels)
        if kind == "Pod":
            return _pod(obj)
        return _policy(obj)
    except ValueError as e:
        raise ObjectError(f"{label}: {e}") from None


def _pod(obj: dict[str, Any]) -> Pod:
    ns, name, labels = _meta(obj, True)
    spec = _dict(obj.get("spec"), "spec")
    status = _dict(obj.get("status"), "status")
    ports = []
    for ci, c in enumerate(_list(spec.get("containers"), "spec.containers")):
        c = _dict(c, f"spec.containers[{ci}]")
        for pi, p in enumerate(_list(c.get("ports"), f"spec.containers[{ci}].ports")):
            w = f"spec.containers[{ci}].ports[{pi}]"
            p = _dict(p, w)
            proto = p.get("protocol", "TCP")
            if proto not in PROTOCOLS:
                raise ValueError(f"{w}.protocol must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
            number = _int(p.get("containerPort"), f"{w}.containerPort", 1, 65535)
            pname = p.get("name")
            if pname is not None:
                if not isinstance(pname, str) or not _PORT_NAME.match(pname):
                    raise ValueError(f"{w}.name {pname!r} is not a valid port name")
                ports.append(ContainerPort(pname, proto, number))
    host = spec.get("hostNetwork", False)
    if not isinstance(host, bool):
        raise ValueError("spec.hostNetwork must be a boolean")
    node = spec.get("nodeName", "")
    if not isinstance(node, str):
        raise ValueError("spec.nodeName must be a string")
    ips = _ips(status)
    if status.get("phase") in ("Succeeded", "Failed"):
        ips = ()  # a finished pod's address may already belong to another pod
    return Pod(ns, name, labels, ips, host, sys.intern(node), tuple(ports))


def _policy(obj: dict[str, Any]) -> NetworkPolicy:
    ns, name, _ = _meta(obj, True)
    spec = _dict(obj.get("spec"), "spec")
    unknown = set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}
    if unknown:
        raise ValueError(f"spec: unknown field {sorted(unknown)[0]!r}")
    if "podSelector" not in spec:
        raise ValueError("spec.podSelector is required (use {} for every pod in the namespace)")
    selector = parse_selector(spec["podSelector"], "spec.podSelector")
    ingress = tuple(parse_rule(r, f"spec.ingress[{i}]", "from")
                    for i, r in enumerate(_list(spec.get("ingress"), "spec.ingress")))
    egress = tuple(parse_rule(r, f"spec.egress[{i}]", "to")
                   for i, r in enumerate(_list(spec.get("egress"), "spec.egress")))
    types = spec.get("policyTypes")
    if types is None or types == []:
        kinds = {"Ingress"} | ({"Egress"} if egress else set())
    else:
        types = _list(types, "spec.policyTypes")
        bad = [t for t in types if t not in ("Ingress", "Egress")]
        if bad:
            raise ValueError(f"spec.policyTypes: {bad[0]!r} is not Ingress or Egress")
        kinds = set(types)
    return NetworkPolicy(ns, name, selector, frozenset(kinds), ingress, egress)


def expand(doc: Any) -> Iterable[Any]:
    """The objects in one document: itself, or the items of a `kind: List` (or any *List)."""
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") \
            and "items" in doc:
        items = doc["items"]
        if not isinstance(items, list):
            raise ObjectError(f"{doc['kind']}: items must be a list")
        kind = doc["kind"][: -len("List")]
        for item in items:
            if kind in KINDS and isinstance(item, dict) and "kind" not in item:
                item = {**item, "kind": kind}  # API list responses leave kind off their items
            yield item
    elif doc is not None:
        yield doc
