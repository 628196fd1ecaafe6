"""Kubernetes Node objects as the store.

A node's subnet is `spec.podCIDRs` (allocated by the controller-manager). The
node publishes how to reach it as annotations, patched through `nodes/status`,
and watches all Nodes. Once its routes are programmed it sets the Node condition
NetworkUnavailable=False, as Flannel does. API calls made here, and so the RBAC
they need: nodes get (read_node), nodes list and watch (list_node), nodes/status
patch (patch_node_status: the annotations and the condition).

The Node list/watch is weftd.kubeclient.reflect_raw: the watch resumes from the
last resourceVersion it saw, as client-go's reflector does, and only when the
server says that version is gone (410) does it list again. Each Node's JSON is cut
down at once to what weftd reads (node_record).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import netaddr

from weftd import kubeclient
from weftd.config import ConfigError, NetworkConfig
from weftd.lease import Attrs, Lease, LeaseError
from weftd.option import ALL, Option, existing_file
from weftd.retry import wait_either
from weftd.subnet import LeaseCache, StoreError, Subnets, SubnetStore, log, register

PREFIX = "weft.dev"
ANN_MANAGED = f"{PREFIX}/kube-subnet-manager"
ANN_TYPE = f"{PREFIX}/backend-type"
ANN_DATA = f"{PREFIX}/backend-data"
ANN_IP = f"{PREFIX}/public-ip"
ANN_IP_OVERWRITE = f"{PREFIX}/public-ip-overwrite"
ANN_DATA6 = f"{PREFIX}/backend-v6-data"
ANN_IP6 = f"{PREFIX}/public-ipv6"
ANN_IP6_OVERWRITE = f"{PREFIX}/public-ipv6-overwrite"

# The API calls this module makes, as (resource, verb); the RBAC test checks the manifest grants them.
API_CALLS = (("nodes", "get"), ("nodes", "list"), ("nodes", "watch"), ("nodes/status", "patch"))
# Built-in objects take strategic merge patches: conditions merge by type, so kubelet's stay.
PATCH = "application/strategic-merge-patch+json"


def node_annotations(attrs: Attrs) -> dict[str, str | None]:
    """Flannel's annotations. A family the node does not publish is removed (None in a merge patch)."""
    ann: dict[str, str | None] = {ANN_MANAGED: "true", ANN_TYPE: attrs.backend_type}
    ann[ANN_IP] = None if attrs.public_ip is None else str(attrs.public_ip)
    ann[ANN_DATA] = json.dumps(attrs.backend_data) if attrs.public_ip is not None else None
    ann[ANN_IP6] = None if attrs.public_ipv6 is None else str(attrs.public_ipv6)
    ann[ANN_DATA6] = json.dumps(attrs.backend_v6_data) if attrs.public_ipv6 is not None else None
    return ann


def node_record(node: dict[str, Any]) -> dict[str, Any]:
    """Of a Node's JSON, what weftd reads (its name, pod CIDRs and weft.dev annotations), in the same shape, so
    the cache holds no more than that, and a change to anything else (a status heartbeat) compares equal."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(f"{PREFIX}/")}
    return {"metadata": {"name": meta.get("name"), "annotations": ann},
            "spec": {k: spec[k] for k in ("podCIDR", "podCIDRs") if k in spec}}


def network_up_condition(now: datetime | None = None) -> dict[str, str]:
    """What Flannel sets once a node's routes are in place, so the node stops being tainted unreachable."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp",
            "message": "Weft is running on this node", "lastTransitionTime": stamp, "lastHeartbeatTime": stamp}


def pod_cidrs(node: dict[str, Any], network: NetworkConfig) -> Subnets:
    """The node's (IPv4, IPv6) pod CIDRs from spec.podCIDRs (or the older spec.podCIDR): at most one per family,
    each inside its family's cluster network, one for every enabled family (a disabled family's is ignored)."""
    spec = node.get("spec") or {}
    raw = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    name = (node.get("metadata") or {}).get("name")
    by_family: dict[int, netaddr.IPNetwork] = {}
    for c in raw:
        try:
            cidr = netaddr.IPNetwork(c).cidr
        except (netaddr.AddrFormatError, TypeError, ValueError):
            raise StoreError(f"node {name!r} pod cidr {c!r} is not a CIDR") from None
        if cidr.version in by_family:
            raise StoreError(f"node {name!r} has more than one IPv{cidr.version} pod cidr: {raw}")
        by_family[cidr.version] = cidr
    out: list[netaddr.IPNetwork | None] = []
    for version in (4, 6):
        family = network.family(version)
        if family is None:
            out.append(None)
            continue
        cidr = by_family.get(version)
        if cidr is None:
            raise StoreError(f"node {name!r} IPv{version} pod cidr not assigned (podCIDRs {raw}); "
                             f"the controller-manager's --cluster-cidr must include {family.network}")
        if cidr not in family.network:
            raise StoreError(f"node {name!r} pod cidr {cidr} is outside the cluster network {family.network}")
        out.append(cidr)
    return out[0], out[1]


