"""The incremental ruleset (weftd.policy.ruleset): after any sequence of changes it equals a ruleset built
from scratch, and a change sends the kernel only what it touches."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.test_policy import _random_pod, _random_world, bindings_of, pol, random_steps
from weftd.policy import model
from weftd.policy.compile import State, build
from weftd.policy.ruleset import Change, Ruleset


def fresh(objects: dict[model.Key, model.Object]) -> Ruleset:
    """Node `me`'s ruleset for the objects, from scratch."""
    s = State.of(objects.values())
    s.pods.sort(key=lambda p: p.key)
    local = [p for p in s.pods if p.node_name == "me"]
    return build(s, local, bindings_of(local), 5)


class Mirror:
    """A ruleset kept up to date with raw objects as the engine keeps it: object by object, what changed. The
    node's veths go in as the engine's hook puts them, the veths of the pods that changed alone (put_port), at
    one change, and as its resync and reservation reads do, all of them (put_ports), at the next."""

    def __init__(self) -> None:
        self.ruleset = Ruleset(5)
        self.objects: dict[model.Key, model.Object] = {}
        self._each_port = False

    def follow(self, raw: list[dict[str, Any]]) -> Change:
        """The objects are now these."""
        objects = {o.key: o for o in map(model.parse, raw)}
        return self.change({k: objects.get(k) for k in objects.keys() | self.objects.keys()})

    def change(self, changes: dict[model.Key, model.Object | None]) -> Change:
        """These objects changed (None: gone)."""
        r = self.ruleset
        self._each_port = not self._each_port
        for key, new in sorted(changes.items(), key=lambda kv: kv[0]):
            old = self.objects.get(key)
            if old == new:
                continue
            if self._each_port and key[0] == "Pod":
                for was in [old] if isinstance(old, model.Pod) and old.node_name == "me" else []:
                    r.put_port(bindings_of([was])[0].ifname, None)
                for port in bindings_of([new]) if isinstance(new, model.Pod) and new.node_name == "me" else []:
                    r.put_port(port.ifname, port)
            if new is None:
                del self.objects[key]
            else:
                self.objects[key] = new
            if isinstance(new, model.Namespace) or (new is None and key[0] == "Namespace"):
                r.put_namespace(key[2], new.labels if new is not None else None)
            elif isinstance(new, model.Pod):
                r.put_pod(new, new.node_name == "me")
            elif isinstance(new, model.NetworkPolicy):
                r.put_policy(new)
            elif key[0] == "Pod":
                r.remove_pod(key)
            else:
                r.remove_policy(key)
        if not self._each_port and any(k[0] == "Pod" for k in changes):
            r.put_ports(bindings_of(sorted((p for p in self.objects.values() if isinstance(p, model.Pod)
                                            and p.node_name == "me"), key=lambda p: p.key)))
        return r.flush()


Changes = dict[model.Key, model.Object | None]


