"""What weftd writes for the node: its state file (Flannel's subnet.env) and the CNI conflist.

Both are written atomically (temporary file, then rename) and only once the
backend is ready, so no pod ever sees half a config.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import netaddr
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugin import handoff
from cni_plugin.attachment import GROUP, get_link
from weftd.config import NetworkConfig, Paths

log = logging.getLogger("weftd.nodeconf")
NETWORK_NAME = "weft"
BRIDGE = "cni0"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> bool:
    """Writes `text` to `path` unless it already holds it; True if it changed."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def gateway(subnet: netaddr.IPNetwork) -> netaddr.IPNetwork:
    return netaddr.IPNetwork(f"{subnet.network + 1}/{subnet.prefixlen}")


def subnet_env(network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int) -> str:
    return (f"WEFT_NETWORK={network.network}\nWEFT_SUBNET={gateway(subnet)}\nWEFT_MTU={mtu}\n"
            f"WEFT_IPMASQ={'true' if network.ip_masq else 'false'}\nWEFT_BACKEND={network.backend.type}\n")


def conflist(network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int, paths: Paths,
             portmap: bool = True) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = [{
        "type": "weft", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "forceAddress": True, "mtu": mtu,
        "ipam": {"type": "weft-ipam", "subnet": str(subnet), "dataDir": str(paths.ipam_data_dir),
                 "routes": [{"dst": str(network.network)}]},
    }]
    if paths.cni_socket is not None:
        plugins[0][handoff.SOCKET_KEY] = str(paths.cni_socket)
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}


def write(paths: Paths, network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int, portmap: bool = True) -> bool:
    env = write_atomic(paths.subnet_file, subnet_env(network, subnet, mtu))
    conf = write_atomic(paths.conflist, json.dumps(conflist(network, subnet, mtu, paths, portmap), indent=2) + "\n")
    return env or conf


def fix_bridge(ipr: IPRoute, network: NetworkConfig, subnet: netaddr.IPNetwork) -> None:
    """When the node's subnet changed, cni0 still holds the old gateway: replace it (Flannel's
    "cni0 already has an IP address different from ..."). Only a bridge Weft created is touched."""
    br = get_link(ipr, BRIDGE)
    if br is None:
        return
    gw = gateway(subnet)
    stale = [a for a in ipr.get_addr(family=socket.AF_INET, index=br["index"])
             if netaddr.IPAddress(a.get("IFA_ADDRESS")) in network.network
             and netaddr.IPNetwork(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}") != gw]
    if not stale:
        return
    if br.get("group") != GROUP:
        log.error("%s holds %s but was not created by weft; leaving it alone", BRIDGE,
                  ", ".join(a.get("IFA_ADDRESS") for a in stale))
        return
    for a in stale:
        log.warning("%s: replacing stale address %s/%d with %s", BRIDGE, a.get("IFA_ADDRESS"), a["prefixlen"], gw)
        try:
            ipr.addr("del", index=br["index"], address=a.get("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:
                raise
    try:
        ipr.addr("add", index=br["index"], address=str(gw.ip), prefixlen=gw.prefixlen)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def remove(paths: Paths) -> None:
    for p in (paths.conflist, paths.subnet_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