def lease_from_node(node: dict[str, Any], network: NetworkConfig) -> Lease | None:
    """The lease a Node object publishes, or None if the node is not (yet) managed by Weft."""
    meta = node.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if ann.get(ANN_MANAGED) != "true":
        return None
    try:
        v4, v6 = pod_cidrs(node, network)
        raw = {"Node": meta["name"], "PublicIP": ann.get(ANN_IP_OVERWRITE) or ann.get(ANN_IP),
               "PublicIPv6": ann.get(ANN_IP6_OVERWRITE) or ann.get(ANN_IP6),
               "BackendType": ann.get(ANN_TYPE), "BackendData": json.loads(ann.get(ANN_DATA) or "null"),
               "BackendV6Data": json.loads(ann.get(ANN_DATA6) or "null")}
        return Lease.from_json(raw, subnet=None if v4 is None else str(v4), ipv6_subnet=None if v6 is None else str(v6))
    except (StoreError, LeaseError, KeyError, ValueError, netaddr.AddrFormatError) as e:
        log.warning("ignoring node %s: %s", meta.get("name"), e)
        return None


@register
class KubeStore(SubnetStore):
    name = "kube"
    options = (Option("--kubeconfig", "kube store and --policy-kube: the API server's kubeconfig", ALL,
                      existing_file, shown_default="in-cluster (the pod's service account), else ~/.kube/config",
                      metavar="FILE"),)

    @classmethod
    def from_args(cls, args: argparse.Namespace, network: NetworkConfig | None) -> KubeStore:
        if network is None:
            raise ConfigError(f"network config {args.net_conf} does not exist (the kube store needs it)")
        return cls(network, args.kubeconfig)

    def __init__(self, network: NetworkConfig, kubeconfig: str | None = None, api: Any = None,
                 watch: bool = True) -> None:
        """`api`: a CoreV1Api (default: from the kubeconfig or the pod's service account); `watch`: False
        to keep the node cache filled only through replace_all() and apply()."""
        self.network = network
        if api is None:
            from kubernetes import client

            api = client.CoreV1Api(kubeclient.load(kubeconfig))
        self.api = api
        self.server = kubeclient.server(api)
        self._nodes: dict[str, dict[str, Any]] = {}
        self._synced = False
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watching = watch
        # By name: node_record()s, so comparing one with the last round's costs next to nothing.
        self.cache = LeaseCache(lambda _name, node: lease_from_node(node, self.network))

    def _error(self, e: Exception) -> StoreError:
        return StoreError(kubeclient.describe(self.server, e))

    def _read_node(self, node: str) -> dict[str, Any]:
        try:
            resp = self.api.read_node(node, _preload_content=False, _request_timeout=kubeclient.TIMEOUT)
            return node_record(json.loads(resp.data))
        except Exception as e:  # noqa: BLE001 - ApiException, urllib3 errors: the API is unreachable
            raise self._error(e) from None

    def lease(self, node: str) -> Lease | None:
        return lease_from_node(self._read_node(node), self.network)

    def remove(self, node: str) -> bool:
        raise StoreError("in kube mode a node's lease goes away with its Node object")

    def acquire(self, node: str, attrs: Attrs) -> Lease:
        obj = self._read_node(node)
        try:
            v4, v6 = pod_cidrs(obj, self.network)
            self.api.patch_node_status(node, {"metadata": {"annotations": node_annotations(attrs)}},
                                       _content_type=PATCH, _request_timeout=kubeclient.TIMEOUT)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - ApiException, urllib3 errors: the API is unreachable
            raise self._error(e) from None
        self._start()
        return Lease(node, v4, attrs, v6)

    def network_ready(self, node: str) -> None:
        try:
            self.api.patch_node_status(node, {"status": {"conditions": [network_up_condition()]}},
                                       _content_type=PATCH, _request_timeout=kubeclient.TIMEOUT)
        except Exception as e:  # noqa: BLE001 - as in acquire
            raise self._error(e) from None

    def _start(self) -> None:
        if self._thread is None and self._watching:
            self._thread = threading.Thread(target=self._watch, name="kube-watch", daemon=True)
            self._thread.start()

    def replace_all(self, nodes: Iterable[dict[str, Any]]) -> None:
        """The result of a LIST (Node JSON, read page by page): the whole cache. If reading fails midway, the cache
        keeps what it had."""
        listed = {r["metadata"]["name"]: r for r in map(node_record, nodes)}
        with self._lock:
            self._nodes = listed
            self._synced = True
        self._changed.set()

    def apply(self, event_type: str, node: dict[str, Any]) -> None:
        """One WATCH event, with its Node's JSON."""
        record = node_record(node)
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(record["metadata"]["name"], None)
            else:
                self._nodes[record["metadata"]["name"]] = record
        self._changed.set()

    def _watch(self) -> None:
        kubeclient.reflect_raw("Node list/watch", self.api.list_node, self.replace_all, self.apply, self.stop)

    def leases(self) -> dict[str, Lease]:
        with self._lock:
            if not self._synced:
                raise StoreError("node list not synced yet")
            nodes = list(self._nodes.items())
        return {lease.node: lease for lease in self.cache.leases(nodes).values()}

    def wait(self, timeout: float) -> None:
        wait_either(self._changed, self.stop, timeout)
        self._changed.clear()
