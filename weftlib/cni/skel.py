"""The CNI calling convention shared by `weft` and `weft-ipam`.

Reads the CNI_* environment and the config on stdin, validates both before any
handler runs, dispatches on CNI_COMMAND and prints either the result or CNI
error JSON on stdout. Nothing here imports more than the standard library's
small modules: this runs for every pod.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from weftlib.cni import errors
from weftlib.cni.errors import CniError
from weftlib.cni.stdin import MAX_STDIN, read_stdin
from weftlib.cni.version import LATEST, SUPPORTED_VERSIONS, check_version

VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS")  # what a plugin's handlers do; VERSION is answered here
COMMANDS = (*VERBS, "VERSION")

# libcni's rule for container IDs and network names (pkg/utils/utils.go).
_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
MAX_ID = 256


@dataclass(frozen=True)
class Args:
    """The CNI_* environment, validated for the command at hand."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    path: tuple[str, ...] = ()
    args: Mapping[str, str] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    # weftd serves requests with the pod's netns opened by the calling plugin, whose paths
    # (/proc/<pid>/ns/net in particular) may not be visible in weftd's own mount namespace.
    netns_fd: int | None = None


class Emittable(Protocol):
    def to_json(self, version: str) -> dict[str, Any]: ...


Handler = Callable[[Args, dict[str, Any]], "Emittable | None"]


def _valid_id(value: str) -> bool:
    return len(value) <= MAX_ID and _ID_RE.match(value) is not None


