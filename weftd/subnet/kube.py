"""Kubernetes Node objects as the store.

A node's subnet is `spec.podCIDRs` (allocated by the controller-manager). The
node publishes how to reach it as annotations, patched through `nodes/status`,
and watches all Nodes. API calls made here, and so the RBAC they need:
nodes get (read_node), nodes list and watch (list_node), nodes/status patch
(patch_node_status).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import netaddr

from weftd.config import NetworkConfig
from weftd.lease import Attrs, Lease, LeaseError
from weftd.subnet import StoreError, SubnetManager, log

PREFIX = "weft.dev"
ANN_MANAGED = f"{PREFIX}/kube-subnet-manager"
ANN_TYPE = f"{PREFIX}/backend-type"
ANN_DATA = f"{PREFIX}/backend-data"
ANN_IP = f"{PREFIX}/public-ip"
ANN_IP_OVERWRITE = f"{PREFIX}/public-ip-overwrite"

# The API calls this module makes, as (resource, verb); the RBAC test checks the manifest grants them.
API_CALLS = (("nodes", "get"), ("nodes", "list"), ("nodes", "watch"), ("nodes/status", "patch"))


def node_annotations(attrs: Attrs) -> dict[str, str]:
    return {ANN_MANAGED: "true", ANN_TYPE: attrs.backend_type, ANN_DATA: json.dumps(attrs.backend_data()),
            ANN_IP: str(attrs.public_ip)}


def pod_cidr(node: dict[str, Any], network: NetworkConfig) -> netaddr.IPNetwork:
    """The node's IPv4 pod CIDR, which must lie inside the cluster network."""
    spec = node.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    name = (node.get("metadata") or {}).get("name")
    v4 = [c for c in cidrs if netaddr.IPNetwork(c).version == 4]
    if not v4:
        raise StoreError(f"node {name!r} pod cidr not assigned")
    subnet = netaddr.IPNetwork(v4[0]).cidr
    if subnet not in network.network:
        raise StoreError(f"node {name!r} pod cidr {subnet} is outside the cluster network {network.network}")
    return subnet


def lease_from_node(node: dict[str, Any], network: NetworkConfig) -> Lease | None:
    """The lease a Node object publishes, or None if the node is not (yet) managed by Weft."""
    meta = node.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if ann.get(ANN_MANAGED) != "true":
        return None
    try:
        subnet = pod_cidr(node, network)
        data = json.loads(ann.get(ANN_DATA) or "null")
        raw = {"Node": meta["name"], "PublicIP": ann.get(ANN_IP_OVERWRITE) or ann[ANN_IP],
               "BackendType": ann.get(ANN_TYPE), "BackendData": data}
        return Lease.from_json(raw, subnet=str(subnet))
    except (StoreError, LeaseError, KeyError, ValueError, netaddr.AddrFormatError) as e:
        log.warning("ignoring node %s: %s", meta.get("name"), e)
        return None


class KubeManager(SubnetManager):
    def __init__(self, network: NetworkConfig, kubeconfig: str | None = None, api: Any = None) -> None:
        self.network = network
        if api is None:
            from kubernetes import client, config

            if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
                config.load_incluster_config()
            else:
                config.load_kube_config(config_file=kubeconfig)
            api = client.CoreV1Api()
        self.api = api
        self._nodes: dict[str, dict[str, Any]] = {}
        self._synced = False
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        return self.api.api_client.sanitize_for_serialization(obj)

    def acquire(self, node: str, attrs: Attrs) -> Lease:
        try:
            obj = self._dict(self.api.read_node(node))
            subnet = pod_cidr(obj, self.network)
            self.api.patch_node_status(node, {"metadata": {"annotations": node_annotations(attrs)}})
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - ApiException, urllib3 errors: the API is unreachable
            raise StoreError(f"kube API: {type(e).__name__}: {e}") from None
        self._start()
        return Lease(node, subnet, attrs)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="kube-watch", daemon=True)
            self._thread.start()

    def replace_all(self, nodes: list[Any]) -> None:
        """The result of a LIST: the whole cache."""
        with self._lock:
            self._nodes = {n["metadata"]["name"]: n for n in map(self._dict, nodes)}
            self._synced = True
        self._changed.set()

    def apply(self, event_type: str, node: Any) -> None:
        """One WATCH event."""
        obj = self._dict(node)
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(obj["metadata"]["name"], None)
            else:
                self._nodes[obj["metadata"]["name"]] = obj
        self._changed.set()

    def _watch(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                listed = self.api.list_node()
                self.replace_all(listed.items)
                w = watch.Watch()
                for ev in w.stream(self.api.list_node, resource_version=listed.metadata.resource_version,
                                   timeout_seconds=300):
                    self.apply(ev["type"], ev["object"])
                    if self._stop.is_set():
                        w.stop()
            except Exception as e:  # noqa: BLE001 - relist after any watch failure
                log.warning("kube watch: %s", e)
                self._stop.wait(1.0)

    def leases(self) -> dict[str, Lease]:
        with self._lock:
            if not self._synced:
                raise StoreError("node list not synced yet")
            nodes = list(self._nodes.values())
        return {lease.node: lease for n in nodes if (lease := lease_from_node(n, self.network)) is not None}

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def close(self) -> None:
        self._stop.set()
