"""WireGuard's cross-platform userspace API: the text protocol wireguard-go serves on
/var/run/wireguard/<ifname>.sock. `get=1` dumps the device, `set=1` changes it; keys are hex.

The socket directory is not per network namespace: every namespace on the host sees every
daemon's socket, so device names must be unique on the host.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass, field
from pathlib import Path

from weftd.backend.errors import BackendError
from weftd.backend.wireguard.peers import ZERO_KEY, DeviceState, PeerConfig, PeerOp, PeerState, RemovePeer, SetPeer

SOCKET_DIR = Path("/var/run/wireguard")


class UapiError(BackendError):
    pass


def hex_key(b64: str) -> str:
    return base64.b64decode(b64).hex()


def b64_key(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


@dataclass
class _Peer:
    key: str
    endpoint: str | None = None
    ips: list[str] = field(default_factory=list)
    keepalive: int = 0
    psk: str | None = None
    handshake: float = 0.0
    rx: int = 0
    tx: int = 0

    def state(self) -> PeerState:
        psk = None if self.psk in (None, ZERO_KEY) else self.psk
        cfg = PeerConfig(self.key, self.endpoint, tuple(sorted(self.ips)), self.keepalive, psk)
        return PeerState(cfg, self.handshake, self.rx, self.tx)


def parse_get(text: str) -> DeviceState:
    """The answer to `get=1`, without its `errno=` line."""
    private: str | None = None
    port = 0
    peers: list[_Peer] = []
    for line in text.splitlines():
        if not line:
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise UapiError(f"unreadable UAPI line {line[:40]!r}")
        cur = peers[-1] if peers else None
        if k == "private_key":
            private = b64_key(v)
        elif k == "listen_port":
            port = int(v)
        elif k == "public_key":
            peers.append(_Peer(b64_key(v)))
        elif cur is None:
            continue  # fwmark and the like
        elif k == "preshared_key":
            cur.psk = b64_key(v)
        elif k == "endpoint":
            cur.endpoint = v
        elif k == "allowed_ip":
            cur.ips.append(v)
        elif k == "persistent_keepalive_interval":
            cur.keepalive = int(v)
        elif k == "last_handshake_time_sec":
            cur.handshake += int(v)
        elif k == "last_handshake_time_nsec":
            cur.handshake += int(v) / 1e9
        elif k == "rx_bytes":
            cur.rx = int(v)
        elif k == "tx_bytes":
            cur.tx = int(v)
    states = [p.state() for p in peers]
    return DeviceState(None if private in (None, ZERO_KEY) else private, port,
                       {p.config.public_key: p for p in states})


def set_lines(private_key: str | None = None, listen_port: int | None = None,
              ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> list[str]:
    """The body of one `set=1` request."""
    lines = []
    if private_key is not None:
        lines.append(f"private_key={hex_key(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for op in ops:
        if isinstance(op, RemovePeer):
            lines += [f"public_key={hex_key(op.public_key)}", "remove=true"]
            continue
        assert isinstance(op, SetPeer)
        p = op.peer
        lines.append(f"public_key={hex_key(p.public_key)}")
        lines.append(f"preshared_key={hex_key(p.psk or ZERO_KEY)}")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in p.allowed_ips]
    return lines


class Uapi:
    def __init__(self, ifname: str, sock_dir: Path = SOCKET_DIR, timeout: float = 5.0) -> None:
        self.path = sock_dir / f"{ifname}.sock"
        self.timeout = timeout

    def _request(self, body: str) -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
            s.sendall(body.encode())
            buf = b""
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise UapiError(f"{self.path}: {e.strerror or e}") from None
        finally:
            s.close()
        text = buf.decode()
        head, _, last = text.rstrip("\n").rpartition("\n")
        if not last.startswith("errno="):
            head, last = text, ""
        if last != "errno=0":
            raise UapiError(f"{self.path}: wireguard-go answered {last or 'nothing'}")
        return head

    def alive(self) -> bool:
        try:
            self._request("get=1\n\n")
            return True
        except UapiError:
            return False

    def get(self) -> DeviceState:
        return parse_get(self._request("get=1\n\n"))

    def set(self, private_key: str | None = None, listen_port: int | None = None,
            ops: list[PeerOp] | tuple[PeerOp, ...] = ()) -> None:
        lines = set_lines(private_key, listen_port, ops)
        if lines:
            self._request("set=1\n" + "".join(line + "\n" for line in lines) + "\n")
