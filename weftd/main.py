"""The weftd command line. Every flag can also be set as WEFTD_<FLAG> in the environment."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from weftd.config import ConfigError, NetworkConfig, Paths

log = logging.getLogger("weftd")


def _env(flag: str, default: Any = None) -> Any:
    return os.environ.get("WEFTD_" + flag.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weftd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node-name", default=_env("node-name", os.environ.get("NODE_NAME", socket.gethostname())))
        sp.add_argument("--store", choices=("file", "etcd", "kube"), default=_env("store", "file"))
        sp.add_argument("--store-path", default=_env("store-path", "/var/lib/weft/store.json"),
                        help="file store: the shared JSON file")
        sp.add_argument("--etcd-endpoint", default=_env("etcd-endpoint", "http://127.0.0.1:2379"))
        sp.add_argument("--etcd-prefix", default=_env("etcd-prefix", "/weft/network"))
        sp.add_argument("--etcd-ttl", type=int, default=int(_env("etcd-ttl", 24 * 3600)))
        sp.add_argument("--kubeconfig", default=_env("kubeconfig"))
        sp.add_argument("--net-conf", default=_env("net-conf", "/etc/weft/net-conf.json"),
                        help="cluster network config; seeds the file and etcd stores, is the config in kube mode")
        sp.add_argument("--log-level", default=_env("log-level", "info"))

    run = sub.add_parser("run", help="connect this node's pods to every peer's")
    common(run)
    run.add_argument("--iface", default=_env("iface"), help="underlay interface (default: the default route's)")
    run.add_argument("--public-ip", default=_env("public-ip"), help="underlay address peers reach this node at")
    run.add_argument("--subnet-file", default=_env("subnet-file", str(Paths.subnet_file)))
    run.add_argument("--cni-conf-dir", default=_env("cni-conf-dir", str(Paths.cni_conf_dir)))
    run.add_argument("--cni-conf-name", default=_env("cni-conf-name", Paths.cni_conf_name))
    run.add_argument("--ipam-data-dir", default=_env("ipam-data-dir", str(Paths.ipam_data_dir)))
    run.add_argument("--cni-socket", default=_env("cni-socket", str(Paths.cni_socket)),
                     help="serve the weft plugin's invocations here ('' to let it run them itself)")
    run.add_argument("--listen", default=_env("listen", "127.0.0.1:9808"), help="health and metrics address")
    run.add_argument("--resync", type=float, default=float(_env("resync", 10)), help="seconds between full checks")
    run.add_argument("--iptables-mode", choices=("auto", "nft", "legacy"), default=_env("iptables-mode", "auto"))
    run.add_argument("--no-portmap", action="store_true", default=bool(_env("no-portmap")),
                     help="leave portmap out of the conflist")

    un = sub.add_parser("uninstall", help="remove everything weftd made on this node")
    common(un)
    un.add_argument("--subnet-file", default=_env("subnet-file", str(Paths.subnet_file)))
    un.add_argument("--cni-conf-dir", default=_env("cni-conf-dir", str(Paths.cni_conf_dir)))
    un.add_argument("--cni-conf-name", default=_env("cni-conf-name", Paths.cni_conf_name))
    un.add_argument("--vni", type=int, default=int(_env("vni", 1)))

    rm = sub.add_parser("remove-node", help="delete a node's lease from the file or etcd store")
    common(rm)
    return p


def _network(args: argparse.Namespace, required: bool) -> NetworkConfig | None:
    if Path(args.net_conf).exists():
        return NetworkConfig.load(args.net_conf)
    if required:
        raise ConfigError(f"network config {args.net_conf} does not exist")
    return None


def _manager(args: argparse.Namespace) -> Any:
    if args.store == "file":
        from weftd.subnet.file import FileManager

        return FileManager(args.store_path, _network(args, False))
    if args.store == "etcd":
        from weftd.subnet.etcd import EtcdManager

        return EtcdManager(args.etcd_endpoint, args.etcd_prefix, args.etcd_ttl, _network(args, False))
    from weftd.subnet.kube import KubeManager

    net = _network(args, True)
    assert net is not None
    return KubeManager(net, args.kubeconfig)


def _paths(args: argparse.Namespace) -> Paths:
    sock = getattr(args, "cni_socket", "")
    return Paths(Path(args.subnet_file), Path(args.cni_conf_dir), args.cni_conf_name,
                 Path(getattr(args, "ipam_data_dir", Paths.ipam_data_dir)), Path(sock) if sock else None)


def can_enter_netns() -> bool:
    """Serving the plugin means setns() into pod namespaces, which needs CAP_SYS_ADMIN."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))
        return bool(int(caps, 16) & (1 << 21))
    except (OSError, StopIteration, ValueError):
        return False