def churn(seed: int, pods: int, policies: int, changes: int) -> Iterator[tuple[str, Changes]]:
    """A cluster of `pods` pods and `policies` policies in 4 namespaces (one without an object) as its first
    change, then `changes` random changes: pods created, deleted, relabelled, readdressed or moved to another
    node; policies created, updated and deleted; namespaces relabelled, created, deleted."""
    rnd = random.Random(seed)
    nss, _, pols = _random_world(rnd, 0, policies)
    serial = 0

    def new_pod(labels: dict[str, str]) -> dict[str, Any]:
        nonlocal serial
        serial += 1
        p = _random_pod(rnd, 0, labels)
        v6 = rnd.random() < 0.3
        ips = [] if rnd.random() < 0.05 else [f"10.{1 + serial // 60000}.{serial // 250 % 240}.{serial % 250 + 1}"]
        if rnd.random() < 0.05:
            ips = [f"10.1.0.{rnd.randrange(1, 4)}"]  # maybe another pod's
        p["status"] = {"podIPs": [{"ip": ip} for ip in ips + ([f"fd00:1::{serial:x}"] if v6 and ips else [])]}
        p["metadata"]["name"] = f"q{serial}"
        return p

    def labels() -> dict[str, str]:
        return {k: rnd.choice("abc") for k in ("app", "tier", "team") if rnd.random() < 0.6}

    objs = [new_pod(labels()) for _ in range(pods)]
    yield "created", {o.key: o for o in map(model.parse, nss + objs + pols)}
    for step in range(changes):
        touched: list[dict[str, Any]] = []
        op = rnd.randrange(12)
        what = ""
        if op <= 2 or not objs:
            objs.append(new_pod(labels()))
            touched.append(objs[-1])
            what = "pod created"
        elif op == 3:
            touched.append(objs.pop(rnd.randrange(len(objs))) | {"gone": True})
            what = "pod deleted"
        elif op == 4:
            touched.append(rnd.choice(objs))
            touched[-1]["metadata"]["labels"] = labels()
            what = "pod relabelled"
        elif op == 5:
            p = rnd.choice(objs)
            p.update({k: v for k, v in new_pod(p["metadata"]["labels"]).items() if k in ("spec", "status")})
            touched.append(p)
            what = "pod readdressed or moved"
        elif op == 6:
            pols.append(_random_world(rnd, 0, 1)[2][0] | {"metadata": {"name": f"s{step}",
                                                                        "namespace": f"n{rnd.randrange(4)}"}})
            touched.append(pols[-1])
            what = "policy created"
        elif op == 7 and pols:
            i = rnd.randrange(len(pols))
            pols[i] = _random_world(rnd, 0, 1)[2][0] | {"metadata": pols[i]["metadata"]}
            touched.append(pols[i])
            what = "policy updated"
        elif op == 8 and pols:
            touched.append(pols.pop(rnd.randrange(len(pols))) | {"gone": True})
            what = "policy deleted"
        elif op == 9:
            touched.append(rnd.choice(nss))
            touched[-1]["metadata"]["labels"] = {"team": rnd.choice("abc")}
            what = "namespace relabelled"
        elif op == 10:
            if len(nss) == 4 and rnd.random() < 0.5:
                touched.append(nss.pop() | {"gone": True})
                what = "namespace object deleted"
            elif len(nss) == 3:
                nss.append({"kind": "Namespace", "metadata": {"name": "n3", "labels": {"team": "a"}}})
                touched.append(nss[-1])
                what = "namespace object created"
        out: Changes = {}
        for raw in touched:
            obj = model.parse({k: v for k, v in raw.items() if k != "gone"})
            out[obj.key] = None if raw.get("gone") else obj
        yield what or "nothing", out


@pytest.mark.parametrize("seed", range(12))
def test_each_change_leaves_the_ruleset_a_fresh_build_gives(seed: int) -> None:
    mirror = Mirror()
    for step, raw in enumerate(random_steps(seed)):
        mirror.follow(raw)
        assert mirror.ruleset.render() == fresh(mirror.objects).render(), f"step {step}"


@pytest.mark.parametrize("seed", range(2))
def test_thousands_of_changes_leave_the_ruleset_a_fresh_build_gives(seed: int) -> None:
    """3,000 random changes to 400 pods and 60 policies, compared with a fresh build every 50 and at the end;
    counts, selections and the chains' policies too."""
    mirror = Mirror()
    seen: set[str] = set()
    for step, (what, changes) in enumerate(churn(seed, 400, 60, 3000)):
        mirror.change(changes)
        seen.add(what)
        if step % 50 == 49:
            got, want = mirror.ruleset, fresh(mirror.objects)
            assert got.render() == want.render(), f"step {step}: {what}"
            assert (got.rules, got.sets, got.chain_policies(), dict(got.selected), got.isolated()) == \
                (want.rules, want.sets, want.chain_policies(), dict(want.selected), want.isolated()), f"step {step}"
    assert len(seen - {"nothing", "created"}) == 10


POLICIES = [pol({"podSelector": {"matchLabels": {"app": "db"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                       {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                        "podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"port": "sql"}]}],
                 "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "dns", "protocol": "UDP"}]}]},
                "db", "n0"),
            pol({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}]}, "any", "n1")]


def pod_obj(name: str, ns: str, ip: str, labels: dict[str, str], node: str = "other") -> dict[str, Any]:
    ports = [{"name": "sql", "containerPort": 5432}, {"name": "dns", "protocol": "UDP", "containerPort": 53}]
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"ports": ports}]}, "status": {"podIP": ip}}


