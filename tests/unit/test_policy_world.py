"""tests/policy_world.py: the seeded cluster the policy scale benchmark and equivalence tests build on."""

from __future__ import annotations

from collections import Counter

from tests.policy_world import PROBE, World
from weftd.policy import model


def test_the_same_seed_gives_the_same_world_and_changes() -> None:
    a, b = World.build(pods=300, policies=80), World.build(pods=300, policies=80)
    assert a.objects() == b.objects()
    assert [c.obj for c in a.changes(200)] == [c.obj for c in b.changes(200)]


def test_policies_do_not_depend_on_the_number_of_pods() -> None:
    assert World.build(pods=100, policies=80).policy_objects() == World.build(pods=2000, policies=80).policy_objects()


def test_every_object_is_valid_and_every_kind_is_there() -> None:
    w = World.build(pods=1000, policies=200, local_subnet="10.99.0.0/24")
    parsed = [model.parse(o) for o in w.objects()]
    assert Counter(type(o).__name__ for o in parsed) == {"Namespace": 50, "Pod": 1000, "NetworkPolicy": 200}
    text = repr(w.policy_objects())
    for feature in ("matchExpressions", "'In'", "'NotIn'", "'Exists'", "'DoesNotExist'", "namespaceSelector",
                    "endPort", "'except'", "'egress'", "'http'", "'SCTP'", "'UDP'"):
        assert feature in text, feature
    local = w.local_pods()
    assert len(local) == 10 and all(p.ip and p.ip.startswith("10.99.0.") for p in local)
    assert local[0].namespace == "ns0" and ("ns0", PROBE) in w.policies


def test_random_changes_keep_the_world_valid() -> None:
    w = World.build(pods=500, policies=100, local_subnet="10.99.0.0/24")
    kinds = Counter((c.kind, c.what) for c in w.changes(1000))
    assert {("Pod", "create"), ("Pod", "delete"), ("Pod", "relabel"), ("Namespace", "relabel"),
            ("NetworkPolicy", "delete"), ("NetworkPolicy", "update")} <= set(kinds)
    for o in w.objects():
        model.parse(o)
    ips = [p.ip for p in w.pods.values() if p.ip]
    assert len(ips) == len(set(ips))
    assert ("ns0", PROBE) in w.policies


def test_the_probe_label_comes_and_goes() -> None:
    w = World.build(pods=200, policies=20)
    pod = w.remote_pods()[0]
    on = w.set_probe(pod, True)
    assert on.obj is not None and on.obj["metadata"]["labels"][PROBE] == "on"
    off = w.set_probe(pod, False)
    assert off.obj is not None and PROBE not in off.obj["metadata"]["labels"]
