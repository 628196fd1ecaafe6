#!/usr/bin/env python3
"""clusterdns: the cluster DNS of Weft's offline test cluster. Test-bed infrastructure, not part of Weft.

No CoreDNS exists offline, and upstream's e2e tests reach Services by name. This server watches Services
and Endpoints through the API server (over HTTPS, with the pod's service-account token and CA from
/var/run/secrets/kubernetes.io/serviceaccount, at KUBERNETES_SERVICE_HOST/PORT) and answers, in the
cluster's zone (cluster.local):
- `<svc>.<ns>.svc.<zone>`: A/AAAA for the ClusterIPs; for a headless Service, its ready endpoint
  addresses; for an ExternalName Service, a CNAME (followed when the target is in the zone);
- `<host>.<svc>.<ns>.svc.<zone>`: a headless Service's endpoint, by its hostname or its address with dashes;
- `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for named ports;
- `<a-b-c-d>.<ns>.pod.<zone>`: the address written in the name, as CoreDNS's `pods insecure`;
- PTR for ClusterIPs and headless endpoint addresses;
- NXDOMAIN for other names in the zone.
There is no upstream offline: names outside the zone get REFUSED (or SERVFAIL, `--outside`) at once, except
those of a static map (`--static NAME=ADDRESS|NAME`, or CLUSTERDNS_STATIC="NAME=VALUE,..."), which the e2e
runner uses to make `google.com` an address of the cluster's own.

UDP and TCP on one port; /ready on the health port answers 200 only once the first list of both
resources is in, and queries get SERVFAIL until then. While the API server is away it answers from what it
last saw, and lists again once the server is back. Python 3 with the standard library and dnslib only.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import ipaddress
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from dnslib import AAAA, CNAME, EDNS0, PTR, QTYPE, RCODE, RR, SOA, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
EDNS_UDP_MAX = 1232  # the payload size DNS flag day 2020 settled on
PLAIN_UDP_MAX = 512
WATCH_SECONDS = 300
MAX_CHAIN = 8  # CNAMEs followed within one answer
QCLASSES = (1, 255)  # IN, ANY

V = TypeVar("V")


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} clusterdns: {msg}", file=sys.stderr, flush=True)


# --- what the server knows of the cluster, parsed from API objects (validation at the edge)


@dataclass(frozen=True)
class Port:
    name: str
    protocol: str  # lower case, as in SRV names: tcp, udp, sctp
    port: int

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Port:
        port = obj.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}")
        return cls(str(obj.get("name") or ""), str(obj.get("protocol") or "TCP").lower(), port)


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless and ExternalName Services
    headless: bool
    external_name: str | None
    ports: tuple[Port, ...]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Service:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            raise ValueError("no namespace or name")
        ports = tuple(Port.from_object(p) for p in spec.get("ports") or ())
        if spec.get("type") == "ExternalName":
            target = str(spec.get("externalName") or "").rstrip(".").lower()
            if not target:
                raise ValueError(f"{namespace}/{name}: ExternalName without externalName")
            return cls(namespace, name, (), False, target, ports)
        ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip]
        if ips == ["None"]:
            return cls(namespace, name, (), True, None, ports)
        return cls(namespace, name, tuple(str(ipaddress.ip_address(ip)) for ip in ips), False, None, ports)


@dataclass(frozen=True)
class Address:
    """A ready endpoint address of a Service, with the ports of its subset."""

    ip: str
    hostname: str  # the endpoint's hostname, or its address with dashes
    ports: tuple[Port, ...]


def endpoint_addresses(obj: Mapping[str, Any]) -> tuple[Address, ...]:
    """The ready addresses of an Endpoints object (notReadyAddresses are left out)."""
    out: list[Address] = []
    for subset in obj.get("subsets") or ():
        ports = tuple(Port.from_object(p) for p in subset.get("ports") or ())
        for a in subset.get("addresses") or ():
            ip = str(ipaddress.ip_address(a.get("ip")))
            out.append(Address(ip, str(a.get("hostname") or "") or dashed(ip), ports))
    return tuple(out)


def dashed(ip: str) -> str:
    """An address as one DNS label: 10.1.2.3 -> 10-1-2-3, fd00::5 -> fd00--5."""
    return ip.replace(".", "-").replace(":", "-")


def undashed(label: str) -> str | None:
    """The address a pod record's first label writes, or None."""
    for text in (label.replace("-", "."), label.replace("-", ":")):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
    return None


