"""The weftd command line: the options (weftd.options), then the command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from weftd import backend, options, subnet
from weftd.config import ConfigError, NetworkConfig, Paths
from weftd.option import show_listen
from weftlib.version import version

if TYPE_CHECKING:
    from weftd.metrics import Metrics
    from weftd.policy.engine import PolicyEngine

log = logging.getLogger("weftd")
Origins = dict[str, str]  # each option's source: its flag, its variable's name, or "default"


def _network(args: argparse.Namespace, origins: Origins) -> NetworkConfig | None:
    """The --net-conf file's network config; None if the default file does not exist (the store's config
    is used). A file named by the flag or the variable must exist."""
    if not Path(args.net_conf).exists():
        origin = origins.get("net_conf", "default")
        if origin == "default":
            return None
        raise ConfigError(f"{origin} {args.net_conf}: no such file" if origin.startswith("-")
                          else f"{origin}={args.net_conf}: no such file")
    return NetworkConfig.load(args.net_conf)


def _store(args: argparse.Namespace, network: NetworkConfig | None,
           stop: threading.Event | None = None) -> subnet.SubnetStore:
    """The store the options name; with weftd's `stop`, connected (SubnetStore.connect: it may wait for the store)."""
    try:
        store = subnet.types()[args.store].from_args(args, network)
        if stop is not None:
            store.connect(stop)
        return store
    except subnet.NoNetworkConfig as e:
        raise ConfigError(f"{e}, and the network config {args.net_conf} (--net-conf) does not exist") from None


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


def _policy(args: argparse.Namespace, paths: Paths, metrics: Metrics, stop: threading.Event) -> PolicyEngine | None:
    """The NetworkPolicy engine --policy-dir or --policy-kube asks for (not started: it touches nothing yet)."""
    if args.policy_dir and args.policy_kube:
        raise ConfigError("--policy-dir and --policy-kube are two sources of the same objects: choose one")
    if not (args.policy_dir or args.policy_kube):
        return None
    from weftd.nodeconf import NETWORK_NAME
    from weftd.policy.engine import PolicyEngine, Source

    if args.policy_kube:
        from weftd.policy.kube import KubeSource

        try:
            source: Source = KubeSource(args.kubeconfig, stop=stop)
        except ConfigError as e:
            raise ConfigError(f"--policy-kube: {e}") from None
    else:
        from weftd.policy.source import DirSource

        source = DirSource(Path(args.policy_dir))
    return PolicyEngine(args.node_name, source, paths.policy_state, paths.ipam_data_dir / NETWORK_NAME,
                        metrics.registry, args.resync, args.policy_nflog_group)


def cmd_run(args: argparse.Namespace, origins: Origins) -> int:
    from weftd import shutdown

    return shutdown.run(lambda stop: _run(args, origins, stop))


def _run(args: argparse.Namespace, origins: Origins, stop: threading.Event) -> int:
    """`weftd run` until `stop` is set (weftd.shutdown sets it on SIGTERM or SIGINT)."""
    from pyroute2 import IPRoute

    from weftd import netfilter
    from weftd.backend.underlay import find_underlay
    from weftd.daemon import Daemon
    from weftd.metrics import Health, Metrics, serve
    from weftd.retry import Retry

    # Everything that can be refused is checked before the first change to the kernel: the network
    # config, the policy source, the listen address (bound now), the store, the underlay. The first line
    # logged comes after.
    network = _network(args, origins)
    paths = _paths(args)
    metrics, health = Metrics(), Health(max_age=max(30.0, 3 * args.resync))
    policy = _policy(args, paths, metrics, stop)
    try:
        server = serve(args.listen, metrics, health)
    except OSError as e:
        raise ConfigError(f"--listen {show_listen(args.listen)}: {e.strerror or e}") from None
    store = _store(args, network, stop)
    net = store.network
    ipr = IPRoute()
    underlay = find_underlay(ipr, args.iface, args.public_ip, args.public_ipv6, tuple(f.version for f in net.families))
    # Its VTEP MAC is kept across restarts: worth waiting for, since the lease needs the store too.
    published = Retry("reading this node's published lease", stop, log).call(lambda: store.lease(args.node_name),
                                                                              (subnet.StoreError,))
    log.info("weftd %s on %s: underlay %s %s (MTU %d), store %s", version(), args.node_name, underlay.ifname,
             " ".join(str(a) for a in (underlay.ip, underlay.ip6) if a is not None), underlay.mtu, args.store)
    node_backend = backend.create(ipr, net.backend, net.networks, underlay,
                                  published.attrs if published is not None else None, args)
    rules = netfilter.install(net.networks, net.ip_masq, None if args.iptables_mode == "auto" else args.iptables_mode)
    cni = None
    if paths.cni_socket is not None and not can_enter_netns():
        log.warning("no CAP_SYS_ADMIN: not serving the plugin; it runs each invocation itself")
        paths = dataclasses.replace(paths, cni_socket=None)
    if paths.cni_socket is not None:
        from weftd.cniserver import CniServer

        cni = CniServer(paths.cni_socket, metrics, policy)
        cni.start()
    daemon = Daemon(args.node_name, ipr, store, node_backend, rules, paths, metrics, health, args.resync,
                    portmap=not args.no_portmap, bridge=args.bridge, policy=policy, stop=stop)
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


def cmd_uninstall(args: argparse.Namespace, origins: Origins) -> int:
    from pyroute2 import IPRoute

    from ipam.reservations import Reservations
    from weftd import netfilter, nodeconf
    from weftd.policy.tables import remove_tables

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


def cmd_remove_node(args: argparse.Namespace, origins: Origins) -> int:
    gone = _store(args, _network(args, origins)).remove(args.node_name)
    log.info("lease of %s %s", args.node_name, "removed" if gone else "was not in the store")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        args, origins = options.parse(sys.argv[1:] if argv is None else argv, os.environ, version())
    except options.OptionError as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
    if args.command == "version":
        print(f"weftd {version()}")
        sys.exit(0)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pyroute2.config.log  # noqa: F401 - it resets the "pyroute2" logger's level when imported

    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    for var in options.unknown_variables(options.declared(), os.environ):
        log.warning("ignoring %s: weftd has no such option", var)
    from weftd.backend.errors import BackendError
    from weftd.netfilter import NetfilterError

    try:
        code = {"run": cmd_run, "uninstall": cmd_uninstall, "remove-node": cmd_remove_node}[args.command](args, origins)
    except (ConfigError, subnet.StoreError, BackendError, NetfilterError) as e:
        log.error("%s", e)
        code = 2
    # Not sys.exit: weftd's threads (watches, servers) may still be inside calls, and the interpreter's
    # finalization beside them can abort the process (seen: SIGABRT after SIGTERM).
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
