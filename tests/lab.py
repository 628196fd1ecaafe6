"""A lab of network namespaces on one machine: "nodes" and "pods", driven the way a runtime drives Weft.

Nothing here configures the machine's root network namespace: every command
that changes the network runs under `ip netns exec` in a namespace the lab
created, and `Lab.close()` deletes them all, also after a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path("/usr/lib/cni")
REFERENCE = ("bridge", "host-local", "portmap", "loopback", "static")
# weftd's CNI sockets: short paths, since a unix socket path is limited to 107 bytes.
SOCKET_DIR = Path("/run/weft-tests")


def shim_path() -> Path:
    """The compiled `weft` shim (`make shim`, part of `make build`)."""
    exe = Path(os.environ.get("WEFT_SHIM") or ROOT / ".build" / "weft-shim")
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"the weft shim is not built at {exe}: run `make shim`")
    return exe


def plugin_dir(target: Path) -> Path:
    """A CNI bin dir laid out as the bundle is: `weft` is the compiled shim, which execs `weft-py`
    beside it when weftd is not there; weft-py and weft-ipam are this checkout's environment's
    scripts; plus the reference plugins."""
    target.mkdir(parents=True, exist_ok=True)
    scripts = Path(sys.executable).parent
    if not (target / "weft").exists():
        shutil.copy2(shim_path(), target / "weft")  # a copy: the shim finds weft-py beside itself
    for name in ("weft-py", "weft-ipam"):
        link = target / name
        if not link.exists():
            link.symlink_to(scripts / name)
    for name in REFERENCE:
        if (REFERENCE_DIR / name).exists() and not (target / name).exists():
            (target / name).symlink_to(REFERENCE_DIR / name)
    return target


def install_bundle(bundle: Path, libdir: Path, cnibin: Path, bindir: Path | None = None) -> str:
    """packaging/install.sh, as `make install` and the kind init container run it."""
    cmd = ["sh", str(ROOT / "packaging" / "install.sh"), "install", str(bundle), str(libdir), str(cnibin)]
    if bindir is not None:
        cmd.append(str(bindir))
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def host_veths(node: Node) -> list[str]:
    """The host ends of pod veths Weft made on `node` (named weft + hash; the VTEPs are weft.<VNI>, weft6.<VNI>)."""
    return sorted(n for n in node.ns.links() if n.startswith("weft") and "." not in n)


def weftd_exe(bundle: Path | None = None) -> list[str]:
    """How to run weftd: the frozen bundle's, or this checkout's."""
    return [str(bundle / "weftd")] if bundle is not None else [sys.executable, "-m", "weftd"]


def file_store(path: Path) -> list[str]:
    return ["--store", "file", "--store-path", str(path)]


def weftd_command(ns: Netns, exe: list[str], node_name: str, store: list[str], net_conf: Path, subnet_file: Path,
                  cni_conf_dir: Path, cni_socket: Path, ipam_data_dir: Path, iface: str = "eth0",
                  listen: str = "127.0.0.1:9808", extra: tuple[str, ...] = ()) -> list[str]:
    """`weftd run` for a simulated node, inside its namespace: the one place tests and benchmarks spell it.
    `ipam_data_dir` is required: weftd's default is the machine's own /var/lib/cni/networks."""
    cmd = ["ip", "netns", "exec", ns.name, *exe, "run", "--node-name", node_name, *store, "--net-conf", str(net_conf),
           "--iface", iface, "--subnet-file", str(subnet_file), "--cni-conf-dir", str(cni_conf_dir),
           "--listen", listen, "--cni-socket", str(cni_socket), "--ipam-data-dir", str(ipam_data_dir)]
    return cmd + list(extra)


def peer_address(server: Netns, server_ip: str, client: Netns) -> str:
    """The source address `server` sees when `client` connects to it (TCP, over `server_ip`'s family)."""
    family = "AF_INET6" if ":" in server_ip else "AF_INET"
    code = (f"import socket;s=socket.socket(socket.{family});s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('{server_ip}',7000));s.listen();print('up',flush=True);c,a=s.accept();print(a[0])")
    srv = subprocess.Popen(["ip", "netns", "exec", server.name, sys.executable, "-c", code],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        client.run(sys.executable, "-c", f"import socket;socket.create_connection(('{server_ip}',7000),3).close()")
        return srv.stdout.readline().strip()
    finally:
        srv.kill()
        srv.wait()


def ping(ns: Netns, ip: str, *extra: str, once: bool = False) -> bool:
    """Whether `ip` answers a ping from `ns`.

    Traffic that must pass: one echo a second until the first reply, for up to 30 s, so a reply that a
    loaded machine delays (or a first packet lost to neighbour resolution) does not fail the test; an
    answered path returns at its first reply. `once`: a single echo with a 2 s wait, for traffic that
    must NOT pass (an answer is the failure, so a short wait is honest) and for callers that poll.
    """
    wait = ("-W", "2") if once else ("-w", "30")
    return ns.run("ping", "-c1", *wait, *extra, ip, check=False).returncode == 0


class Pinger:
    """`ping -i <interval>` from `ns` to `ip` for exactly as long as a `with` block runs, however long
    that takes: the block starts once the first reply is back, and the pings stop when it ends."""

    def __init__(self, ns: Netns, ip: str, interval: float) -> None:
        self.cmd = ["ip", "netns", "exec", ns.name, "ping", "-n", "-i", str(interval), "-W", "1", ip]
        self.lines: list[str] = []
        self.first_reply = threading.Event()
        self.sent = 0

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.append(line)
            if " bytes from " in line:
                self.first_reply.set()

    def __enter__(self) -> Pinger:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self.reader.start()
        if not self.first_reply.wait(30):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no reply to {' '.join(self.cmd)}: {''.join(self.lines)[-300:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        self.reader.join(30)
        summary = re.search(r"(\d+) packets transmitted", "".join(self.lines))
        self.sent = int(summary.group(1)) if summary else 0

    def failures(self) -> list[str]:
        """What ping said besides its header, replies and statistics (a send that failed, an error), and
        each echo without a reply but the last, which may have been in flight at the stop."""
        said = [line.strip() for line in self.lines if line.strip() and not line.startswith(("PING ", "--- ", "rtt "))
                and " bytes from " not in line and "packets transmitted" not in line]
        replied = {int(m.group(1)) for line in self.lines if (m := re.search(r" icmp_seq=(\d+) ", line))}
        return said + [f"icmp_seq={seq}: no reply" for seq in range(1, self.sent) if seq not in replied]


def assert_path_mtu(ns: Netns, ip: str, mtu: int) -> None:
    """A don't-fragment ping from `ns` that fills `mtu` exactly reaches `ip`; one byte more does not."""
    largest = mtu - (40 + 8 if ":" in ip else 20 + 8)  # IP and ICMP headers
    assert ping(ns, ip, "-M", "do", "-s", str(largest)), f"{largest} bytes to {ip}"
    assert not ping(ns, ip, "-M", "do", "-s", str(largest + 1), once=True), f"{largest + 1} bytes to {ip}"


def weftd_pid(socket: Path) -> int | None:
    """The weftd serving `socket`: the process under `ip netns exec` that carries the flag."""
    flag = ["--cni-socket", str(socket)]
    for proc in Path("/proc").iterdir():
        try:
            args = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0")]
            if any(args[i:i + 2] == flag for i in range(len(args))) and (proc / "exe").resolve().name != "ip":
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def proc_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure (VmRSS, VmHWM) from /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cnidrive_path() -> str:
    exe = os.environ.get("CNIDRIVE") or str(ROOT / ".build" / "cnidrive")
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"cnidrive not built at {exe}: run `make cnidrive`")
    return exe


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(self, *cmd: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        text = not isinstance(input, bytes)
        p = subprocess.run(["ip", "netns", "exec", self.name, *cmd], input=input, env=env, capture_output=True,
                           text=text, check=False, timeout=timeout)
        if text is False:
            p = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                            p.stderr.decode(errors="replace"))
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {self.name} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def ip_json(self, *args: str) -> Any:
        return json.loads(self.run("ip", "-j", *args).stdout or "[]")

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in self.ip_json("-d", "link", "show")}


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Node:
    """A simulated node: a netns where the runtime runs plugins, with its own state directories."""

    ns: Netns
    dir: Path
    bin: Path
    lab: Lab

    @property
    def socket(self) -> Path:
        return SOCKET_DIR / f"{self.ns.name}.sock"

    @property
    def data_dir(self) -> Path:
        return self.dir / "ipam"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_PATH": str(self.bin),
               "CNI_CACHE": str(self.cache_dir)}
        env.update(extra)
        return env

    def plugin(self, command: str, conf: dict[str, Any] | str | bytes, plugin: str = "weft", cid: str = "",
               netns: str = "", ifname: str = "eth0", args: str = "", **extra: str) -> Outcome:
        """Execs one plugin directly, as the runtime does, with the full CNI_* environment."""
        data = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        env = self.env(CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME=ifname,
                       CNI_ARGS=args, **extra)
        p = self.ns.run(str(self.bin / plugin), input=data, env=env, check=False)
        return Outcome(p.returncode, p.stdout, p.stderr)

    def drive(self, verb: str, conflist: Path, cid: str, netns: str, ifname: str = "eth0",
              check: bool = True, **extra: str) -> Outcome:
        """Runs a conflist through libcni (cnidrive), exactly as containerd would."""
        p = self.ns.run(cnidrive_path(), verb, str(conflist), cid, netns, ifname, env=self.env(**extra), check=False)
        out = Outcome(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"cnidrive {verb} {cid} failed: {p.stdout}{p.stderr}")
        return out

    def pod(self, label: str = "pod") -> Netns:
        ns = self.lab.netns(label)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def write_conflist(self, name: str, plugins: list[dict[str, Any]], version: str = "1.0.0") -> Path:
        path = self.dir / f"{name}.conflist"
        path.write_text(json.dumps({"cniVersion": version, "name": name, "plugins": plugins}))
        return path

    def reservations(self, network: str) -> dict[str, str]:
        """weft-ipam's reservations for `network` on this node: address -> file content."""
        d = self.data_dir / network
        if not d.exists():
            return {}
        return {p.name: p.read_bytes().decode() for p in d.iterdir()
                if p.name != "lock" and not p.name.startswith("last_")}

    def nat_elements(self) -> list[tuple[str, str, str]]:
        """(set, value, owner comment) of every element in Weft's NAT table (weftlib.kernel.nat) on this node."""
        p = self.ns.run("nft", "-j", "list", "table", "inet", "weft", check=False)
        if p.returncode != 0:
            return []
        out = []
        for item in json.loads(p.stdout)["nftables"]:
            s = item.get("set")
            for e in (s or {}).get("elem", []):
                out.append((s["name"], json.dumps(e["elem"]["val"]), e["elem"].get("comment", "")))
        return sorted(out)

    def masqueraded(self) -> list[str]:
        """The pod addresses that Weft masquerades on this node (the plugin's ipMasq), sorted."""
        return sorted(json.loads(v) for s, v, _ in self.nat_elements() if s in ("masq_pods4", "masq_pods6"))

    def snapshot(self) -> dict[str, Any]:
        """Everything a plugin run could change on this node: links, addresses, routes, rules, files."""
        links = {name: (link.get("linkinfo", {}).get("info_kind"), link.get("master"), link.get("operstate"))
                 for name, link in self.ns.links().items()}
        addrs = sorted((a["ifname"], i["local"], i["prefixlen"]) for a in self.ns.ip_json("addr", "show")
                       for i in a.get("addr_info", []) if i.get("scope") != "link")
        # Not the kernel's own IPv6 link-local routes: it adds them on its own schedule (after DAD),
        # seconds after a link comes up, and Weft never makes any.
        routes = sorted(json.dumps(r, sort_keys=True) for fam in ("-4", "-6")
                        for r in self.ns.ip_json(fam, "route", "show", "table", "all")
                        if not (r.get("dst", "").startswith("fe80:") and r.get("protocol") == "kernel"))
        rules = self.ns.run("nft", "list", "ruleset").stdout
        files = sorted(str(p.relative_to(self.dir)) + ":" + (p.read_text() if p.is_file() else "")
                       for p in self.dir.rglob("*") if p.is_file() and not p.name.endswith(".conflist"))
        return {"links": links, "addrs": addrs, "routes": routes, "rules": rules, "files": files}


@dataclass
class Lab:
    base: Path
    namespaces: list[Netns] = field(default_factory=list)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def netns(self, label: str) -> Netns:
        ns = Netns(f"wt-{self.tag}-{label}-{len(self.namespaces)}"[:60])
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        self.namespaces.append(ns)
        return ns

    def node(self, label: str = "node") -> Node:
        ns = self.netns(label)
        ns.run("ip", "link", "set", "lo", "up")
        d = self.base / ns.name
        d.mkdir(parents=True)
        return Node(ns, d, plugin_dir(self.base / "bin"), self)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
            (SOCKET_DIR / f"{ns.name}.sock").unlink(missing_ok=True)
        self.namespaces.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def weft_conf(network: str = "weftnet", subnet: str = "10.22.0.0/24", version: str = "1.0.0",
              data_dir: str | Path = "", **opts: Any) -> dict[str, Any]:
    """One `weft` plugin config with weft-ipam, as a conflist entry or a bare .conf."""
    ipam: dict[str, Any] = {"type": "weft-ipam", "subnet": subnet}
    if data_dir:
        ipam["dataDir"] = str(data_dir)
    ipam.update(opts.pop("ipam", {}))
    conf: dict[str, Any] = {"cniVersion": version, "name": network, "type": "weft", "bridge": "cni0",
                            "isGateway": True, "isDefaultGateway": True, "ipam": ipam}
    conf.update(opts)
    return conf
