"""weftd's options: each declared once, as data, with its environment variable (WEFTD_<FLAG>).

A flag on the command line wins over its variable, and the variable over the default. Flags, variables
and defaults go through the option's one parser, so a value that cannot be used is refused naming the
flag or the variable it came from, before weftd changes anything. Stores and backends declare their own
options (their `options`), for the commands that use them.

`python -m weftd.options --markdown` prints the operator's reference, a table of every option; `--readme
FILE` puts it into FILE between the markers BEGIN and END (`make docs`).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from weftd.config import Paths
from weftd.option import (
    ALL,
    COMMANDS,
    NODE,
    RUN,
    Option,
    address,
    boolean,
    existing_dir,
    file_name,
    ifname,
    integer,
    listen_address,
    name,
    path,
    positive_float,
    socket_path,
)
from weftlib.kernel.netlink import DEFAULT_BRIDGE

BEGIN, END = "<!-- weftd-options:begin -->", "<!-- weftd-options:end -->"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class OptionError(Exception):
    """A flag, variable or file weftd cannot use; the message is one line that names it."""


def _core_options(stores: Sequence[str]) -> list[Option]:
    return [
        Option("--node-name", "this node's name: its lease's key in the store (the Node's name in kube mode)", ALL,
               name, also_env=("NODE_NAME",), fallback=socket.gethostname,
               shown_default="$NODE_NAME, else the host name", metavar="NAME"),
        Option("--store", "where leases are kept: the Node objects (kube), etcd, or a JSON file shared by nodes on one "
               "machine (file)", ALL, default="file", choices=tuple(sorted(stores))),
    ]


def _common_options() -> list[Option]:
    return [
        Option("--net-conf", "the cluster network config (Flannel's net-conf.json): the config in kube mode; seeds "
               "the file and etcd stores, which keep theirs. A file named explicitly must exist", ALL, path,
               default="/etc/weft/net-conf.json", metavar="FILE"),
        Option("--log-level", "how much weftd logs", ALL, str.lower, default="info", choices=LOG_LEVELS),
    ]


def _node_options() -> list[Option]:
    return [
        Option("--iface", "the underlay interface peers are reached through", RUN, ifname,
               shown_default="the default route's interface", metavar="NAME"),
        Option("--public-ip", "the IPv4 address peers reach this node at; picks the interface holding it", RUN,
               address(4), shown_default="the interface's first global IPv4 address", metavar="ADDRESS"),
        Option("--public-ipv6", "the IPv6 address peers reach this node at (IPv6 enabled)", RUN, address(6),
               shown_default="the interface's first global IPv6 address", metavar="ADDRESS"),
        Option("--subnet-file", "this node's state file (Flannel's subnet.env, WEFT_* keys)", NODE, path,
               default=str(Paths.subnet_file), metavar="FILE"),
        Option("--cni-conf-dir", "where the CNI conflist is written", NODE, path, default=str(Paths.cni_conf_dir),
               metavar="DIR"),
        Option("--cni-conf-name", "the conflist's file name", NODE, file_name, default=Paths.cni_conf_name,
               metavar="NAME"),
        Option("--ipam-data-dir", "weft-ipam's reservations (the conflist's dataDir); uninstall removes Weft's "
               "network there when no pod holds an address", NODE, path, default=str(Paths.ipam_data_dir),
               metavar="DIR"),
        Option("--bridge", "the node bridge named in the conflist; uninstall removes it when Weft made it and no "
               "pod is attached to it", NODE, ifname, default=DEFAULT_BRIDGE, metavar="NAME"),
        Option("--cni-socket", "where weftd serves the weft plugin's invocations ('' to let the plugin run them "
               "itself)", RUN, socket_path, default=str(Paths.cni_socket), metavar="PATH"),
        Option("--listen", "the health (/healthz) and metrics (/metrics) address, HOST:PORT", RUN, listen_address,
               default="127.0.0.1:9808", metavar="HOST:PORT"),
        Option("--resync", "seconds between full checks of the kernel against the store", RUN, positive_float,
               default="10", metavar="SECONDS"),
        Option("--iptables-mode", "how NAT rules are written: nft or legacy; auto detects the node's (kubelet's)",
               RUN, default="auto", choices=("auto", "nft", "legacy")),
        Option("--policy-dir", "enforce NetworkPolicy from the Namespace, Pod and NetworkPolicy objects in this "
               "directory (*.yaml, *.yml, *.json)", RUN, existing_dir, metavar="DIR"),
        Option("--policy-nflog-group", "also send denied packets to this NFLOG group and log them with pod names",
               RUN, integer(0, 65535), metavar="GROUP"),
        Option("--policy-kube", "enforce NetworkPolicy from the API server's Pods, Namespaces and NetworkPolicies "
               "(--kubeconfig, or in-cluster)", RUN, boolean, default="false"),
        Option("--no-portmap", "leave portmap out of the conflist", RUN, boolean, default="false"),
    ]


def declared() -> list[Option]:
    """Every option of every command: weftd's own, each store's and each backend's."""
    from weftd import backend, subnet

    stores, backends = sorted(subnet.types().items()), sorted(backend.types().items())  # not in import order
    out = [*_core_options([name for name, _ in stores]), *(o for _, s in stores for o in s.options),
           *_common_options(), *_node_options(), *(o for _, b in backends for o in b.options)]
    seen: dict[str, Option] = {}
    for opt in out:
        if seen.setdefault(opt.flag, opt) is not opt:
            raise RuntimeError(f"{opt.flag} is declared twice")
    return out


