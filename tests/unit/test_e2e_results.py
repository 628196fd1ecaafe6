"""`make e2e`'s pure parts: the selection, ginkgo's JUnit files, the results table, the google.com hosts file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.k8s import e2e

NP = "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client"
DENY = f"{NP} should support a 'default-deny-ingress' policy [Feature:NetworkPolicy]"
PORTS = f"{NP} should enforce policy based on Ports [Feature:NetworkPolicy]"
SCTP = f"{NP} should not allow access by TCP when a policy specifies only SCTP [Feature:NetworkPolicy] [Feature:SCTP]"
BASIC = "[sig-network] Services should serve a basic endpoint from pods  [Conformance]"
STORAGE = "[sig-storage] PersistentVolumes should do something [Conformance]"


def junit(path: Path, *cases: str) -> Path:
    path.write_text(f'<?xml version="1.0"?>\n<testsuite name="Kubernetes e2e suite" tests="{len(cases)}">'
                    + "".join(cases) + "</testsuite>\n")
    return path


def case(name: str, body: str = "", seconds: float = 1.0) -> str:
    name = name.replace("&", "&amp;").replace("'", "&apos;").replace('"', "&quot;")
    return f'<testcase name="{name}" classname="Kubernetes e2e suite" time="{seconds}">{body}</testcase>'


def test_default_focus_picks_the_policy_suite_and_network_conformance_only() -> None:
    focus = re.compile(e2e.DEFAULT_FOCUS)
    picked = [n for n in (DENY, PORTS, SCTP, BASIC, STORAGE) if focus.search(n)]
    assert picked == [DENY, PORTS, SCTP, BASIC]
    assert not focus.search("[sig-network] NetworkPolicy API should support creating NetworkPolicy API operations")
    assert not focus.search("[sig-network] NetworkPolicy [Feature:SCTPConnectivity][LinuxOnly][Disruptive] "
                            "NetworkPolicy between server and client using SCTP should support a 'default-deny' policy")
    assert e2e.skip_regex((e2e.Skip("a", "x"), e2e.Skip("b|c", "y"))) == "(?:a)|(?:b|c)"


def test_env_replaces_focus_and_skip() -> None:
    default = e2e.Selection.from_env({})
    assert default == e2e.Selection(e2e.DEFAULT_FOCUS, e2e.skip_regex())
    assert default.args() == [f"--ginkgo.focus={e2e.DEFAULT_FOCUS}"]  # no skips today
    mine = e2e.Selection.from_env({"E2E_FOCUS": "Services", "E2E_SKIP": ""})
    assert mine.args() == ["--ginkgo.focus=Services"]
    assert e2e.Selection.from_env({"E2E_SKIP": "x"}).args() == [f"--ginkgo.focus={e2e.DEFAULT_FOCUS}",
                                                               "--ginkgo.skip=x"]


def test_parallel_workers_reports_merge_with_a_run_winning_over_skipped(tmp_path: Path) -> None:
    failure = '<failure type="Failure" message="test/e2e/x.go:1&#xA;Timed out waiting&#xA;test/e2e/x.go:2"></failure>'
    one = junit(tmp_path / "junit_01.xml", case(DENY, seconds=40.5), case(PORTS, "<skipped></skipped>"),
                case(STORAGE, "<skipped></skipped>"))
    two = junit(tmp_path / "junit_02.xml", case(DENY, "<skipped></skipped>"), case(PORTS, failure, 90),
                case("BeforeSuite", failure, 0))
    run = e2e.parse_junit([one, two])
    assert run[DENY].outcome == e2e.PASSED and run[DENY].seconds == 40.5
    assert run[PORTS].outcome == e2e.FAILED
    assert e2e.failure_line(run[PORTS].message) == "Timed out waiting"
    rows = e2e.outcomes([DENY, PORTS, BASIC], run)
    assert [(r.name, r.outcome) for r in rows] == [
        (DENY, e2e.PASSED), (PORTS, e2e.FAILED), (BASIC, e2e.NOT_RUN), ("BeforeSuite", e2e.FAILED)]
    assert e2e.counts(rows) == {e2e.PASSED: 1, e2e.FAILED: 2, e2e.SKIPPED: 0, e2e.NOT_RUN: 1}
    assert e2e.report_files(tmp_path) == [one, two]


def test_dry_run_selection_is_what_ginkgo_reports_as_passed(tmp_path: Path) -> None:
    dry = junit(tmp_path / "junit_01.xml", case(DENY, seconds=0), case(STORAGE, "<skipped></skipped>"),
                case(BASIC, seconds=0))
    assert e2e.selected_names(e2e.parse_junit([dry])) == sorted([DENY, BASIC])


def test_table_has_a_row_per_test_and_escapes_pipes() -> None:
    rows = [e2e.Result(DENY, e2e.PASSED, 40.4), e2e.Result("a | b", e2e.SKIPPED, 0.0)]
    assert e2e.table(rows).splitlines() == [
        "| result | seconds | test |", "|---|---:|---|", f"| passed | 40 | {DENY} |", "| skipped | 0 | a &#124; b |"]


def test_hosts_file_maps_google_to_the_shim_and_keeps_the_rest() -> None:
    base = "127.0.0.1\tlocalhost\n# a comment naming google.com\n1.2.3.4 www.google.com other\n::1 localhost\n"
    out = e2e.hosts_file(base, "10.244.1.5")
    assert out.splitlines() == ["127.0.0.1\tlocalhost", "# a comment naming google.com", "::1 localhost",
                                "10.244.1.5\tgoogle.com www.google.com"]


def test_readme_lists_every_skip_with_its_reason() -> None:
    readme = (e2e.ROOT / "README.md").read_text()
    for skip in e2e.SKIPS:
        assert f"`{skip.pattern}`" in readme and skip.reason in readme, skip


def test_kubeconfig_for_inside_the_node_names_the_apiservers_own_address() -> None:
    argv = ("/x/kube-apiserver", "--bind-address", "0.0.0.0", "--secure-port", "6443", "--advertise-address",
            "172.18.0.2", "--client-ca-file=/c/.build/cluster/pki/ca.crt")
    assert e2e.flag(argv, "--client-ca-file") == "/c/.build/cluster/pki/ca.crt"
    assert e2e.flag(argv, "--etcd-servers") is None
    assert e2e.Apiserver(7, argv).url == "https://172.18.0.2:6443"
    assert e2e.Apiserver(7, argv).netns == "/proc/7/ns/net"
    machine = ("apiVersion: v1\nkind: Config\ncurrent-context: weft\nclusters:\n- name: weft\n  cluster:\n"
               "    server: https://127.0.0.1:40001\n    certificate-authority: /c/ca.crt\n")
    inside = yaml.safe_load(e2e.with_server(machine, "https://172.18.0.2:6443"))
    assert inside["clusters"] == [{"name": "weft", "cluster": {"server": "https://172.18.0.2:6443",
                                                               "certificate-authority": "/c/ca.crt"}}]
