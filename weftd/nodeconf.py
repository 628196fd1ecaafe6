"""What weftd writes for the node: its state file (Flannel's subnet.env) and the CNI conflist.

Both are written atomically (temporary file, then rename) and only once the
backend is ready, so no pod ever sees half a config.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.config import NetworkConfig, Paths
from weftlib import ipnet
from weftlib.cni import handoff
from weftlib.kernel import files
from weftlib.kernel.netlink import GROUP, get_link, ignore_errno

log = logging.getLogger("weftd.nodeconf")
NETWORK_NAME = "weft"


def gateway(subnet: netaddr.IPNetwork) -> netaddr.IPNetwork:
    """The node's gateway on the bridge, with the subnet's prefix (weftlib.ipnet's rule)."""
    return netaddr.IPNetwork(str(ipnet.gateway_interface(ipaddress.ip_network(str(subnet)))))


def subnet_env(network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int) -> str:
    return (f"WEFT_NETWORK={network.network}\nWEFT_SUBNET={gateway(subnet)}\nWEFT_MTU={mtu}\n"
            f"WEFT_IPMASQ={'true' if network.ip_masq else 'false'}\nWEFT_BACKEND={network.backend.type}\n")


def conflist(bridge: str, network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int, paths: Paths,
             portmap: bool = True) -> dict[str, Any]:
    plugins: list[dict[str, Any]] = [{
        "type": "weft", "bridge": bridge, "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "forceAddress": True, "mtu": mtu,
        "ipam": {"type": "weft-ipam", "subnet": str(subnet), "dataDir": str(paths.ipam_data_dir),
                 "routes": [{"dst": str(network.network)}]},
    }]
    if paths.cni_socket is not None:
        plugins[0][handoff.SOCKET_KEY] = str(paths.cni_socket)
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}


def write(paths: Paths, bridge: str, network: NetworkConfig, subnet: netaddr.IPNetwork, mtu: int,
          portmap: bool = True) -> bool:
    env = files.replace_if_changed(paths.subnet_file, subnet_env(network, subnet, mtu))
    conf = files.replace_if_changed(paths.conflist,
                                    json.dumps(conflist(bridge, network, subnet, mtu, paths, portmap), indent=2) + "\n")
    return env or conf


def fix_bridge(ipr: IPRoute, bridge: str, network: NetworkConfig, subnet: netaddr.IPNetwork) -> None:
    """When the node's subnet changed, cni0 still holds the old gateway: replace it (Flannel's
    "cni0 already has an IP address different from ..."). Only a bridge Weft created is touched."""
    br = get_link(ipr, bridge)
    if br is None:
        return
    gw = gateway(subnet)
    stale = [a for a in ipr.get_addr(family=socket.AF_INET, index=br["index"])
             if network.network is not None and netaddr.IPAddress(a.get("IFA_ADDRESS")) in network.network
             and netaddr.IPNetwork(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}") != gw]
    if not stale:
        return
    if br.get("group") != GROUP:
        log.error("%s holds %s but was not created by weft; leaving it alone", bridge,
                  ", ".join(a.get("IFA_ADDRESS") for a in stale))
        return
    for a in stale:
        log.warning("%s: replacing stale address %s/%d with %s", bridge, a.get("IFA_ADDRESS"), a["prefixlen"], gw)
        ignore_errno(ipr.addr, "del", index=br["index"], address=a.get("IFA_ADDRESS"), prefixlen=a["prefixlen"],
                     codes=(errno.EADDRNOTAVAIL,))
    ignore_errno(ipr.addr, "add", index=br["index"], address=str(gw.ip), prefixlen=gw.prefixlen, codes=(errno.EEXIST,))


def remove(paths: Paths) -> None:
    for p in (paths.conflist, paths.subnet_file):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
