"""A pod as weftd's CNI server hands it on: one typed value per ADD it served, and the interface of what must
act on a pod before the runtime gets the ADD's answer (the NetworkPolicy engine).

The value is built from what the invocation itself validated and answered (skel.Outcome's environment and
result), not from its text: the pod's name from CNI_ARGS, its addresses as address objects, its veth's host
end as the result names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from weftlib.cni import skel
from weftlib.cni.result import Result
from weftlib.ipnet import IPInterface


class Refused(Exception):
    """What a hook raises when it cannot take a pod: weftd rolls the ADD back and fails it with this message."""


@dataclass(frozen=True)
class Attachment:
    """A pod this node has just attached."""

    namespace: str  # K8S_POD_NAMESPACE; "" for a container that is not a Kubernetes pod
    name: str  # K8S_POD_NAME
    container_id: str
    ifname: str  # inside the pod
    host_veth: str  # the host end of its veth
    addresses: tuple[IPInterface, ...]

    @classmethod
    def of(cls, args: skel.Args, result: Result) -> Attachment:
        """From an ADD's environment and result. The plugin lists the bridge, the veth's host end and its pod
        end, and the addresses name the pod end: the host end is the interface before it. Raises ValueError
        for a result that is not laid out so."""
        index = next((ip.interface for ip in result.ips if ip.interface is not None), None)
        if index is None or not 0 < index < len(result.interfaces) or result.interfaces[index - 1].sandbox:
            raise ValueError("the ADD's result names no host end of a veth")
        return cls(args.args.get("K8S_POD_NAMESPACE", ""), args.args.get("K8S_POD_NAME", ""), args.container_id,
                   args.ifname, result.interfaces[index - 1].name, tuple(ip.address for ip in result.ips))


class PodHook(Protocol):
    """Told of each pod this node attaches or detaches, before the runtime gets the answer."""

    def attached(self, pod: Attachment) -> None:
        """Raises Refused (or anything else) if the pod cannot run as it must: weftd then rolls its ADD back."""

    def detached(self, container_id: str) -> None:
        """The pod is gone either way: what fails here is logged."""
