"""The test cluster's DNS (tools/clusterdns/server.py, test-bed infrastructure): which answers a question gets
from a list of Services and Endpoints, as DNS messages, without a network or an API server."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clusterdns_server", ROOT / "tools" / "clusterdns" / "server.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


dns = _load()


def service(ns: str, name: str, ip: str | list[str] | None = None, *, external: str | None = None,
            ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": ports or [{"port": 80, "protocol": "TCP"}]}
    if external:
        spec |= {"type": "ExternalName", "externalName": external}
    else:
        ips = ip if isinstance(ip, list) else [ip or "None"]
        spec |= {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips}
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec}


def endpoints(ns: str, name: str, ready: list[str | tuple[str, str]], not_ready: list[str] | None = None,
              ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    addrs = [{"ip": a} if isinstance(a, str) else {"ip": a[0], "hostname": a[1]} for a in ready]
    subset = {"addresses": addrs, "notReadyAddresses": [{"ip": a} for a in not_ready or []],
              "ports": ports or [{"port": 80, "protocol": "TCP"}]}
    return {"metadata": {"namespace": ns, "name": name}, "subsets": [subset]}


def make(objs: list[dict[str, Any]], eps: list[dict[str, Any]] | None = None, ready: bool = True,
         **config: Any) -> Any:
    services, ends = dns.Table(), dns.Table()
    services.replace({(o["metadata"]["namespace"], o["metadata"]["name"]): dns.Service.from_object(o) for o in objs})
    ends.replace({(o["metadata"]["namespace"], o["metadata"]["name"]): dns.endpoint_addresses(o) for o in eps or []})
    return dns.Resolver(dns.Zone(services, ends, dns.Config(**config)), lambda: ready)


def ask(resolver: Any, name: str, qtype: str = "A") -> DNSRecord:
    """The reply as a client receives it (packed and parsed again)."""
    request = DNSRecord.question(name, qtype)
    return DNSRecord.parse(resolver.resolve(request, None).pack())


def rcode(reply: DNSRecord) -> str:
    return str(RCODE[reply.header.rcode])


def answers(reply: DNSRecord) -> list[tuple[str, str, str]]:
    return [(str(rr.rname), str(QTYPE[rr.rtype]), str(rr.rdata)) for rr in reply.rr]


CLUSTER = [service("default", "kubernetes", "10.96.0.1", ports=[{"name": "https", "port": 443}]),
           service("web", "front", ["10.96.5.5", "fd00:96::5"]),
           service("web", "v6only", "fd00:96::6"),
           service("web", "head", None, ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53,
                                                                               "protocol": "UDP"}]),
           service("web", "outside", external="Example.COM."),
           service("web", "alias", external="front.web.svc.cluster.local")]
EPS = [endpoints("web", "head", ["10.244.1.5", ("10.244.2.7", "db-0")], not_ready=["10.244.3.9"],
                 ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
       endpoints("web", "front", ["10.244.1.1"])]


@pytest.fixture
def r() -> Any:
    return make(CLUSTER, EPS)


def test_cluster_ip_service_has_its_address_in_each_family(r: Any) -> None:
    reply = ask(r, "front.web.svc.cluster.local")
    assert rcode(reply) == "NOERROR" and reply.header.aa
    assert answers(reply) == [("front.web.svc.cluster.local.", "A", "10.96.5.5")]
    assert answers(ask(r, "front.web.svc.cluster.local", "AAAA")) == [
        ("front.web.svc.cluster.local.", "AAAA", "fd00:96::5")]
    assert answers(ask(r, "kubernetes.default.svc.cluster.local.")) == [
        ("kubernetes.default.svc.cluster.local.", "A", "10.96.0.1")]


def test_names_are_case_insensitive_and_the_answer_keeps_the_question_s_case(r: Any) -> None:
    assert answers(ask(r, "Front.WEB.svc.Cluster.Local")) == [("Front.WEB.svc.Cluster.Local.", "A", "10.96.5.5")]


def test_a_name_without_the_asked_family_is_nodata_with_the_zone_s_soa(r: Any) -> None:
    reply = ask(r, "v6only.web.svc.cluster.local", "A")
    assert rcode(reply) == "NOERROR" and reply.rr == []
    assert [(str(a.rname), QTYPE[a.rtype]) for a in reply.auth] == [("cluster.local.", "SOA")]
    assert reply.auth[0].rdata.times[-1] == 5  # negative answers are cached as briefly as positive ones


@pytest.mark.parametrize("name", [
    "nope.web.svc.cluster.local", "front.nope.svc.cluster.local", "nope.svc.cluster.local",
    # what a search path makes of a name that was already fully qualified (ndots:5)
    "front.web.svc.cluster.local.web.svc.cluster.local", "google.com.web.svc.cluster.local",
    "x.cluster.local", "a.b.c.front.web.svc.cluster.local", "db-0.front.web.svc.cluster.local"])
def test_unknown_names_in_the_zone_are_nxdomain(r: Any, name: str) -> None:
    reply = ask(r, name)
    assert rcode(reply) == "NXDOMAIN" and reply.header.aa
    assert [QTYPE[a.rtype] for a in reply.auth] == ["SOA"]


@pytest.mark.parametrize("name", ["cluster.local", "svc.cluster.local", "web.svc.cluster.local",
                                  "pod.cluster.local", "_tcp.head.web.svc.cluster.local"])
def test_names_above_records_exist_without_data(r: Any, name: str) -> None:
    reply = ask(r, name)
    assert rcode(reply) == "NOERROR" and reply.rr == []


def test_the_zone_apex_has_a_soa(r: Any) -> None:
    assert [t for _, t, _ in answers(ask(r, "cluster.local", "SOA"))] == ["SOA"]


def test_headless_service_answers_its_ready_endpoints_only(r: Any) -> None:
    got = answers(ask(r, "head.web.svc.cluster.local"))
    assert sorted(ip for _, _, ip in got) == ["10.244.1.5", "10.244.2.7"]
    # each endpoint by its hostname, or by its address with dashes
    assert answers(ask(r, "db-0.head.web.svc.cluster.local")) == [("db-0.head.web.svc.cluster.local.", "A",
                                                                  "10.244.2.7")]
    assert answers(ask(r, "10-244-1-5.head.web.svc.cluster.local"))[0][2] == "10.244.1.5"
    assert rcode(ask(r, "10-244-3-9.head.web.svc.cluster.local")) == "NXDOMAIN"


def test_headless_service_without_ready_endpoints_exists_with_no_address() -> None:
    r = make([service("ns", "h", None)], [endpoints("ns", "h", [], not_ready=["10.1.1.1"])])
    reply = ask(r, "h.ns.svc.cluster.local")
    assert rcode(reply) == "NOERROR" and reply.rr == []


def test_external_name_is_a_cname_and_an_in_zone_target_is_followed(r: Any) -> None:
    reply = ask(r, "outside.web.svc.cluster.local")
    assert rcode(reply) == "NOERROR"
    assert answers(reply) == [("outside.web.svc.cluster.local.", "CNAME", "example.com.")]
    assert answers(ask(r, "alias.web.svc.cluster.local")) == [
        ("alias.web.svc.cluster.local.", "CNAME", "front.web.svc.cluster.local."),
        ("front.web.svc.cluster.local.", "A", "10.96.5.5")]
    assert answers(ask(r, "outside.web.svc.cluster.local", "CNAME")) == [
        ("outside.web.svc.cluster.local.", "CNAME", "example.com.")]


def test_external_names_that_loop_end(r: Any) -> None:
    r = make([service("a", "x", external="y.a.svc.cluster.local"), service("a", "y", external="x.a.svc.cluster.local")])
    reply = ask(r, "x.a.svc.cluster.local")
    assert rcode(reply) == "NOERROR" and 1 < len(reply.rr) <= dns.MAX_CHAIN + 1


def test_srv_for_named_ports(r: Any) -> None:
    reply = ask(r, "_https._tcp.kubernetes.default.svc.cluster.local", "SRV")
    assert answers(reply) == [("_https._tcp.kubernetes.default.svc.cluster.local.", "SRV",
                               "0 100 443 kubernetes.default.svc.cluster.local.")]
    assert [(str(a.rname), str(a.rdata)) for a in reply.ar] == [("kubernetes.default.svc.cluster.local.",
                                                                 "10.96.0.1")]
    # a headless Service: one per ready endpoint, with the endpoint's port
    got = sorted(rdata for _, _, rdata in answers(ask(r, "_dns._udp.head.web.svc.cluster.local", "SRV")))
    assert got == ["0 50 5353 10-244-1-5.head.web.svc.cluster.local.", "0 50 5353 db-0.head.web.svc.cluster.local."]
    assert rcode(ask(r, "_http._udp.head.web.svc.cluster.local", "SRV")) == "NXDOMAIN"
    assert rcode(ask(r, "_nope._tcp.head.web.svc.cluster.local", "SRV")) == "NXDOMAIN"


def test_pod_records_answer_the_address_in_their_name(r: Any) -> None:
    assert answers(ask(r, "10-244-1-9.web.pod.cluster.local")) == [("10-244-1-9.web.pod.cluster.local.", "A",
                                                                   "10.244.1.9")]
    assert answers(ask(r, "fd00-10-244--9.web.pod.cluster.local", "AAAA"))[0][2] == "fd00:10:244::9"
    assert rcode(ask(r, "not-an-ip.web.pod.cluster.local")) == "NXDOMAIN"


def test_ptr_for_cluster_ips_and_headless_endpoints(r: Any) -> None:
    assert answers(ask(r, "1.0.96.10.in-addr.arpa", "PTR")) == [
        ("1.0.96.10.in-addr.arpa.", "PTR", "kubernetes.default.svc.cluster.local.")]
    assert answers(ask(r, "7.2.244.10.in-addr.arpa", "PTR"))[0][2] == "db-0.head.web.svc.cluster.local."
    v6 = ".".join(reversed("fd000096000000000000000000000005")) + ".ip6.arpa"
    assert answers(ask(r, v6, "PTR"))[0][2] == "front.web.svc.cluster.local."
    assert rcode(ask(r, "9.9.9.9.in-addr.arpa", "PTR")) == "REFUSED"


def test_names_outside_the_zone_are_refused_at_once_unless_static(r: Any) -> None:
    reply = ask(r, "google.com")
    assert rcode(reply) == "REFUSED" and reply.rr == [] and not reply.header.aa
    assert rcode(ask(make(CLUSTER, outside_rcode=RCODE.SERVFAIL), "google.com")) == "SERVFAIL"
    static = dns.parse_static(["google.com=10.96.7.7, www.google.com=front.web.svc.cluster.local",
                               "v6.example=fd00::7"])
    r = make(CLUSTER, EPS, static=static)
    assert answers(ask(r, "GOOGLE.com")) == [("GOOGLE.com.", "A", "10.96.7.7")]
    assert rcode(ask(r, "google.com", "AAAA")) == "NOERROR" and ask(r, "google.com", "AAAA").rr == []
    assert answers(ask(r, "www.google.com")) == [("www.google.com.", "CNAME", "front.web.svc.cluster.local."),
                                                 ("front.web.svc.cluster.local.", "A", "10.96.5.5")]
    assert answers(ask(r, "v6.example", "AAAA"))[0][2] == "fd00::7"
    assert rcode(ask(r, "mail.google.com")) == "REFUSED"


def test_static_entries_are_validated() -> None:
    for bad in ["google.com", "=1.2.3.4", "google.com="]:
        with pytest.raises(ValueError):
            dns.parse_static([bad])


def test_servfail_until_the_first_lists_are_in() -> None:
    r = make(CLUSTER, ready=False)
    assert rcode(ask(r, "kubernetes.default.svc.cluster.local")) == "SERVFAIL"


def test_other_opcodes_are_not_implemented(r: Any) -> None:
    request = DNSRecord.question("front.web.svc.cluster.local")
    request.header.opcode = 4  # NOTIFY
    assert RCODE[r.resolve(request, None).header.rcode] == "NOTIMP"


def test_other_classes_are_refused(r: Any) -> None:
    request = DNSRecord.question("version.bind", "TXT", "CH")
    assert RCODE[r.resolve(request, None).header.rcode] == "REFUSED"
    request = DNSRecord.question("front.web.svc.cluster.local", "A", "CH")
    assert RCODE[r.resolve(request, None).header.rcode] == "REFUSED"


def test_udp_answers_too_large_for_the_client_are_cut_with_tc() -> None:
    r = make([service("ns", "big", None)], [endpoints("ns", "big", [f"10.1.{i // 250}.{i % 250 + 1}"
                                                                    for i in range(100)])])
    request = DNSRecord.question("big.ns.svc.cluster.local")
    reply = r.resolve(request, None)
    assert len(reply.rr) == 100
    assert len(DNSRecord.parse(dns.wire(request, reply, udp=False)).rr) == 100
    cut = DNSRecord.parse(dns.wire(request, reply, udp=True))
    assert cut.header.tc and cut.rr == [] and str(cut.q.qname) == "big.ns.svc.cluster.local."
    # a client offering a larger EDNS payload gets more, up to 1232 bytes
    edns = DNSRecord.question("big.ns.svc.cluster.local")
    edns.add_ar(EDNS0(udp_len=4096))
    assert dns.udp_limit(edns) == 1232
    r = make([service("ns", "mid", None)], [endpoints("ns", "mid", [f"10.1.0.{i}" for i in range(1, 41)])])
    edns = DNSRecord.question("mid.ns.svc.cluster.local")
    edns.add_ar(EDNS0(udp_len=4096))
    plain = DNSRecord.question("mid.ns.svc.cluster.local")
    assert DNSRecord.parse(dns.wire(plain, r.resolve(plain, None), udp=True)).header.tc
    got = DNSRecord.parse(dns.wire(edns, r.resolve(edns, None), udp=True))
    assert not got.header.tc and len(got.rr) == 40


def test_malformed_objects_are_refused_at_the_edge() -> None:
    with pytest.raises(ValueError):
        dns.Service.from_object(service("ns", "x", "not-an-ip"))
    with pytest.raises(ValueError):
        dns.Service.from_object({"metadata": {"name": "x"}, "spec": {}})
    with pytest.raises(ValueError):
        dns.Service.from_object(service("ns", "x", "10.0.0.1", ports=[{"port": 0}]))
    with pytest.raises(ValueError):
        dns.endpoint_addresses(endpoints("ns", "x", ["10.0.0.300"]))


class Stream:
    """A watch response: one JSON event a line."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.body = io.BytesIO(b"".join(json.dumps(e).encode() + b"\n" for e in events))

    def readline(self) -> bytes:
        return self.body.readline()

    def close(self) -> None:
        pass


