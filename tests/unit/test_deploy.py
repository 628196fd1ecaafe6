"""The kind deployment in conf/: the manifests parse, every object is a valid object of its kind
for the `kubernetes` client's models, the mounts carry the paths the code uses, and the RBAC grants
every API call weftd makes."""

from __future__ import annotations

import ast
import json
from pathlib import Path, PurePosixPath
from typing import Any

import netaddr
import pytest
import yaml
from kubernetes.client import ApiClient

from weftd.config import NetworkConfig, Paths
from weftd.policy import kube as policy_kube
from weftd.subnet import kube

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "conf" / "kube-weft.yml"
UNINSTALL = ROOT / "conf" / "kube-weft-uninstall.yml"
KIND = ROOT / "conf" / "kind-cluster.yaml"

# The kubernetes client's CoreV1Api methods weftd may call, and the permission each one needs.
PERMISSIONS = {
    "read_node": {("nodes", "get")},
    "list_node": {("nodes", "list"), ("nodes", "watch")},  # listed, then watched through watch.stream
    "patch_node_status": {("nodes/status", "patch")},
    # weftd/policy/kube.py: each listed, then watched
    "list_pod_for_all_namespaces": {("pods", "list"), ("pods", "watch")},
    "list_namespace": {("namespaces", "list"), ("namespaces", "watch")},
    "list_network_policy_for_all_namespaces": {("networkpolicies", "list"), ("networkpolicies", "watch")},
}


def docs(manifest: Path = MANIFEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest.read_text()) if d]


def by_kind(kind: str, manifest: Path = MANIFEST) -> dict[str, Any]:
    (obj,) = [d for d in docs(manifest) if d["kind"] == kind]
    return obj