def cmd_run(args: argparse.Namespace) -> int:
    from pyroute2 import IPRoute

    from weftd import netfilter
    from weftd.backend import find_underlay
    from weftd.daemon import Daemon
    from weftd.metrics import Health, Metrics, serve

    manager = _manager(args)
    net = manager.network
    ipr = IPRoute()
    underlay = find_underlay(ipr, args.iface, args.public_ip)
    if net.backend.type == "vxlan":
        from weftd.backend.vxlan import VXLAN

        stored = None
        try:
            prior = manager.leases().get(args.node_name)
            stored = prior.attrs.vtep_mac if prior is not None else None
        except Exception:  # noqa: BLE001 - no prior lease to learn the MAC from
            pass
        backend: Any = VXLAN(ipr, net.backend, underlay, stored_mac=stored)
    else:
        from weftd.backend.hostgw import HostGW

        backend = HostGW(ipr, net.backend, underlay)
    rules = netfilter.install(net.network, net.ip_masq, None if args.iptables_mode == "auto" else args.iptables_mode)
    metrics, health = Metrics(), Health(max_age=max(30.0, 3 * args.resync))
    server = serve(args.listen, metrics, health)
    paths = _paths(args)
    cni = None
    if paths.cni_socket is not None and not can_enter_netns():
        log.warning("no CAP_SYS_ADMIN: not serving the plugin; it runs each invocation itself")
        paths = dataclasses.replace(paths, cni_socket=None)
    if paths.cni_socket is not None:
        from weftd.cniserver import CniServer

        cni = CniServer(paths.cni_socket, metrics)
        cni.start()
    daemon = Daemon(args.node_name, ipr, manager, backend, rules, paths, metrics, health, args.resync,
                    portmap=not args.no_portmap)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    log.info("weftd on %s: underlay %s %s (MTU %d), store %s", args.node_name, underlay.ifname, underlay.ip,
             underlay.mtu, args.store)
    try:
        daemon.run()
    finally:
        if cni is not None:
            cni.stop()
        server.shutdown()
        ipr.close()
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    import netaddr
    from pyroute2 import IPRoute

    from cni_plugin.attachment import GROUP, get_link
    from weftd import netfilter, nodeconf
    from weftd.backend import Stats, sync_routes

    with IPRoute() as ipr:
        sync_routes(ipr, {}, Stats())
        link = get_link(ipr, f"weft.{args.vni}")
        if link is not None and link.get("group") == GROUP:
            ipr.link("del", index=link["index"])
    for mode in ("nft", "legacy"):
        rules = netfilter.rules_for(mode, netaddr.IPNetwork("0.0.0.0/0"), True)
        if rules.present():
            rules.remove()
    nodeconf.remove(_paths(args))
    log.info("removed weft's routes, VTEP, netfilter rules and node config")
    return 0


def cmd_remove_node(args: argparse.Namespace) -> int:
    if args.store == "kube":
        raise ConfigError("in kube mode a node's lease goes away with its Node object")
    gone = _manager(args).remove(args.node_name)
    log.info("lease of %s %s", args.node_name, "removed" if gone else "was not in the store")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pyroute2.config.log  # noqa: F401 - it resets the "pyroute2" logger's level when imported

    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    from weftd.backend import BackendError
    from weftd.subnet import StoreError

    try:
        code = {"run": cmd_run, "uninstall": cmd_uninstall, "remove-node": cmd_remove_node}[args.command](args)
    except (ConfigError, StoreError, BackendError) as e:
        log.error("%s", e)
        code = 2
    sys.exit(code)