class Table(Generic[V]):
    """Objects of one resource by (namespace, name), as the last list and the watch since left them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], V] = {}

    def replace(self, items: dict[tuple[str, str], V]) -> None:
        with self._lock:
            self._items = dict(items)

    def put(self, key: tuple[str, str], value: V) -> None:
        with self._lock:
            self._items[key] = value

    def delete(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._items.pop(key, None)

    def get(self, key: tuple[str, str]) -> V | None:
        with self._lock:
            return self._items.get(key)

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    def has_namespace(self, namespace: str) -> bool:
        with self._lock:
            return any(ns == namespace for ns, _ in self._items)


# --- answers


@dataclass(frozen=True)
class Config:
    zone: str = "cluster.local"
    ttl: int = 5
    static: Mapping[str, str] = field(default_factory=dict)  # name -> address, or name for a CNAME
    outside_rcode: int = RCODE.REFUSED


@dataclass
class Answer:
    rcode: int = RCODE.NOERROR
    records: list[RR] = field(default_factory=list)
    additional: list[RR] = field(default_factory=list)
    in_zone: bool = True  # negative answers in the zone carry its SOA


def parse_static(entries: Iterable[str]) -> dict[str, str]:
    """NAME=ADDRESS or NAME=TARGET entries (commas or blanks between them) as a map of lower-case names."""
    out: dict[str, str] = {}
    for entry in entries:
        for item in entry.replace(",", " ").split():
            name, sep, value = item.partition("=")
            name, value = name.strip().rstrip(".").lower(), value.strip().rstrip(".").lower()
            if not sep or not name or not value:
                raise ValueError(f"static entry {item!r} is not NAME=ADDRESS or NAME=TARGET")
            out[name] = value
    return out


def address_record(name: str, ip: str, qtype: int, ttl: int) -> RR | None:
    """An A or AAAA record for `ip` when the question asks for its family."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
        return RR(name, QTYPE.A, rdata=A(str(addr)), ttl=ttl)
    if addr.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
        return RR(name, QTYPE.AAAA, rdata=AAAA(str(addr)), ttl=ttl)
    return None


