"""Fails when the frozen bundle lacks a module that Weft loads when it runs.

PyInstaller finds modules by reading the bytecode from entry.py on. What it cannot see, or what
weft.spec excludes, is missing from the bundle and fails only when that code first runs: the kube store's
`from kubernetes import client` failed in every deployment while the bundle lacked pydantic, which the
kubernetes client requires and loads through its own lazy imports.

So this runs, in the build's Python, what the frozen program can load: every module of Weft's packages,
every import Weft makes inside a function (the stores, the policy sources, python-iptables), the
attributes it reads from the modules so imported (the kubernetes client loads its API classes on first
access), and the kubernetes client's decoding of each kind weftd reads (its models and pydantic's
validators load on first use). Each module that run loaded must be in the bundle.

    python packaging/check_bundle.py BUNDLE
"""

from __future__ import annotations

import ast
import glob
import json
import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("weftlib", "cni_plugin", "ipam", "weftd")

# What weftd reads from the API server (weftd/subnet/kube.py: Nodes; weftd/policy/kube.py: Pods,
# Namespaces, NetworkPolicies), as lists, the way list and watch answers are decoded.
STAMP = "2024-01-01T00:00:00Z"
META = {"name": "a", "namespace": "x", "uid": "u", "resourceVersion": "1", "creationTimestamp": STAMP,
        "labels": {"k": "v"}, "annotations": {"k": "v"}}
KINDS = {
    "V1NodeList": {"metadata": {"resourceVersion": "1"}, "items": [{
        "metadata": META, "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}],
                   "conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "r", "message": "m",
                                   "lastHeartbeatTime": STAMP, "lastTransitionTime": STAMP}]}}]},
    "V1PodList": {"metadata": {"resourceVersion": "1"}, "items": [{
        "metadata": META, "spec": {"nodeName": "n1", "hostNetwork": False, "containers": [
            {"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}]}}]},
    "V1NamespaceList": {"metadata": {"resourceVersion": "1"}, "items": [{"metadata": META,
                                                                         "status": {"phase": "Active"}}]},
    "V1NetworkPolicyList": {"metadata": {"resourceVersion": "1"}, "items": [{"metadata": META, "spec": {
        "podSelector": {"matchLabels": {"k": "v"},
                        "matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}, {"ipBlock": {
            "cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
            "ports": [{"port": 80, "protocol": "TCP"}, {"port": "http", "endPort": None}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}}]},
}

# Run in a fresh interpreter without `site` (python -S: no .pth hooks, which load modules of their own),
# so that only what Weft's code loads is counted, not this script's imports: prints each module loaded
# after start-up as [name, origin], the origin None for a namespace package. Modules made at run time
# (no spec) have no file to look for; an alias (os.path) counts as the module it names.
EXERCISE = """
import sys
before = set(sys.modules)
import importlib, json
sys.path[:0] = json.loads(sys.argv[1])
todo = json.loads(sys.stdin.read())
for name in todo["modules"]:
    importlib.import_module(name)
for module, name, attrs in todo["reads"]:  # as `from module import name` binds it, then its attributes
    obj = importlib.import_module(module)
    if name:
        try:
            obj = getattr(obj, name)
        except AttributeError:
            obj = importlib.import_module(f"{module}.{name}")
    for attr in attrs:
        getattr(obj, attr)
from kubernetes import client
api = client.ApiClient()
for kind, body in todo["kinds"].items():
    api.sanitize_for_serialization(api.deserialize(json.dumps(body), kind, "application/json"))
out = {}
for key in set(sys.modules) - before:
    spec = getattr(sys.modules[key], "__spec__", None)
    if spec is not None:
        out[spec.name] = spec.origin
print(json.dumps(sorted(out.items())))
"""


def weft_modules() -> list[str]:
    """Every module of Weft's packages (not __main__, which runs the program)."""
    out = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out.append(".".join(parts))
    return out


def lazy_imports() -> tuple[set[str], dict[tuple[str, str], set[str]]]:
    """The modules Weft imports inside functions; and for each `from M import N` there or `import M`
    (N empty), the attributes read from what it binds (`client.CoreV1Api`)."""
    modules: set[str] = set()
    reads: dict[tuple[str, str], set[str]] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for fn in ast.walk(ast.parse(f.read_text(), str(f))):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                bound: dict[str, tuple[str, str]] = {}  # local name -> what it is bound to
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        for alias in node.names:
                            modules.add(alias.name)
                            target = (alias.name, "") if alias.asname else (alias.name.partition(".")[0], "")
                            bound[alias.asname or target[0]] = target
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        modules.add(node.module)
                        for alias in node.names:
                            bound[alias.asname or alias.name] = (node.module, alias.name)
                            reads.setdefault((node.module, alias.name), set())
                for node in ast.walk(fn):
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                        reads.setdefault(bound[node.value.id], set()).add(node.attr)
    return modules, reads


def loaded_modules() -> list[tuple[str, str | None]]:
    modules, reads = lazy_imports()
    todo = {"modules": weft_modules() + sorted(modules),
            "reads": [[m, n, sorted(attrs)] for (m, n), attrs in sorted(reads.items())],
            "kinds": KINDS}
    path = [str(ROOT), *site.getsitepackages()]
    p = subprocess.run([sys.executable, "-S", "-c", EXERCISE, json.dumps(path)], input=json.dumps(todo),
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.exit(f"check_bundle: running Weft's imports in {sys.executable} failed:\n{p.stderr}")
    return [(name, origin) for name, origin in json.loads(p.stdout)]


def missing(bundle: Path, modules: list[tuple[str, str | None]]) -> list[str]:
    """The modules, of those given, that the bundle holds neither as bytecode nor as an extension."""
    internal = bundle / "_internal"
    out = []
    for name, origin in modules:
        if origin in ("built-in", "frozen"):  # in the interpreter itself
            continue
        rel = name.replace(".", os.sep)
        if origin is None:  # a namespace package: its directory
            if not (internal / rel).is_dir():
                out.append(name)
            continue
        if (internal / f"{rel}.pyc").is_file() or (internal / rel / "__init__.pyc").is_file():
            continue
        # Extension modules: beside their package, or the standard library's in lib-dynload.
        patterns = [f"{glob.escape(str(internal / rel))}.*so"]
        if "." not in name:
            patterns.append(f"{glob.escape(str(internal))}/python3*/lib-dynload/{glob.escape(name)}.*so")
        if not any(glob.glob(p) for p in patterns):
            out.append(name)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    bundle = Path(sys.argv[1])
    if not (bundle / "_internal").is_dir():
        sys.exit(f"check_bundle: {bundle} is not a PyInstaller onedir bundle")
    modules = loaded_modules()
    lacking = missing(bundle, modules)
    if lacking:
        sys.exit(f"check_bundle: {bundle} lacks {len(lacking)} of the {len(modules)} modules Weft loads: "
                 + ", ".join(lacking))
    print(f"check_bundle: {bundle} holds all {len(modules)} modules Weft loads")


if __name__ == "__main__":
    main()