def for_command(options: Iterable[Option], command: str) -> list[Option]:
    return [o for o in options if command in o.commands]


class _Parser(argparse.ArgumentParser):
    """Errors in one line, without the usage (which --help shows)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _help(opt: Option) -> str:
    return f"{opt.help} (default: {opt.describe_default()}; env {', '.join(opt.variables)})".replace("%", "%%")


def parser(options: Sequence[Option], version: str) -> argparse.ArgumentParser:
    """The command line. Flags are taken as strings: `resolve` parses them, with the environment."""
    p = _Parser(prog="weftd", description="Weft's node daemon. Every flag can also be set as WEFTD_<FLAG> in the "
                "environment; a flag given wins over its variable.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"weftd {version}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, summary in COMMANDS.items():
        sp = sub.add_parser(command, help=summary, description=f"weftd {command}: {summary}.", allow_abbrev=False)
        for opt in for_command(options, command):
            metavar = opt.metavar or ("{" + ",".join(opt.choices) + "}" if opt.choices else None)
            if opt.is_boolean:
                sp.add_argument(opt.flag, nargs="?", const="true", metavar="true|false", help=_help(opt))
            else:
                sp.add_argument(opt.flag, metavar=metavar, help=_help(opt))
    sub.add_parser("version", help="print weftd's version", description="Print weftd's version.", allow_abbrev=False)
    return p


def resolve(options: Sequence[Option], given: argparse.Namespace,
            environ: Mapping[str, str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """Each option's value: from its flag, else its variables, else its default. Also where each came from
    (the flag, the variable's name, or 'default'). Raises OptionError naming the flag or variable."""
    values = argparse.Namespace(command=given.command)
    origins: dict[str, str] = {}
    for opt in options:
        sources: list[tuple[str, str]] = []
        flag_value = getattr(given, opt.dest, None)
        if flag_value is not None:
            sources.append((opt.flag, flag_value))
        sources += [(var, environ[var]) for var in opt.variables if var in environ]
        value, origin = None, "default"
        for where, raw in sources:
            try:
                value = opt.convert(raw)
            except ValueError as e:
                said = f"{where} {raw!r}" if where.startswith("-") else f"{where}={raw!r}"
                raise OptionError(f"{said} {e}") from None
            if value is not None:
                origin = where
                break
        if value is None and opt.default is not None:
            value = opt.convert(opt.default)
        elif value is None and opt.fallback is not None:
            value = opt.fallback()
        setattr(values, opt.dest, value)
        origins[opt.dest] = origin
    return values, origins


def unknown_variables(options: Iterable[Option], environ: Mapping[str, str]) -> list[str]:
    """WEFTD_ variables that no option reads: a misspelt name would otherwise be ignored silently."""
    known = {v for o in options for v in o.variables}
    return sorted(v for v in environ if v.startswith("WEFTD_") and v not in known)


def parse(argv: Sequence[str], environ: Mapping[str, str],
          version: str) -> tuple[argparse.Namespace, dict[str, str]]:
    """weftd's command line and environment. Exits for --help, --version and a command line argparse
    refuses (unknown flag, missing value: status 2); raises OptionError for a value weftd cannot use,
    naming its flag or variable."""
    options = declared()
    given = parser(options, version).parse_args(argv)
    if given.command == "version":
        return argparse.Namespace(command="version"), {}
    try:
        return resolve(for_command(options, given.command), given, environ)
    except OptionError as e:
        raise OptionError(f"weftd {given.command}: {e}") from None


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("*", "\\*")


def markdown(options: Sequence[Option]) -> str:
    """The operator's reference: one row per flag, with the commands that take it."""
    lines = ["| flag | environment | default | choices | commands | meaning |", "|---|---|---|---|---|---|"]
    for opt in options:
        variables = ", ".join(f"`{v}`" for v in opt.variables)
        default = opt.describe_default()
        shown = f"`{default}`" if opt.shown_default is None and opt.default is not None else default
        choices = ", ".join(f"`{c}`" for c in opt.choices) or ("`true`, `false`" if opt.is_boolean else "")
        commands = "all" if set(opt.commands) == set(COMMANDS) else ", ".join(opt.commands)
        lines.append(f"| `{opt.flag}` | {variables} | {_cell(shown)} | {choices} | {commands} | {_cell(opt.help)} |")
    return "\n".join(lines) + "\n"


def replace_block(document: str, block: str) -> str:
    """`document` with what lies between BEGIN and END replaced by `block`."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return f"{document[:start + len(BEGIN)]}\n{block}{document[end:]}"


def block_of(document: str) -> str:
    """What lies between BEGIN and END (as replace_block puts it there)."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return document[start + len(BEGIN) + 1:end]


def cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m weftd.options", description="weftd's options as markdown")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--markdown", action="store_true", help="print the reference")
    how.add_argument("--readme", metavar="FILE", help="put the reference between the markers in FILE")
    args = p.parse_args(argv)
    table = markdown(declared())
    if args.markdown:
        sys.stdout.write(table)
        return 0
    readme = Path(args.readme)
    readme.write_text(replace_block(readme.read_text(), table))
    return 0


if __name__ == "__main__":
    # The module itself, not this __main__ copy, whose parsers are not the ones the stores declare with.
    from weftd.options import cli as _cli

    sys.exit(_cli(sys.argv[1:]))