class Zone:
    """Answers questions from Services and Endpoints: pure logic over the two tables."""

    def __init__(self, services: Table[Service], endpoints: Table[tuple[Address, ...]], config: Config) -> None:
        self.services, self.endpoints, self.config = services, endpoints, config
        self.zone = config.zone.strip(".").lower()

    def soa(self) -> RR:
        ttl = self.config.ttl
        return RR(self.zone, QTYPE.SOA, ttl=ttl, rdata=SOA(f"ns.dns.{self.zone}", f"hostmaster.{self.zone}",
                                                            (1, 7200, 1800, 86400, ttl)))

    def answer(self, qname: str, qtype: int, depth: int = 0) -> Answer:
        name = qname.rstrip(".").lower()
        if name == self.zone or name.endswith("." + self.zone):
            labels = name[: -len(self.zone)].rstrip(".").split(".") if name != self.zone else []
            found = self._in_zone(qname, labels, qtype)
        elif name in self.config.static:
            found = self._static(qname, self.config.static[name], qtype)
        elif name.endswith((".in-addr.arpa", ".ip6.arpa")) and (ptr := self._ptr(qname, name, qtype)) is not None:
            found = ptr
        else:
            return Answer(self.config.outside_rcode, in_zone=False)
        return self._follow(found, qtype, depth)

    def _follow(self, found: Answer, qtype: int, depth: int) -> Answer:
        """Adds what a CNAME's target holds, when the target is one this server answers for."""
        if qtype == QTYPE.CNAME or depth >= MAX_CHAIN or not found.records:
            return found
        last = found.records[-1]
        if last.rtype != QTYPE.CNAME:
            return found
        target = self.answer(str(last.rdata.label), qtype, depth + 1)
        if target.rcode == RCODE.NOERROR:
            found.records += target.records
            found.additional += target.additional
        return found

    def _static(self, qname: str, value: str, qtype: int) -> Answer:
        try:
            rr = address_record(qname, value, qtype, self.config.ttl)
            return Answer(records=[rr] if rr else [], in_zone=False)
        except ValueError:
            return Answer(records=[RR(qname, QTYPE.CNAME, rdata=CNAME(value), ttl=self.config.ttl)], in_zone=False)

    def _in_zone(self, qname: str, labels: list[str], qtype: int) -> Answer:
        ttl = self.config.ttl
        if not labels:
            return Answer(records=[self.soa()] if qtype in (QTYPE.SOA, QTYPE.ANY) else [])
        if labels in (["svc"], ["pod"]):
            return Answer()
        kind, rest = labels[-1], labels[:-1]
        if kind == "pod":
            if len(rest) == 1:  # pods' namespaces are not watched: any is taken to exist
                return Answer()
            ip = undashed(rest[0]) if len(rest) == 2 else None
            if ip is None:
                return Answer(RCODE.NXDOMAIN)
            rr = address_record(qname, ip, qtype, ttl)
            return Answer(records=[rr] if rr else [])
        if kind != "svc" or not rest:
            return Answer(RCODE.NXDOMAIN)
        if len(rest) == 1:
            return Answer() if self.services.has_namespace(rest[0]) else Answer(RCODE.NXDOMAIN)
        svc = self.services.get((rest[-1], rest[-2]))
        if svc is None:
            return Answer(RCODE.NXDOMAIN)
        base = f"{svc.name}.{svc.namespace}.svc.{self.zone}"
        head = rest[:-2]
        if not head:
            return self._service(qname, svc, qtype)
        if len(head) == 1 and head[0].startswith("_"):
            proto = head[0][1:]
            return Answer() if any(p.protocol == proto and p.name for p in svc.ports) else Answer(RCODE.NXDOMAIN)
        if len(head) == 2 and head[0].startswith("_") and head[1].startswith("_"):
            return self._srv(qname, svc, base, head[0][1:], head[1][1:], qtype)
        if len(head) == 1 and svc.headless:
            ips = [a.ip for a in self._ready(svc) if a.hostname == head[0]]
            if not ips:
                return Answer(RCODE.NXDOMAIN)
            return Answer(records=[rr for ip in dict.fromkeys(ips) if (rr := address_record(qname, ip, qtype, ttl))])
        return Answer(RCODE.NXDOMAIN)

    def _ready(self, svc: Service) -> tuple[Address, ...]:
        return self.endpoints.get((svc.namespace, svc.name)) or ()

    def _service(self, qname: str, svc: Service, qtype: int) -> Answer:
        ttl = self.config.ttl
        if svc.external_name is not None:
            return Answer(records=[RR(qname, QTYPE.CNAME, rdata=CNAME(svc.external_name), ttl=ttl)])
        ips = [a.ip for a in self._ready(svc)] if svc.headless else list(svc.cluster_ips)
        return Answer(records=[rr for ip in dict.fromkeys(ips) if (rr := address_record(qname, ip, qtype, ttl))])

    def _srv(self, qname: str, svc: Service, base: str, port_name: str, proto: str, qtype: int) -> Answer:
        ttl = self.config.ttl
        if not any(p.name == port_name and p.protocol == proto for p in svc.ports):
            return Answer(RCODE.NXDOMAIN)
        if qtype not in (QTYPE.SRV, QTYPE.ANY):
            return Answer()
        targets: list[tuple[str, int, str]] = []  # (target, port, address)
        if svc.headless:
            for a in self._ready(svc):
                for p in a.ports:
                    if p.name == port_name and p.protocol == proto:
                        targets.append((f"{a.hostname}.{base}", p.port, a.ip))
        elif svc.external_name is None:
            port = next(p.port for p in svc.ports if p.name == port_name and p.protocol == proto)
            targets = [(base, port, ip) for ip in svc.cluster_ips]
        weight = max(1, 100 // max(1, len({t for t, _, _ in targets})))
        records, additional = [], []
        for target, port in dict.fromkeys((t, p) for t, p, _ in targets):
            records.append(RR(qname, QTYPE.SRV, rdata=SRV(0, weight, port, target), ttl=ttl))
        for target, _, ip in targets:
            if rr := address_record(target, ip, QTYPE.ANY, ttl):
                additional.append(rr)
        return Answer(records=records, additional=additional)

    def _ptr(self, qname: str, name: str, qtype: int) -> Answer | None:
        """PTR for a ClusterIP or a headless Service's endpoint address; None when no Service has it."""
        try:
            ip = str(ipaddress.ip_address(_reverse_to_ip(name)))
        except ValueError:
            return None
        owners: list[str] = []
        for svc in self.services.values():
            base = f"{svc.name}.{svc.namespace}.svc.{self.zone}"
            if ip in svc.cluster_ips:
                owners.append(base)
            elif svc.headless:
                owners += [f"{a.hostname}.{base}" for a in self._ready(svc) if a.ip == ip]
        if not owners:
            return None
        if qtype not in (QTYPE.PTR, QTYPE.ANY):
            return Answer(in_zone=False)
        return Answer(records=[RR(qname, QTYPE.PTR, rdata=PTR(o), ttl=self.config.ttl) for o in sorted(owners)],
                      in_zone=False)


def _reverse_to_ip(name: str) -> str:
    if name.endswith(".in-addr.arpa"):
        return ".".join(reversed(name[: -len(".in-addr.arpa")].split(".")))
    nibbles = list(reversed(name[: -len(".ip6.arpa")].split(".")))
    if len(nibbles) != 32:
        raise ValueError(name)
    return ":".join("".join(nibbles[i: i + 4]) for i in range(0, 32, 4))


class Resolver(BaseResolver):
    """dnslib's resolver interface over a Zone; SERVFAIL until `ready` says the first lists are in."""

    def __init__(self, zone: Zone, ready: Callable[[], bool]) -> None:
        self.zone, self.ready = zone, ready

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply(ra=0, aa=1)
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_MAX))
        if request.header.opcode != 0 or len(request.questions) != 1:
            reply.header.rcode = RCODE.NOTIMP if request.header.opcode != 0 else RCODE.FORMERR
            reply.header.aa = 0
            return reply
        if not self.ready():
            reply.header.rcode, reply.header.aa = RCODE.SERVFAIL, 0
            return reply
        q = request.q
        if q.qclass not in QCLASSES:  # CHAOS version.bind and the like
            reply.header.rcode, reply.header.aa = RCODE.REFUSED, 0
            return reply
        found = self.zone.answer(str(q.qname), q.qtype)
        reply.header.rcode = found.rcode
        reply.header.aa = int(found.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN))
        for rr in found.records:
            reply.add_answer(rr)
        for rr in found.additional:
            reply.add_ar(rr)
        if found.in_zone and found.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN) and not found.records:
            reply.add_auth(self.zone.soa())
        return reply


