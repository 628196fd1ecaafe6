"""`weft`: the CNI verbs, top to bottom as the spec describes them.

Only the standard library is imported at module level; the netlink and nftables
modules are imported by the verbs that touch them, so VERSION, STATUS and bad input
stay cheap.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cni_plugin import delegate
from cni_plugin.config import NetConf
from weftlib import ipnet
from weftlib.cni import errors, skel
from weftlib.cni.attachments import valid_attachments
from weftlib.cni.errors import CniError
from weftlib.cni.result import Interface, IPConfig, Result, Route
from weftlib.kernel.netlink import host_veth_name
from weftlib.kernel.netns import NetNS, NotNetNS

if TYPE_CHECKING:
    from ipam.config import IPAMConfig

PLUGIN = "weft"


@contextmanager
def open_netns(args: skel.Args) -> Iterator[NetNS]:
    path = args.netns
    try:
        ns = NetNS(path, args.netns_fd)
    except FileNotFoundError:
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS {path} does not exist") from None
    except NotNetNS as e:
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS: {e}") from None
    except OSError as e:
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS {path}: {e.strerror}") from None
    with ns:
        yield ns


def plan_routes(conf: NetConf, ipam: Result) -> tuple[list[ipnet.IPInterface], list[Route], list[Route]]:
    """Bridge gateways, routes to program in the pod (gw filled in), and routes to report."""
    gateways = []
    family_gw: dict[int, Any] = {}
    for ip in ipam.ips:
        gw = ip.gateway
        if gw is None and conf.is_gateway:
            gw = ipnet.gateway(ip.address.network)
            ip.gateway = gw
        if gw is not None:
            family_gw.setdefault(gw.version, gw)
            if conf.is_gateway:
                gateways.append(ipnet.gateway_interface(ip.address.network, gw))
    reported = list(ipam.routes)
    if conf.is_default_gateway:
        for version, gw in family_gw.items():
            default = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
            if not any(r.dst == default and r.gw is not None for r in reported):
                reported.append(Route(default, gw))
    programmed = [Route(r.dst, r.gw or family_gw.get(r.dst.version), r.mtu, r.advmss, r.priority, r.table, r.scope)
                  for r in reported]
    return gateways, programmed, reported


def planned_gateways(conf: NetConf, ipam_conf: IPAMConfig | None) -> list[ipnet.IPInterface]:
    """The bridge addresses an in-process weft-ipam allocation will need, known before allocating."""
    if not conf.is_gateway or ipam_conf is None:
        return []
    return [ipnet.gateway_interface(rs[0].subnet, rs[0].gateway) for rs in ipam_conf.range_sets
            if rs[0].gateway is not None]


def parse_ipam(conf: NetConf, args: skel.Args, raw: dict[str, Any]) -> IPAMConfig | None:
    """weft-ipam's config when it runs in-process, parsed once for the whole invocation."""
    if conf.ipam_type != delegate.IN_PROCESS:
        return None
    from ipam.config import IPAMConfig

    return IPAMConfig.parse(raw, args)


def cmd_add(args: skel.Args, raw: dict[str, Any]) -> Result:
    conf = NetConf.parse(raw)
    ipam_conf = parse_ipam(conf, args, raw)
    gateways = planned_gateways(conf, ipam_conf)
    with open_netns(args) as ns:
        from weftlib.kernel.rtnl import Rtnl

        with Rtnl() as rt, Rtnl.open_in(ns) as pod:
            return _attach(conf, args, raw, ipam_conf, ns, rt, pod, gateways)


def _attach(conf: NetConf, args: skel.Args, raw: dict[str, Any], ipam_conf: IPAMConfig | None, ns: NetNS,
            rt: Any, pod: Any, gateways: list[Any]) -> Result:
    """ADD's changes, each with its undo, after the read-only checks that refuse bad input."""
    from cni_plugin import attachment, masq

    # Read-only checks first, so that refused input changes nothing on the node.
    if pod.link(args.ifname) is not None:
        raise CniError(errors.INVALID_ENV, f"interface {args.ifname} already exists in {args.netns}")
    br = attachment.find_bridge(rt, conf.bridge)
    attachment.refuse_conflicts(br, gateways, conf.force_address)
    undo: list[Callable[[], object]] = []
    try:
        ipam = delegate.ipam("ADD", args, raw, conf.ipam_type, ipam_conf)
        assert ipam is not None
        undo.append(lambda: delegate.ipam("DEL", args, raw, conf.ipam_type, ipam_conf))
        if not ipam.ips:
            raise CniError(errors.INVALID_CONFIG, "IPAM plugin returned no IP addresses")
        gateways, programmed, reported = plan_routes(conf, ipam)
        if attachment.ensure_bridge(rt, br, conf.mtu, conf.promisc):
            undo.append(lambda: attachment.delete_bridge_if_unused(rt, br.index))
        if conf.is_gateway:  # checks the addresses again: an exec'd IPAM's gateways are known only now
            attachment.ensure_bridge_addresses(rt, br, gateways, conf.force_address)
        host_name = host_veth_name(args.container_id, args.ifname)
        undo.append(lambda: attachment.delete_host_veth(rt, host_name))
        veth = attachment.create_veth(rt, pod, ns, args.ifname, host_name, conf.mtu, br.index, conf.hairpin,
                                      attachment.alias(conf.name, args.container_id, args.ifname))
        attachment.configure_container(pod, ns, veth, [ip.address for ip in ipam.ips], programmed,
                                       conf.enable_dad)
        if conf.ip_masq:
            undo.append(lambda: masq.remove(conf.name, args.container_id, args.ifname))
            masq.add(conf.name, args.container_id, args.ifname, [ip.address for ip in ipam.ips])
        bridge = Interface(conf.bridge, br.mac)
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep undoing; the first error is what matters
                sys.stderr.write(f"{PLUGIN}: rollback step failed: {e}\n")
        raise
    result = conf.prev_result or Result()
    base = len(result.interfaces)
    result.interfaces += [bridge, veth.host, veth.container]
    result.ips += [IPConfig(ip.address, ip.gateway, base + 2) for ip in ipam.ips]
    result.routes += reported
    result.dns = conf.dns or (ipam.dns if not ipam.dns.empty() else result.dns)
    return result