class OneWatch:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events, self.paths = events, []

    def get(self, path: str, timeout: float) -> Stream:
        self.paths.append(path)
        return Stream(self.events)


def _event(kind: str, obj: dict[str, Any], rv: str) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["resourceVersion"] = rv
    return {"type": kind, "object": obj}


def test_watch_events_update_the_table_and_the_resource_version() -> None:
    table = dns.Table()
    table.replace({("web", "old"): dns.Service.from_object(service("web", "old", "10.96.0.9"))})
    api = OneWatch([_event("ADDED", service("web", "new", "10.96.0.8"), "11"),
                    _event("MODIFIED", service("web", "new", "10.96.0.7"), "12"),
                    _event("DELETED", service("web", "old", "10.96.0.9"), "13"),
                    _event("ADDED", service("web", "bad", "nonsense"), "14"),
                    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}])
    w = dns.Watch(api, "services", table, dns.Service.from_object)
    assert w.watch("10") == "20"
    assert "resourceVersion=10" in api.paths[0] and "watch=1" in api.paths[0]
    assert [(s.name, s.cluster_ips) for s in table.values()] == [("new", ("10.96.0.7",))]


def test_an_expired_watch_asks_for_a_new_list() -> None:
    api = OneWatch([{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}])
    with pytest.raises(dns.Gone):
        dns.Watch(api, "services", dns.Table(), dns.Service.from_object).watch("1")
