"""Address conventions every part of Weft shares.

Weft uses two IP libraries, on purpose. Everything on the per-pod path (weftlib, cni_plugin,
ipam) uses the standard library's ipaddress, which the interpreter has at hand. Importing
netaddr costs at least 37 ms per process (`python -X importtime -c "import netaddr"`, best of
several runs on the 2-core development machine), which every `weft` run that does not hand off
to weftd would pay. weftd, a long-running daemon, uses netaddr (cluster network arithmetic,
subnet allocation, MAC normalisation) and converts at its edge with this module.
"""

from __future__ import annotations

import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def gateway(subnet: IPNetwork) -> IPAddress:
    """A subnet's gateway when none is configured: its first host (host-local's and Flannel's rule)."""
    return subnet.network_address + 1


def gateway_interface(subnet: IPNetwork, address: IPAddress | None = None) -> IPInterface:
    """The gateway (`address`, or else the subnet's first host) with the subnet's prefix, as it sits on the
    bridge."""
    return ipaddress.ip_interface(f"{address if address is not None else gateway(subnet)}/{subnet.prefixlen}")
