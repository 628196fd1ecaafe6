"""One option of weftd's command line, as data: its flag, its environment variable (WEFTD_<FLAG>), the
commands that take it, and the parser its values go through; and those parsers. Stores and backends
declare theirs with these (`options`); weftd.options gathers them into the command line.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from weftlib.cni.skel import validate_ifname

COMMANDS = {
    "run": "connect this node's pods to every peer's",
    "uninstall": "remove everything weftd made on this node",
    "remove-node": "delete a node's lease from the file or etcd store",
}
ALL = tuple(COMMANDS)
RUN = ("run",)
NODE = ("run", "uninstall")  # what programs this node, and what undoes it
UNIX_PATH_MAX = 107  # sun_path, less its terminating NUL


# Parsers: the value a string stands for. A ValueError's message says what is wrong with the string, as a
# predicate that follows its source ("--resync 'ten' is not a number").


def text(raw: str) -> str:
    return raw


def name(raw: str) -> str:
    """A node name: what the stores key this node's lease by."""
    if not raw or len(raw) > 253 or any(c.isspace() or not c.isprintable() or c == "/" for c in raw):
        raise ValueError("is not a node name (1 to 253 printable characters, no whitespace or '/')")
    return raw


def path(raw: str) -> str:
    if not raw:
        raise ValueError("is not a path")
    return raw


def existing_file(raw: str) -> str:
    if not Path(path(raw)).is_file():
        raise ValueError("does not exist" if not Path(raw).exists() else "is not a file")
    return raw


def existing_dir(raw: str) -> str:
    if not Path(path(raw)).is_dir():
        raise ValueError("does not exist" if not Path(raw).exists() else "is not a directory")
    return raw


def file_name(raw: str) -> str:
    if not raw.endswith(".conflist") or "/" in raw or raw == ".conflist":
        raise ValueError("must be a file name ending in .conflist (containerd reads only those as a conflist)")
    return raw


def socket_path(raw: str) -> str:
    """A unix socket's absolute path, or '' for none."""
    if raw and (not raw.startswith("/") or len(raw.encode()) > UNIX_PATH_MAX):
        raise ValueError(f"must be an absolute path of at most {UNIX_PATH_MAX} bytes, or '' for none")
    return raw


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def boolean(raw: str) -> bool:
    low = raw.strip().lower()
    if low in TRUE or low in FALSE:
        return low in TRUE
    raise ValueError("must be true or false (or yes/no, 1/0, on/off)")


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number above 0")
    return value


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("is not an integer") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value

    return parse


def ifname(raw: str) -> str:
    why = validate_ifname(raw)
    if why is not None:
        raise ValueError(f"is not an interface name: it {why}")
    return raw


def address(version: int) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            raise ValueError(f"is not an IPv{version} address") from None
        if ip.version != version:
            raise ValueError(f"is not an IPv{version} address")
        return str(ip)

    return parse


Listen = tuple[str, int]  # (host, port); host '' for every address


def listen_address(raw: str) -> Listen:
    """HOST:PORT, [IPv6]:PORT or :PORT."""
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise ValueError("must be HOST:PORT, such as 127.0.0.1:9808")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError("has brackets around an address that is not IPv6")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"must be HOST:PORT with HOST an IP address, not {host!r}") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with PORT from 1 to 65535, not {port!r}")
    return host, int(port)


def show_listen(listen: Listen) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url(raw: str) -> str:
    """An http(s) URL with a host, or HOST:PORT (taken as http)."""
    parsed = urlparse(raw if "://" in raw else f"http://{raw}")
    try:
        parsed.port  # noqa: B018 - urlparse checks the port only when it is read
    except ValueError:
        raise ValueError("has a port that is not a number from 0 to 65535") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return raw


def key_prefix(raw: str) -> str:
    if not raw.startswith("/") or raw.endswith("/"):
        raise ValueError("must start with '/' and not end with it, such as /weft/network")
    return raw


@dataclass(frozen=True)
class Option:
    """One flag, with its variable WEFTD_<FLAG> and the commands that take it.

    `default`: the string it defaults to, parsed like a given value; None: unset (and an empty string
    given for such an option means unset too). `fallback`: computes the value when unset, described by
    `shown_default` in --help. `also_env`: variables read after WEFTD_<FLAG>, in order."""

    flag: str
    help: str
    commands: tuple[str, ...]
    parse: Callable[[str], Any] = text
    default: str | None = None
    choices: tuple[str, ...] = ()
    shown_default: str | None = None
    fallback: Callable[[], str] | None = None
    also_env: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return "WEFTD_" + self.dest.upper()

    @property
    def variables(self) -> tuple[str, ...]:
        return (self.env, *self.also_env)

    @property
    def is_boolean(self) -> bool:
        return self.parse is boolean

    def convert(self, raw: str) -> Any:
        """The value of `raw` (None: unset); ValueError says what is wrong with it."""
        if raw == "" and self.default is None:
            return None
        value = self.parse(raw)
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return value

    def describe_default(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "unset"
        return repr(self.default) if self.default == "" else self.default
