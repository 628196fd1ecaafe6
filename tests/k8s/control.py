"""The control plane on the control-plane node, as kind runs it: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager, with certificates from tests/kubeapi's CA and one kubeconfig per identity."""

from __future__ import annotations

from pathlib import Path

from tests.k8s.layout import APISERVER_PORT, KUBE_BIN, NODE_CIDR_MASK, POD_CIDR, SERVICE_CIDR, Layout, Record
from tests.k8s.node import KubeNode
from tests.kubeapi import apiserver_command, etcd_command, make_pki, write_kubeconfig

SCHEDULER = "kube-scheduler"
CONTROLLER_MANAGER = "kube-controller-manager"
KUBE_PROXY = "kube-proxy"


def identities(nodes: list[str]) -> dict[str, str]:
    """The client certificates beside the admin's: each kubelet as its node (the Node authorizer's
    system:node:<name>), and the components as the users the default RBAC bindings name."""
    return {**{n: f"/O=system:nodes/CN=system:node:{n}" for n in nodes},
            KUBE_PROXY: "/CN=system:kube-proxy", SCHEDULER: "/CN=system:kube-scheduler",
            CONTROLLER_MANAGER: "/CN=system:kube-controller-manager"}


def make_credentials(layout: Layout, control: KubeNode, nodes: list[str]) -> None:
    """The PKI and a kubeconfig per identity under `layout.pki`, pointing at the apiserver on the
    control-plane node's address."""
    ids = identities(nodes)
    make_pki(layout.pki, ips=(control.ip,), clients=ids)
    server = f"https://{control.ip}:{APISERVER_PORT}"
    for name in (*ids, "admin"):
        write_kubeconfig(kubeconfig(layout, name), server, layout.pki / "ca.crt",
                         {"client-certificate": str(layout.pki / f"{name}.crt"),
                          "client-key": str(layout.pki / f"{name}.key")})


def kubeconfig(layout: Layout, identity: str) -> Path:
    return layout.pki / f"{identity}.kubeconfig"


def start_etcd_apiserver(layout: Layout, record: Record, control: KubeNode) -> None:
    pki = layout.pki
    control.spawn(record, "etcd", *etcd_command(control.name, control.dir / "etcd"))
    control.spawn(record, "kube-apiserver", *apiserver_command(
        KUBE_BIN / "kube-apiserver", pki, control.ip, SERVICE_CIDR,
        "--enable-admission-plugins", "NodeRestriction",
        # Node names do not resolve; kubectl exec and logs reach kubelets by address.
        "--kubelet-preferred-address-types", "InternalIP",
        "--kubelet-client-certificate", str(pki / "admin.crt"), "--kubelet-client-key", str(pki / "admin.key")))


def start_scheduler_controller_manager(layout: Layout, record: Record, control: KubeNode) -> None:
    pki = layout.pki
    for name in (SCHEDULER, CONTROLLER_MANAGER):
        conf = str(kubeconfig(layout, name))
        extra = [] if name == SCHEDULER else [
            "--allocate-node-cidrs", "--cluster-cidr", POD_CIDR, "--node-cidr-mask-size", str(NODE_CIDR_MASK),
            "--service-cluster-ip-range", SERVICE_CIDR, "--service-account-private-key-file", str(pki / "sa.key"),
            "--root-ca-file", str(pki / "ca.crt"), "--use-service-account-credentials"]
        control.spawn(record, name, str(KUBE_BIN / name), "--kubeconfig", conf, "--authentication-kubeconfig", conf,
                      "--authorization-kubeconfig", conf, "--bind-address", "127.0.0.1", "--leader-elect=false",
                      *extra)