def commands(change: Change) -> list[str]:
    return [line for line in change.commands.splitlines() if line]


def test_a_remote_pod_is_element_changes_of_its_sets_alone() -> None:
    nss = [{"kind": "Namespace", "metadata": {"name": "n0", "labels": {"team": "a"}}}]
    world = nss + POLICIES + [pod_obj("db", "n0", "10.0.0.1", {"app": "db"}, "me")] + \
        [pod_obj(f"w{i}", "n0", f"10.0.1.{i}", {"app": "other"}) for i in range(1, 50)]
    mirror = Mirror()
    mirror.follow(world)
    web = pod_obj("web", "n0", "10.0.2.1", {"app": "web"})
    created = commands(mirror.follow([*world, web]))
    # in the pod selector's set, the namespace selector's, and every pod's dns named-port set (one transaction)
    assert len(created) == 3 and all(c.startswith("add element inet weft_policy ") for c in created), created
    assert sorted(re.findall(r"weft_policy (\S+) \{ (.*) \}", c)[0][1] for c in created) == \
        ["10.0.2.1", "10.0.2.1", "10.0.2.1 . udp . 53"]
    web["metadata"]["labels"] = {"app": "cache"}
    relabelled = commands(mirror.follow([*world, web]))
    assert len(relabelled) == 2 and all(c.startswith("delete element inet weft_policy p") for c in relabelled)
    assert commands(mirror.follow([*world, web])) == []
    deleted = commands(mirror.follow(world))  # it had left the selectors' sets already
    assert deleted == [c.replace("add", "delete", 1) for c in created if " n4_" in c]


def test_a_local_pod_adds_its_own_elements_and_at_most_its_chains() -> None:
    world = [*POLICIES, pod_obj("db", "n0", "10.0.0.1", {"app": "db"}, "me"), pod_obj("x", "n1", "10.0.0.2", {}, "me")]
    mirror = Mirror()
    mirror.follow(world)
    second = pod_obj("db2", "n0", "10.0.0.3", {"app": "db"}, "me")
    added = commands(mirror.follow([*world, second]))
    # the chains of the first db pod serve the second: its map and self elements, its peer sets, its port
    assert not [c for c in added if "chain" in c or c.startswith("table")], added
    where = sorted(c.split(" {")[0].split()[-1] for c in added)
    assert [w[:3] for w in where] == ["egr", "ing", "n4_", "own", "por", "sel"], where
    assert all("10.0.0.3" in c or "weftn0db2" in c for c in added), added
    third = pod_obj("x2", "n1", "10.0.0.4", {"other": "x"}, "me")
    added = commands(mirror.follow([*world, second, third]))
    assert not [c for c in added if c.startswith("table") or "delete chain" in c]
    assert commands(mirror.follow([*world, second])) and mirror.ruleset.render() == fresh(mirror.objects).render()


def test_a_policy_change_redoes_its_own_sets_and_its_pods_chains() -> None:
    world = [*POLICIES, pod_obj("db", "n0", "10.0.0.1", {"app": "db"}, "me"), pod_obj("x", "n1", "10.0.0.2", {}, "me"),
             pod_obj("web", "n0", "10.0.1.1", {"app": "web"})]
    mirror = Mirror()
    mirror.follow(world)
    before = mirror.ruleset.render()
    other_sets = set(re.findall(r"set ([pbn][46]_\w+)", before))
    changed = pol({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.8.0.0/16"}}]}]}, "any", "n1")
    out = mirror.follow([*world[:1], changed, *world[2:]]).commands
    # the old block's set goes, the new one comes, n1's pod gets a new chain; n0's sets and chains stay
    made = set(re.findall(r"set ([pbn][46]_\w+)", out))
    gone = set(re.findall(r"delete set inet weft_policy (\S+)", out))
    assert len(made) == 1 and len(gone) == 1 and gone < other_sets and made.isdisjoint(other_sets)
    n0_chains = {c for c in re.findall(r"jump ([ie]_\w+)", before)} - set(re.findall(r"chain ([ie]_\w+)", out))
    assert n0_chains and "10.0.0.1" not in out