def udp_limit(request: DNSRecord) -> int:
    """The largest UDP answer the client takes: 512 bytes, or what its EDNS OPT offers (up to 1232)."""
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(PLAIN_UDP_MAX, min(int(rr.rclass), EDNS_UDP_MAX))
    return PLAIN_UDP_MAX


def wire(request: DNSRecord, reply: DNSRecord, udp: bool) -> bytes:
    """The reply's bytes; over UDP, cut to the header and question with TC set when too large for the
    client, which then asks again over TCP."""
    packed: bytes = reply.pack()
    if udp and len(packed) > udp_limit(request):
        cut = DNSRecord(reply.header, questions=reply.questions, ar=[rr for rr in reply.ar if rr.rtype == QTYPE.OPT])
        cut.header.tc = 1
        packed = cut.pack()
    return packed


class Handler(DNSHandler):
    """dnslib's handler, with UDP answers sized to what the client can take (`wire`)."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        self.server.logger.log_request(self, request)
        reply = self.server.resolver.resolve(request, self)
        self.server.logger.log_reply(self, reply)
        return wire(request, reply, self.protocol == "udp")


# --- the API server: list, then watch from the list's resourceVersion


class APIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass(frozen=True)
class APIServer:
    host: str
    port: int
    sa_dir: str

    @classmethod
    def from_environment(cls, sa_dir: str = SA_DIR) -> APIServer:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise SystemExit("clusterdns: KUBERNETES_SERVICE_HOST is not set: run it as a pod")
        return cls(host, int(port), sa_dir)

    def get(self, path: str, timeout: float) -> http.client.HTTPResponse:
        """GET as the pod's ServiceAccount; the token is read at each request (kubelet renews it)."""
        with open(os.path.join(self.sa_dir, "token")) as f:
            token = f.read().strip()
        ctx = ssl.create_default_context(cafile=os.path.join(self.sa_dir, "ca.crt"))
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=timeout)
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read(500).decode(errors="replace")
            conn.close()
            raise APIError(resp.status, body)
        return resp

    def get_json(self, path: str) -> dict[str, Any]:
        resp = self.get(path, timeout=30)
        try:
            return json.loads(resp.read())
        finally:
            resp.close()


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class Watch(threading.Thread, Generic[V]):
    """Keeps a Table in step with one resource in all namespaces: list, then watch; list again on 410 or error."""

    def __init__(self, api: APIServer, resource: str, table: Table[V], parse: Callable[[dict[str, Any]], V]) -> None:
        super().__init__(name=f"watch-{resource}", daemon=True)
        self.api, self.resource, self.table, self.parse = api, resource, table, parse
        self.synced = threading.Event()

    def run(self) -> None:
        delay = 1.0
        while True:
            try:
                rv = self.list()
                self.synced.set()
                delay = 1.0
                while True:
                    rv = self.watch(rv)
            except Gone:
                log(f"{self.resource}: watch expired, listing again")
            except (OSError, APIError, ValueError, http.client.HTTPException) as e:
                log(f"{self.resource}: {e}; retrying in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _key(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace") or ""), str(meta.get("name") or "")

    def _parsed(self, obj: dict[str, Any]) -> V | None:
        try:
            return self.parse(obj)
        except (ValueError, TypeError, AttributeError) as e:
            log(f"{self.resource} {'/'.join(self._key(obj))} ignored: {e}")
            return None

    def list(self) -> str:
        items: dict[tuple[str, str], V] = {}
        cont = ""
        while True:
            page = f"&continue={quote(cont)}" if cont else ""
            body = self.api.get_json(f"/api/v1/{self.resource}?limit=500{page}")
            for obj in body.get("items") or ():
                if (value := self._parsed(obj)) is not None:
                    items[self._key(obj)] = value
            meta = body.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.table.replace(items)
        log(f"{self.resource}: listed {len(items)} at resourceVersion {meta.get('resourceVersion')}")
        return str(meta.get("resourceVersion") or "")

    def watch(self, rv: str) -> str:
        """Applies the events of one watch request; returns the resourceVersion to go on from."""
        resp = self.api.get(f"/api/v1/{self.resource}?watch=1&allowWatchBookmarks=true"
                            f"&timeoutSeconds={WATCH_SECONDS}&resourceVersion={quote(rv)}", timeout=WATCH_SECONDS + 30)
        try:
            for event in _lines(resp):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise APIError(int(obj.get("code") or 0), str(obj.get("message")))
                rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                if kind == "DELETED":
                    self.table.delete(self._key(obj))
                elif kind in ("ADDED", "MODIFIED"):
                    value = self._parsed(obj)
                    if value is None:
                        self.table.delete(self._key(obj))
                    else:
                        self.table.put(self._key(obj), value)
        finally:
            resp.close()
        return rv


