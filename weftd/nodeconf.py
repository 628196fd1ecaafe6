"""What weftd writes for the node: its state file (Flannel's subnet.env) and the CNI conflist.

Both are written atomically (temporary file, then rename) and only once the
backend is ready, so no pod ever sees half a config. Both are weftd's: at every
resync, one that anything else changed, replaced or removed is written again.
The bridge's gateway follows the plugin's rule (weftlib.ipnet), so its addresses
are ipaddress objects here, converted once from the lease's netaddr subnets.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import Any

import netaddr
from pyroute2 import IPRoute

from weftd.config import NetworkConfig, Paths
from weftd.lease import Lease
from weftlib import ipnet
from weftlib.cni import handoff
from weftlib.kernel import files
from weftlib.kernel.netlink import get_link, ignore_errno, owned
from weftlib.kernel.rtnl import IFA_F_NODAD

log = logging.getLogger("weftd.nodeconf")
NETWORK_NAME = "weft"


def gateway(subnet: netaddr.IPNetwork) -> ipnet.IPInterface:
    """The node's gateway on the bridge of a netaddr subnet, with the subnet's prefix (weftlib.ipnet's rule)."""
    return ipnet.gateway_interface(ipaddress.ip_network(str(subnet)))


def subnet_env(network: NetworkConfig, own: Lease, mtu: int) -> str:
    """Flannel's subnet.env keys with Weft's prefix; a family's keys only when it is enabled."""
    out = []
    if network.network is not None and own.subnet is not None:
        out += [f"WEFT_NETWORK={network.network}", f"WEFT_SUBNET={gateway(own.subnet)}"]
    if network.ipv6_network is not None and own.ipv6_subnet is not None:
        out += [f"WEFT_IPV6_NETWORK={network.ipv6_network}", f"WEFT_IPV6_SUBNET={gateway(own.ipv6_subnet)}"]
    out += [f"WEFT_MTU={mtu}", f"WEFT_IPMASQ={'true' if network.ip_masq else 'false'}",
            f"WEFT_BACKEND={network.backend.type}"]
    return "".join(f"{line}\n" for line in out)


def conflist(bridge: str, network: NetworkConfig, own: Lease, mtu: int, paths: Paths,
             portmap: bool = True) -> dict[str, Any]:
    """Dual stack: one IPAM range set per family ([[v4], [v6]], as Flannel's plugin builds it); one family: its
    `subnet` (host-local's shorthand for one range). Routes to every network."""
    ipam: dict[str, Any] = {"type": "weft-ipam"}
    if len(own.subnets) > 1:
        ipam["ranges"] = [[{"subnet": str(s)}] for s in own.subnets]
    else:
        ipam["subnet"] = str(own.subnets[0])
    ipam.update({"dataDir": str(paths.ipam_data_dir), "routes": [{"dst": str(n)} for n in network.networks]})
    plugins: list[dict[str, Any]] = [{
        "type": "weft", "bridge": bridge, "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "forceAddress": True, "mtu": mtu, "ipam": ipam,
    }]
    if paths.cni_socket is not None:
        plugins[0][handoff.SOCKET_KEY] = str(paths.cni_socket)
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}


def write(paths: Paths, bridge: str, network: NetworkConfig, own: Lease, mtu: int, portmap: bool = True) -> list[Path]:
    """The subnet file, then the conflist, each replaced atomically and only if its content differs (whoever
    changed, edited or removed it); returns the files that were rewritten."""
    wanted = {paths.subnet_file: subnet_env(network, own, mtu),
              paths.conflist: json.dumps(conflist(bridge, network, own, mtu, paths, portmap), indent=2) + "\n"}
    return [path for path, text in wanted.items() if files.replace_if_changed(path, text)]


def fix_bridge(ipr: IPRoute, bridge: str, network: NetworkConfig, own: Lease) -> None:
    """When the node's subnet changed, cni0 still holds the old gateway: replace it (Flannel's
    "cni0 already has an IP address different from ..."), in each family. Only a bridge Weft created is touched."""
    br = get_link(ipr, bridge)
    if br is None:
        return
    for fam in network.families:
        subnet = own.family_subnet(fam.version)
        if subnet is not None:
            _fix_gateway(ipr, bridge, br, ipaddress.ip_network(str(fam.network)), gateway(subnet))


def _fix_gateway(ipr: IPRoute, bridge: str, br: Any, network: ipnet.IPNetwork, gw: ipnet.IPInterface) -> None:
    family = socket.AF_INET if gw.version == 4 else socket.AF_INET6
    stale = [a for a in ipr.get_addr(family=family, index=br["index"])
             if ipaddress.ip_address(a.get("IFA_ADDRESS")) in network
             and ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}") != gw]
    if not stale:
        return
    if not owned(br):
        log.error("%s holds %s but was not created by weft; leaving it alone", bridge,
                  ", ".join(a.get("IFA_ADDRESS") for a in stale))
        return
    for a in stale:
        log.warning("%s: replacing stale address %s/%d with %s", bridge, a.get("IFA_ADDRESS"), a["prefixlen"], gw)
        ignore_errno(ipr.addr, "del", index=br["index"], address=a.get("IFA_ADDRESS"), prefixlen=a["prefixlen"],
                     codes=(errno.EADDRNOTAVAIL,))
    extra = {} if gw.version == 4 else {"flags": IFA_F_NODAD}  # usable at once, as the plugin adds it
    ignore_errno(ipr.addr, "add", index=br["index"], address=str(gw.ip), prefixlen=gw.network.prefixlen,
                 codes=(errno.EEXIST,), **extra)


def remove(paths: Paths) -> None:
    """Uninstall: every file weftd writes on the node."""
    for p in (paths.conflist, paths.subnet_file, paths.policy_state):
        files.unlink(str(p))


def remove_bridge(ipr: IPRoute, bridge: str) -> None:
    """Uninstall: the pod bridge goes if Weft created it and no pod is attached to it any more."""
    br = get_link(ipr, bridge)
    if br is None:
        return
    if not owned(br):
        log.info("%s was not created by weft; leaving it alone", bridge)
        return
    ports = [link.get("ifname") for link in ipr.get_links() if link.get("master") == br["index"]]
    if ports:
        log.warning("%s still has pods attached (%s): left in place", bridge, ", ".join(ports))
        return
    ignore_errno(ipr.link, "del", index=br["index"], codes=(errno.ENODEV,))