@pytest.mark.parametrize("obj", docs() + docs(UNINSTALL), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_object_is_valid_for_its_model(obj: dict[str, Any]) -> None:
    client = ApiClient()
    model = client.deserialize(json.dumps(obj), f"V1{obj['kind']}", "application/json")  # raises on a missing field
    # A round trip drops whatever the model does not know, so a misspelled field shows up here.
    assert client.sanitize_for_serialization(model) == obj


def test_the_manifest_has_the_objects_of_kube_flannel() -> None:
    assert sorted(d["kind"] for d in docs()) == sorted(
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"])
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == by_kind("ServiceAccount")["metadata"]["name"]
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (weftd,) = spec["containers"]
    assert {"NET_ADMIN", "NET_RAW"} <= set(weftd["securityContext"]["capabilities"]["add"])
    binding = by_kind("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == by_kind("ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == by_kind("Namespace")["metadata"]["name"]


def _calls_in_weftd() -> set[str]:
    """Every `<something>.api.<method>` that weftd's code refers to."""
    found = set()
    for path in (ROOT / "weftd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "api") or (isinstance(node, ast.Attribute)
                                                      and isinstance(node.value, ast.Name)
                                                      and node.value.id in ("core", "networking")):
                found.add(node.attr)
    return found - {"api_client"}


def test_rbac_grants_every_call_weftd_makes() -> None:
    calls = _calls_in_weftd()
    assert calls and calls <= set(PERMISSIONS), f"unmapped API calls: {calls - set(PERMISSIONS)}"
    needed = set().union(*(PERMISSIONS[c] for c in calls))
    assert needed == set(kube.API_CALLS) | set(policy_kube.API_CALLS)
    granted = {(res, verb) for rule in by_kind("ClusterRole")["rules"] for res in rule["resources"]
               for verb in rule["verbs"]}
    assert needed <= granted
    assert granted == needed, f"more than weftd needs: {granted - needed}"


def _mounts(container: dict[str, Any], volumes: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    return {m["mountPath"].rstrip("/"): (m["name"], volumes[m["name"]]) for m in container["volumeMounts"]}


def _host_path_for(path: str, mounts: dict[str, tuple[str, dict[str, Any]]]) -> str | None:
    """The host path behind `path` in the container, if a hostPath mount carries it."""
    for mount_path, (_, volume) in mounts.items():
        if PurePosixPath(path).is_relative_to(mount_path) and "hostPath" in volume:
            return volume["hostPath"]["path"] + path[len(mount_path):]
    return None


def test_mounts_carry_the_paths_the_code_uses() -> None:
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (weftd,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in weftd["env"]}
    mounts = _mounts(weftd, volumes)
    defaults = Paths()
    # weftd's paths are the code's defaults, and the host sees each at the same place: the plugin on
    # the host reads the conflist, connects to the socket and shares the lease store with weftd.
    for var, default in (("WEFTD_SUBNET_FILE", defaults.subnet_file), ("WEFTD_CNI_CONF_DIR", defaults.cni_conf_dir),
                         ("WEFTD_IPAM_DATA_DIR", defaults.ipam_data_dir), ("WEFTD_CNI_SOCKET", defaults.cni_socket)):
        assert env[var] == str(default)
        assert _host_path_for(env[var], mounts) == env[var], var
    assert len(defaults.cni_socket.as_posix()) < 108  # sun_path
    assert _host_path_for("/opt/cni/bin/portmap", mounts) == "/opt/cni/bin"  + "/portmap"
    assert _host_path_for("/run/xtables.lock", mounts) == "/run/xtables.lock"
    # The WireGuard key stays on the node's disk across pod restarts and reboots (not /run, a tmpfs).
    assert env["WEFTD_STATE_DIR"] == "/var/lib/weft"
    assert _host_path_for("/var/lib/weft/wireguard.key", mounts) == "/var/lib/weft/wireguard.key"
    assert _host_path_for("/var/run/wireguard/weft-wg.sock", mounts) == "/var/run/wireguard/weft-wg.sock"
    netns = [m for m in weftd["volumeMounts"] if m["mountPath"] == "/run/netns"]
    assert netns and netns[0]["mountPropagation"] == "HostToContainer"
    # The network config comes from the ConfigMap, mounted where WEFTD_NET_CONF points.
    conf_dir, (_, vol) = next((p, mv) for p, mv in mounts.items()
                              if PurePosixPath(env["WEFTD_NET_CONF"]).parent == PurePosixPath(p))
    assert vol["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert PurePosixPath(env["WEFTD_NET_CONF"]).name in by_kind("ConfigMap")["data"]
    assert conf_dir
    # The init container installs into the host's CNI bin dir, under the name the runtime execs.
    (init,) = spec["initContainers"]
    assert init["command"][-1] == "/host/opt/cni/bin"
    assert _host_path_for(init["command"][-1], _mounts(init, volumes)) == "/opt/cni/bin"
    assert _host_path_for(init["command"][-2], _mounts(init, volumes)) == "/opt/cni/bin/.weft"


def test_image_paths_match_the_dockerfile() -> None:
    copies = dict(reversed(line.split()[1:3]) for line in (ROOT / "Dockerfile").read_text().splitlines()
                  if line.startswith("COPY "))
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    (weftd,), (init,) = spec["containers"], spec["initContainers"]
    assert copies["/opt/weft/bundle"] == ".build/dist/weft"
    assert copies["/opt/weft/install.sh"] == "packaging/install.sh"
    assert weftd["command"][0] == "/opt/weft/bundle/weftd" and init["command"][1] == "/opt/weft/install.sh"
    assert init["command"][3] == "/opt/weft/bundle"
    assert weftd["image"] == init["image"]


def test_network_config_and_kind_cluster_agree() -> None:
    net = NetworkConfig.parse(json.loads(by_kind("ConfigMap")["data"]["net-conf.json"]))
    cluster = yaml.safe_load(KIND.read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert cluster["networking"]["disableDefaultCNI"] is True
    assert netaddr.IPNetwork(cluster["networking"]["podSubnet"]) in net.network
    assert sum(1 for n in cluster["nodes"] if n["role"] == "worker") >= 1



def _host_mounts(container: dict[str, Any], volumes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the hostPath volume behind it (path and type), for the container's hostPath mounts."""
    return {path: volume["hostPath"] for path, (_, volume) in _mounts(container, volumes).items()
            if "hostPath" in volume}


def test_uninstall_manifest_matches_the_install_one() -> None:
    """The uninstall DaemonSet runs the same image, sees the node through the same hostPaths at the same
    places, and gives `weftd uninstall` weftd's environment, so it finds and removes the same names."""
    (ds,) = docs(UNINSTALL)
    assert ds["kind"] == "DaemonSet" and ds["metadata"]["namespace"] == "kube-system"  # kube-weft may be gone
    spec, install = ds["spec"]["template"]["spec"], by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["tolerations"] == [{"operator": "Exists"}]  # every taint
    assert spec["automountServiceAccountToken"] is False  # it calls no API
    volumes, install_volumes = {v["name"]: v for v in spec["volumes"]}, {v["name"]: v for v in install["volumes"]}
    (weftd,), (install_cni,) = install["containers"], install["initContainers"]
    uninstall, remove_cni = spec["initContainers"]
    (done,) = spec["containers"]
    assert {c["image"] for c in (uninstall, remove_cni, done)} == {weftd["image"]}
    assert {v["hostPath"]["path"]: v["hostPath"] for v in volumes.values()} == {
        v["hostPath"]["path"]: v["hostPath"] for v in install_volumes.values() if "hostPath" in v}
    assert _host_mounts(uninstall, volumes) == _host_mounts(weftd, install_volumes)
    assert uninstall["env"] == weftd["env"]
    assert uninstall["command"] == [weftd["command"][0], "uninstall"]
    assert uninstall["securityContext"]["privileged"] is True
    # remove-cni undoes install-cni: the same script on the same libdir and bin dir, through the same mount.
    script, verb, libdir, cnibin = remove_cni["command"][1:]
    assert (script, verb) == (install_cni["command"][1], "remove")
    assert [libdir, cnibin] == install_cni["command"][4:6]
    assert _host_mounts(remove_cni, volumes) == _host_mounts(install_cni, install_volumes)
    # Ready once the init containers are done: the main container only waits.
    assert done["command"] == ["sleep", "infinity"] and "readinessProbe" not in done


def test_uninstall_resolves_the_names_weftd_run_uses() -> None:
    """With the manifest's environment, every setting `weftd uninstall` shares with `weftd run` has the
    same value: the paths, the bridge, the device names."""
    from weftd import options

    (ds,) = docs(UNINSTALL)
    uninstall = ds["spec"]["template"]["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value", "node-1") for e in uninstall["env"]}
    run = vars(options.parse(["run"], env, "test")[0])
    removes = vars(options.parse(["uninstall"], env, "test")[0])
    shared = set(run) & set(removes) - {"command"}
    assert {"subnet_file", "cni_conf_dir", "cni_conf_name", "ipam_data_dir", "bridge", "node_name"} <= shared
    assert {k: removes[k] for k in shared} == {k: run[k] for k in shared}
    assert removes["subnet_file"] == "/run/weft/subnet.env" and removes["ipam_data_dir"] == "/var/lib/cni/networks"