def _lines(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    while line := resp.readline():
        if line.strip():
            yield json.loads(line)


# --- the process


def health_server(address: str, port: int, ready: Callable[[], bool]) -> http.server.ThreadingHTTPServer:
    """GET /health: 200 while the process runs; GET /ready: 200 once the first lists are in, else 503."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health" or (self.path == "/ready" and ready())
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok\n" if ok else b"not ready\n")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        daemon_threads = True

    return Server((address, port), Health)


def listen_address() -> str:
    """Both families on one socket where the kernel has IPv6."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return "::"
    except OSError:
        return "0.0.0.0"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--address", default="", help="listen address (default: all, both families)")
    p.add_argument("--health-port", type=int, default=8181, help="HTTP /ready and /health (0: none)")
    p.add_argument("--zone", default="cluster.local")
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--static", action="append", default=[], metavar="NAME=ADDRESS|NAME=TARGET",
                   help="answer NAME outside the zone (repeatable; also CLUSTERDNS_STATIC, comma-separated)")
    p.add_argument("--outside", choices=("refused", "servfail"), default="refused",
                   help="the answer for other names outside the zone")
    p.add_argument("--log-queries", action="store_true")
    p.add_argument("--sa-dir", default=SA_DIR, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    static = parse_static([os.environ.get("CLUSTERDNS_STATIC", ""), *args.static])
    config = Config(args.zone, args.ttl, static, RCODE.SERVFAIL if args.outside == "servfail" else RCODE.REFUSED)
    api = APIServer.from_environment(args.sa_dir)
    services: Table[Service] = Table()
    endpoints: Table[tuple[Address, ...]] = Table()
    watches: list[Watch[Any]] = [Watch(api, "services", services, Service.from_object),
               Watch(api, "endpoints", endpoints, endpoint_addresses)]
    for w in watches:
        w.start()

    def ready() -> bool:
        return all(w.synced.is_set() for w in watches)

    resolver = Resolver(Zone(services, endpoints, config), ready)
    logger = DNSLogger("request,reply,truncated,error" if args.log_queries else "error", prefix=False,
                       logf=lambda m: log(m))
    address = args.address or listen_address()
    for tcp in (False, True):
        DNSServer(resolver, address=address, port=args.port, tcp=tcp, logger=logger, handler=Handler).start_thread()
    log(f"serving {config.zone} on [{address}]:{args.port} (UDP, TCP); static names: {sorted(static) or 'none'}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 in a container has no default action
    if args.health_port:
        health_server(address, args.health_port, ready).serve_forever()
    else:
        signal.pause()


if __name__ == "__main__":
    main()
