"""The typed hand-off from weftd's CNI server to its hook, and what the policy engine reads of a node's pods:
an ADD's outcome carries its environment and result, the attachment is built from them, weft-ipam's
reservations are read without the lock (each file once), and the bindings survive a restart."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import netaddr
import pytest

from ipam import reservations
from ipam.reservations import Owner, Reader, Reservations
from weftd.pod import Attachment
from weftd.policy.bindings import Binding, Bindings, Ports
from weftlib.cni import skel
from weftlib.cni.result import Interface, IPConfig, Result
from weftlib.kernel.netlink import host_veth_name

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0"}
CONF = json.dumps({"cniVersion": "1.0.0", "name": "weft", "type": "weft"}).encode()


def plugin_result(prev: int = 0) -> Result:
    """As the plugin answers an ADD: after `prev` interfaces of an earlier plugin, the bridge, the veth's host
    end and its pod end, which the addresses name."""
    earlier = [Interface(f"other{i}") for i in range(prev)]
    return Result([*earlier, Interface("cni0", "0a:00:00:00:00:01"), Interface("weft1234abcd", "0a:00:00:00:00:02"),
                   Interface("eth0", "0a:00:00:00:00:03", "/proc/self/ns/net")],
                  [IPConfig(ipaddress.ip_interface("10.244.1.5/24"), ipaddress.ip_address("10.244.1.1"), prev + 2),
                   IPConfig(ipaddress.ip_interface("fd00:10:244:1::5/64"), None, prev + 2)])


def test_an_add_outcome_carries_its_environment_and_result() -> None:
    def add(args: skel.Args, conf: dict[str, Any]) -> Result:
        return plugin_result()

    outcome = skel.invoke("weft", {"ADD": add}, CONF, ENV)
    assert outcome.status == 0 and json.loads(outcome.stdout)["ips"][0]["address"] == "10.244.1.5/24"
    assert outcome.args is not None and outcome.args.args["K8S_POD_NAME"] == "web-0"
    assert isinstance(outcome.result, Result)
    failed = skel.invoke("weft", {"ADD": add}, CONF, {**ENV, "CNI_IFNAME": "a/b"})
    assert failed.status == 1 and failed.args is None and failed.result is None


@pytest.mark.parametrize("prev", [0, 2])
def test_attachment_from_the_add(prev: int) -> None:
    outcome = skel.invoke("weft", {"ADD": lambda args, conf: plugin_result(prev)}, CONF, ENV)
    assert outcome.args is not None and isinstance(outcome.result, Result)
    pod = Attachment.of(outcome.args, outcome.result)
    assert pod == Attachment("ns1", "web-0", "c1", "eth0", "weft1234abcd",
                             (ipaddress.ip_interface("10.244.1.5/24"), ipaddress.ip_interface("fd00:10:244:1::5/64")))


def test_attachment_of_a_container_that_is_no_pod_has_no_name() -> None:
    args = skel.read_env({**ENV, "CNI_ARGS": ""})
    pod = Attachment.of(args, plugin_result())
    assert (pod.namespace, pod.name, pod.host_veth) == ("", "", "weft1234abcd")


@pytest.mark.parametrize("result", [
    Result([Interface("eth0", sandbox="/x")], [IPConfig(ipaddress.ip_interface("10.0.0.2/24"), None, 0)]),
    Result([Interface("a", sandbox="/x"), Interface("eth0", sandbox="/x")],
           [IPConfig(ipaddress.ip_interface("10.0.0.2/24"), None, 1)]),
    Result([Interface("cni0")], [IPConfig(ipaddress.ip_interface("10.0.0.2/24"))]),
])
def test_a_result_without_a_host_end_is_refused(result: Result) -> None:
    with pytest.raises(ValueError, match="no host end"):
        Attachment.of(skel.read_env(ENV), result)


def test_reservations_are_read_without_the_lock_and_each_file_once(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = Reservations(str(tmp_path), "weft")
    with store as held:
        held.reserve(ipaddress.ip_address("10.244.1.2"), "c1", "eth0")
        held.reserve(ipaddress.ip_address("10.244.1.3"), "c2", "eth0")
        held.set_last_reserved(0, ipaddress.ip_address("10.244.1.3"))
    (Path(store.dir) / ".weft-tmp-999").write_text("half")  # a writer's: a reader leaves it alone
    opened: list[str] = []
    read = reservations._read

    def counted(path: str) -> bytes:
        opened.append(path)
        return read(path)

    monkeypatch.setattr(reservations, "_read", counted)
    reader = Reader(store.dir)
    stamp = reader.stamp()
    want = {ipaddress.ip_address("10.244.1.2"): Owner("c1", "eth0"),
            ipaddress.ip_address("10.244.1.3"): Owner("c2", "eth0")}
    assert reader.read() == want and len(opened) == 2
    assert (Path(store.dir) / ".weft-tmp-999").exists()
    assert reader.read() == want and len(opened) == 2  # unchanged files are not read again
    reader.forget()
    assert reader.read() == want and len(opened) == 4
    with store as held:
        held.release(ipaddress.ip_address("10.244.1.3"))
        held.reserve(ipaddress.ip_address("10.244.1.4"), "c3", "eth0")
    assert reader.stamp() != stamp
    assert reader.read() == {ipaddress.ip_address("10.244.1.2"): Owner("c1", "eth0"),
                             ipaddress.ip_address("10.244.1.4"): Owner("c3", "eth0")}
    assert len(opened) == 5  # only the new one
    assert Reader(str(tmp_path / "none")).read() == {} and Reader(str(tmp_path / "none")).stamp() is None


def test_ports_name_each_reservation_s_veth(tmp_path: Path) -> None:
    store = Reservations(str(tmp_path), "weft")
    with store as held:
        held.reserve(ipaddress.ip_address("10.244.1.2"), "c1", "eth0")
        held.reserve(ipaddress.ip_address("fd00::2"), "c1", "eth0")
        held.reserve(ipaddress.ip_address("10.244.1.3"), "c2", "eth0")
    (Path(store.dir) / "10.244.1.4").write_text("legacy")  # names no interface: no veth to bind
    ports = Ports(Path(store.dir)).bindings()
    assert [(p.ifname, [str(ip) for ip in p.ips]) for p in ports] == sorted([
        (host_veth_name("c1", "eth0"), ["10.244.1.2", "fd00::2"]), (host_veth_name("c2", "eth0"), ["10.244.1.3"])])


def test_bindings_are_kept_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "policy-pods.json"
    bindings = Bindings(path)
    web = Binding("ns1", "web-0", (netaddr.IPAddress("10.244.1.5"),))
    assert bindings.put("c1", web) is None and bindings.put("c2", web) is None
    assert bindings.put("c2", None) == web
    assert Bindings(path).all() == [web]
    assert json.loads(path.read_text()) == {"c1": {"namespace": "ns1", "name": "web-0", "ips": ["10.244.1.5"]}}
    path.write_text("{not json")
    assert Bindings(path).all() == []
