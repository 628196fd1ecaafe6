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

from cni_plugin.config import DEFAULT_BRIDGE
from weftd import backend, subnet
from weftd.config import ConfigError, NetworkConfig, Paths

log = logging.getLogger("weftd")


def _env(flag: str, default: Any = None) -> Any:
    return os.environ.get("WEFTD_" + flag.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weftd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    stores = subnet.types()

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node-name", default=_env("node-name", os.environ.get("NODE_NAME", socket.gethostname())))
        sp.add_argument("--store", choices=sorted(stores), default=_env("store", "file"))
        for store in stores.values():
            store.add_arguments(sp, _env)
        sp.add_argument("--net-conf", default=_env("net-conf", "/etc/weft/net-conf.json"),
                        help="cluster network config; seeds the file and etcd stores, is the config in kube mode")
        sp.add_argument("--log-level", default=_env("log-level", "info"))

    run = sub.add_parser("run", help="connect this node's pods to every peer's")
    common(run)
    run.add_argument("--iface", default=_env("iface"), help="underlay interface (default: the default route's)")
    run.add_argument("--public-ip", default=_env("public-ip"), help="underlay address peers reach this node at")
    run.add_argument("--public-ipv6", default=_env("public-ipv6"),
                     help="underlay IPv6 address peers reach this node at (IPv6 enabled; default: the interface's "
                          "first global one)")
    run.add_argument("--subnet-file", default=_env("subnet-file", str(Paths.subnet_file)))
    run.add_argument("--cni-conf-dir", default=_env("cni-conf-dir", str(Paths.cni_conf_dir)))
    run.add_argument("--cni-conf-name", default=_env("cni-conf-name", Paths.cni_conf_name))
    run.add_argument("--ipam-data-dir", default=_env("ipam-data-dir", str(Paths.ipam_data_dir)))
    run.add_argument("--bridge", default=_env("bridge", DEFAULT_BRIDGE),
                     help="the node bridge named in the conflist weftd writes")
    run.add_argument("--cni-socket", default=_env("cni-socket", str(Paths.cni_socket)),
                     help="serve the weft plugin's invocations here ('' to let it run them itself)")
    run.add_argument("--listen", default=_env("listen", "127.0.0.1:9808"), help="health and metrics address")
    run.add_argument("--resync", type=float, default=float(_env("resync", 10)), help="seconds between full checks")
    run.add_argument("--iptables-mode", choices=("auto", "nft", "legacy"), default=_env("iptables-mode", "auto"))
    run.add_argument("--policy-dir", default=_env("policy-dir"),
                     help="enforce NetworkPolicy from the Namespace, Pod and NetworkPolicy objects in this "
                          "directory (*.yaml, *.yml, *.json)")
    run.add_argument("--policy-nflog-group", type=int, default=_env("policy-nflog-group"),
                     help="also send denied packets to this NFLOG group and log them with pod names")
    run.add_argument("--policy-kube", action="store_true", default=bool(_env("policy-kube")),
                     help="enforce NetworkPolicy from the API server's Pods, Namespaces and NetworkPolicies "
                          "(--kubeconfig, or in-cluster)")
    run.add_argument("--no-portmap", action="store_true", default=bool(_env("no-portmap")),
                     help="leave portmap out of the conflist")

    un = sub.add_parser("uninstall", help="remove everything weftd made on this node")
    common(un)
    for sp in (run, un):
        for kind in backend.types().values():
            kind.add_arguments(sp, _env)
    un.add_argument("--subnet-file", default=_env("subnet-file", str(Paths.subnet_file)))
    un.add_argument("--cni-conf-dir", default=_env("cni-conf-dir", str(Paths.cni_conf_dir)))
    un.add_argument("--cni-conf-name", default=_env("cni-conf-name", Paths.cni_conf_name))
    un.add_argument("--ipam-data-dir", default=_env("ipam-data-dir", str(Paths.ipam_data_dir)))
    un.add_argument("--bridge", default=_env("bridge", DEFAULT_BRIDGE),
                    help="the node bridge, removed when Weft made it and no pod is attached to it")

    rm = sub.add_parser("remove-node", help="delete a node's lease from the file or etcd store")
    common(rm)
    return p


def _network(args: argparse.Namespace) -> NetworkConfig | None:
    """The --net-conf file's network config, if the file exists."""
    if Path(args.net_conf).exists():
        return NetworkConfig.load(args.net_conf)
    return None


def _store(args: argparse.Namespace) -> subnet.SubnetStore:
    return subnet.types()[args.store].from_args(args, _network(args))


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
    from weftd.daemon import Daemon
    from weftd.metrics import Health, Metrics, serve

    store = _store(args)
    net = store.network
    ipr = IPRoute()
    underlay = backend.find_underlay(ipr, args.iface, args.public_ip, args.public_ipv6,
                                     tuple(f.version for f in net.families))
    try:
        published = store.lease(args.node_name)
    except subnet.StoreError as e:
        log.warning("cannot read this node's published lease (%s); a new VTEP MAC may be chosen", e)
        published = None
    node_backend = backend.create(ipr, net, underlay, published.attrs if published is not None else None, args)
    rules = netfilter.install(net.networks, net.ip_masq, None if args.iptables_mode == "auto" else args.iptables_mode)
    metrics, health = Metrics(), Health(max_age=max(30.0, 3 * args.resync))
    server = serve(args.listen, metrics, health)
    paths = _paths(args)
    policy = None
    if args.policy_dir and args.policy_kube:
        raise ConfigError("--policy-dir and --policy-kube are two sources of the same objects: choose one")
    if args.policy_dir or args.policy_kube:
        from weftd.nodeconf import NETWORK_NAME
        from weftd.policy.engine import PolicyEngine, Source

        if args.policy_kube:
            from weftd.policy.kube import KubeSource

            source: Source = KubeSource(args.kubeconfig)
        else:
            from weftd.policy.source import DirSource

            source = DirSource(Path(args.policy_dir))
        policy = PolicyEngine(args.node_name, source,
                              paths.policy_state, paths.ipam_data_dir / NETWORK_NAME,
                              metrics.registry, args.resync, args.policy_nflog_group)
    cni = None
    if paths.cni_socket is not None and not can_enter_netns():
        log.warning("no CAP_SYS_ADMIN: not serving the plugin; it runs each invocation itself")
        paths = dataclasses.replace(paths, cni_socket=None)
    if paths.cni_socket is not None:
        from weftd.cniserver import CniServer

        cni = CniServer(paths.cni_socket, metrics, policy)
        cni.start()
    daemon = Daemon(args.node_name, ipr, store, node_backend, rules, paths, metrics, health, args.resync,
                    portmap=not args.no_portmap, bridge=args.bridge, policy=policy)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    log.info("weftd on %s: underlay %s %s (MTU %d), store %s", args.node_name, underlay.ifname,
             " ".join(str(a) for a in (underlay.ip, underlay.ip6) if a is not None), underlay.mtu, args.store)
    try:
        daemon.run()
    finally:
        if cni is not None:
            cni.stop()
        if policy is not None:
            policy.stop()
        server.shutdown()
        ipr.close()
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from pyroute2 import IPRoute

    from ipam.reservations import Reservations
    from weftd import netfilter, nodeconf
    from weftd.policy.engine import remove_tables

    paths = _paths(args)
    nodeconf.remove(paths)  # first: a runtime that reads the conflist now finds no network to attach pods to
    with IPRoute() as ipr:
        for kind in backend.types().values():
            kind.teardown(ipr, args)
        nodeconf.remove_bridge(ipr, args.bridge)
    netfilter.uninstall()
    remove_tables()
    leases = Reservations(str(paths.ipam_data_dir), nodeconf.NETWORK_NAME)
    if leases.exists():
        with leases:
            if not leases.remove_if_unused():
                log.warning("%s still holds reservations of pods: left in place", leases.dir)
    log.info("removed weft's routes, VTEP, WireGuard device, netfilter and policy rules, node config and empty "
             "pod bridge; the WireGuard key stays in the state directory")
    return 0


def cmd_remove_node(args: argparse.Namespace) -> int:
    gone = _store(args).remove(args.node_name)
    log.info("lease of %s %s", args.node_name, "removed" if gone else "was not in the store")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pyroute2.config.log  # noqa: F401 - it resets the "pyroute2" logger's level when imported

    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    from weftd.backend import BackendError
    from weftd.netfilter import NetfilterError

    try:
        code = {"run": cmd_run, "uninstall": cmd_uninstall, "remove-node": cmd_remove_node}[args.command](args)
    except (ConfigError, subnet.StoreError, BackendError, NetfilterError) as e:
        log.error("%s", e)
        code = 2
    sys.exit(code)