def _delete_host_veth(host_name: str) -> None:
    from cni_plugin import attachment
    from weftlib.kernel.rtnl import Rtnl

    with Rtnl() as rt:
        attachment.delete_host_veth(rt, host_name)


def cmd_del(args: skel.Args, raw: dict[str, Any]) -> None:
    conf = NetConf.parse(raw)
    from cni_plugin import masq

    # The host end is named after its owner, so DEL needs neither the netns nor prevResult;
    # deleting it takes the pod's end with it.
    _delete_host_veth(host_veth_name(args.container_id, args.ifname))
    delegate.ipam("DEL", args, raw, conf.ipam_type, parse_ipam(conf, args, raw))
    if conf.ip_masq:
        masq.remove(conf.name, args.container_id, args.ifname)


def cmd_check(args: skel.Args, raw: dict[str, Any]) -> None:
    conf = NetConf.parse(raw)
    prev = conf.prev_result
    if prev is None:
        raise CniError(errors.INVALID_CONFIG, "Required prevResult missing")
    delegate.ipam("CHECK", args, raw, conf.ipam_type, parse_ipam(conf, args, raw))
    found = [i for i, iface in enumerate(prev.interfaces) if iface.name == args.ifname and iface.sandbox == args.netns]
    if not found:
        raise CniError(errors.INVALID_CONFIG, f"prevResult has no interface {args.ifname} in {args.netns}")
    container = prev.interfaces[found[0]]
    addresses = [ip.address for ip in prev.ips if ip.interface == found[0]]
    from cni_plugin import attachment, masq
    from weftlib.kernel.rtnl import Rtnl

    with open_netns(args) as ns, Rtnl() as rt:
        attachment.check(rt, ns, conf.bridge, host_veth_name(args.container_id, args.ifname),
                         container, addresses, prev.routes)
    if conf.ip_masq and not masq.present(conf.name, args.container_id, args.ifname, addresses):
        raise CniError(errors.INVALID_CONFIG, f"masquerade rules for {args.container_id}/{args.ifname} are missing",
                       msg="attachment check failed")


def cmd_gc(args: skel.Args, raw: dict[str, Any]) -> None:
    conf = NetConf.parse(raw)
    valid = valid_attachments(raw)
    failures = []
    try:
        delegate.ipam("GC", args, raw, conf.ipam_type, parse_ipam(conf, args, raw), valid)
    except CniError as e:
        failures.append(str(e))
    from cni_plugin import attachment, masq
    from weftlib.kernel.rtnl import Rtnl

    with Rtnl() as rt:
        labelled, unlabelled = attachment.weft_veths(rt, conf.name)
        for cid, ifname in labelled:
            if (cid, ifname) not in valid:
                attachment.delete_host_veth(rt, host_veth_name(cid, ifname))
        for name in unlabelled:
            attachment.delete_host_veth(rt, name)
    try:
        masq.collect(conf.name, valid)
    except CniError as e:
        failures.append(str(e))
    if failures:
        raise CniError(errors.INTERNAL, "; ".join(failures), msg="garbage collection incomplete")


def cmd_status(args: skel.Args, raw: dict[str, Any]) -> None:
    conf = NetConf.parse(raw)
    try:
        delegate.ipam("STATUS", args, raw, conf.ipam_type, parse_ipam(conf, args, raw))
    except CniError as e:
        if e.code in (errors.NOT_AVAILABLE, errors.LIMITED_CONNECTIVITY):
            raise
        raise CniError(errors.NOT_AVAILABLE, f"IPAM {conf.ipam_type}: {e}") from None


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}