def validate_ifname(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name, or None if it can."""
    if not name:
        return "is empty"
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # bytes from the environment that are not UTF-8
        return "is not valid UTF-8"
    if len(encoded) > 15:
        return "is longer than 15 bytes"
    if name in (".", ".."):
        return "is . or .."
    if any(c in "/:" or c.isspace() or not c.isprintable() for c in name):
        return "contains '/', ':', whitespace or unprintable characters"
    return None


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS "K=V;K2=V2" (pkg/types/args.go): every pair needs exactly one '='."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for pair in raw.split(";"):
        parts = pair.split("=")
        if len(parts) != 2 or not parts[0]:
            raise CniError(errors.INVALID_ENV, f"CNI_ARGS: invalid pair {pair!r}")
        out[parts[0]] = parts[1]
    return out


def read_env(environ: Mapping[str, str]) -> Args:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(errors.INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    if command == "VERSION":
        return Args(command=command, environ=environ)
    required = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
                "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
                "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [k for k in required if not environ.get(k)]
    if missing:
        raise CniError(errors.INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    cid = environ.get("CNI_CONTAINERID", "")
    if cid and not _valid_id(cid):
        raise CniError(errors.INVALID_ENV,
                       f"CNI_CONTAINERID {cid[:80]!r} must match {_ID_RE.pattern} "
                       f"and be at most {MAX_ID} characters")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and (why := validate_ifname(ifname)):
        raise CniError(errors.INVALID_ENV, f"CNI_IFNAME {ifname[:80]!r} {why}")
    netns = environ.get("CNI_NETNS", "")
    if netns and (not netns.startswith("/") or "\0" in netns or len(netns) > 4096):
        raise CniError(errors.INVALID_ENV, f"CNI_NETNS {netns[:80]!r} must be an absolute path")
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    return Args(command=command, container_id=cid, netns=netns, ifname=ifname, path=path,
                args=parse_cni_args(environ.get("CNI_ARGS", "")), environ=environ)


def parse_config(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_STDIN:
        raise CniError(errors.DECODE, f"network config is larger than {MAX_STDIN} bytes")
    try:
        conf = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CniError(errors.DECODE, f"network config is not valid JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CniError(errors.DECODE, "network config must be a JSON object")
    return conf


def check_name(conf: Mapping[str, Any]) -> str:
    name = conf.get("name")
    if not isinstance(name, str) or not _valid_id(name):
        raise CniError(errors.INVALID_CONFIG,
                       f"network name {str(name)[:80]!r} must match {_ID_RE.pattern} "
                       f"and be at most {MAX_ID} characters")
    return name


def version_reply(conf_raw: bytes) -> dict[str, Any]:
    try:
        asked = json.loads(conf_raw).get("cniVersion") if conf_raw.strip() else None
    except (ValueError, AttributeError, RecursionError):
        asked = None
    return {"cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def json_line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def log_failure(plugin: str, exc: BaseException, log_file: str | None) -> str:
    """The line for stderr; the traceback goes only into the log file, if there is one."""
    if log_file:
        try:
            import traceback

            with open(log_file, "a", encoding="utf-8") as f:
                f.write(f"{plugin}: {''.join(traceback.format_exception(exc))}")
        except OSError:
            pass
    return f"{plugin}: {exc}\n"


@dataclass(frozen=True)
class Outcome:
    """What one invocation prints and returns: the same whether run here or by weftd. A successful one also
    carries its validated environment and its handler's result, for weftd to act on without parsing them
    again."""

    status: int
    stdout: str
    stderr: str = ""
    args: Args | None = field(default=None, compare=False, repr=False)
    result: Emittable | None = field(default=None, compare=False, repr=False)

    def deliver(self) -> int:
        sys.stdout.write(self.stdout)
        sys.stdout.flush()
        if self.stderr:
            sys.stderr.write(self.stderr)
        return self.status


def invoke(plugin: str, handlers: Mapping[str, Handler], raw: bytes, environ: Mapping[str, str],
           netns_fd: int | None = None) -> Outcome:
    """Runs one CNI invocation without touching the process's stdin, stdout or environment."""
    version = LATEST
    log_file = environ.get("WEFT_LOG_FILE")
    try:
        if environ.get("CNI_COMMAND") == "VERSION":
            return Outcome(0, json_line(version_reply(raw)))
        conf = parse_config(raw)
        if isinstance(conf.get("cniVersion"), str) and conf["cniVersion"] in SUPPORTED_VERSIONS:
            version = conf["cniVersion"]  # errors are reported in the config's version from here on
        args = read_env(environ)
        if netns_fd is not None:
            args = replace(args, netns_fd=netns_fd)
        check_version(conf, args.command)
        check_name(conf)
        result = handlers[args.command](args, conf)
        return Outcome(0, json_line(result.to_json(version)) if result is not None else "", args=args, result=result)
    except CniError as e:
        return Outcome(1, json_line(e.to_json(version)), log_failure(plugin, e, log_file))
    except Exception as e:  # noqa: BLE001 - the runtime must get JSON, never a traceback
        return Outcome(1, json_line(CniError(errors.INTERNAL, f"{type(e).__name__}: {e}").to_json(version)),
                       log_failure(plugin, e, log_file))


HELP_ARGS = ("-h", "--help", "--version")


def usage(prog: str, about: str) -> str:
    """What `PROG --help` prints: a runtime never passes arguments, so a person is asking."""
    from weftlib.version import version

    return (f"usage: {prog} (Weft {version()}): {about}\n"
            "A CNI plugin, which the container runtime runs: "
            f"CNI_COMMAND ({', '.join(COMMANDS[:-1])} or {COMMANDS[-1]}), "
            "CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_PATH in the environment, the network config on stdin, "
            "the result or a CNI error as JSON on stdout.\n"
            f"Try: CNI_COMMAND=VERSION {prog} </dev/null\n")


def run(plugin: str, handlers: Mapping[str, Handler], about: str = "") -> int:
    """Runs the invocation this process was started for; returns the exit status. With -h, --help or
    --version as its argument (a runtime passes none), prints the usage instead."""
    if len(sys.argv) > 1 and sys.argv[1] in HELP_ARGS:
        sys.stdout.write(usage(os.path.basename(sys.argv[0]), about))
        return 0
    return invoke(plugin, handlers, read_stdin(), os.environ).deliver()
