"""weftd's options as data (weftd.option, weftd.options): the parsers, flag over variable over default, one-line errors,
the operator reference in README.md, and the version. Pure logic; tests/test_cli.py runs weftd itself."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from weftd import option, options
from weftd.config import ConfigError, NetworkConfig
from weftd.metrics import Metrics
from weftd.option import Option
from weftd.options import OptionError
from weftlib.version import version

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("raw", ["true", "TRUE", "yes", "Yes", "1", "on"])
def test_boolean_true(raw: str) -> None:
    assert option.boolean(raw) is True


@pytest.mark.parametrize("raw", ["false", "False", "NO", "0", "off"])
def test_boolean_false(raw: str) -> None:
    assert option.boolean(raw) is False


@pytest.mark.parametrize("raw", ["", "maybe", "2", "t", "disabled", "nope"])
def test_boolean_refuses_anything_else(raw: str) -> None:
    with pytest.raises(ValueError, match="true or false"):
        option.boolean(raw)


@pytest.mark.parametrize(("parse", "good", "bad"), [
    (option.positive_float, {"10": 10.0, "0.5": 0.5, "1e3": 1000.0}, ["ten", "", "0", "-1", "nan", "inf"]),
    (option.integer(0, 65535), {"0": 0, "65535": 65535}, ["x", "1.5", "-1", "65536", ""]),
    (option.address(4), {"10.0.0.1": "10.0.0.1"}, ["notanip", "fd00::1", "10.0.0.0/24", "10.0.1", ""]),
    (option.address(6), {"fd00::1": "fd00::1", "FD00::1": "fd00::1"}, ["10.0.0.1", "notanip", "fd00::/64"]),
    (option.listen_address, {"127.0.0.1:9808": ("127.0.0.1", 9808), ":80": ("", 80), "[::1]:9808": ("::1", 9808)},
     ["127.0.0.1:abc", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "localhost:80", "[10.0.0.1]:80", ""]),
    (option.ifname, {"eth0": "eth0", "a" * 15: "a" * 15}, ["", "a" * 16, "a/b", "a b", "x:1", "."]),
    (option.url, {"http://127.0.0.1:2379": "http://127.0.0.1:2379", "10.0.0.1:2379": "10.0.0.1:2379",
                   "https://etcd": "https://etcd"}, ["", "ftp://etcd", "http://", "http://etcd:port", "http://e:99999"]),
    (option.key_prefix, {"/weft/network": "/weft/network"}, ["", "weft", "/weft/"]),
    (option.socket_path, {"": "", "/run/weft/cni.sock": "/run/weft/cni.sock"}, ["cni.sock", "/" + "a" * 107]),
    (option.file_name, {"10-weft.conflist": "10-weft.conflist"}, ["", "weft.conf", "a/b.conflist", ".conflist"]),
    (option.name, {"node-1": "node-1", "Node.Example": "Node.Example"}, ["", "a b", "a/b", "x" * 254, "a\tb"]),
    (option.path, {"/x": "/x", "rel": "rel"}, [""]),
])
def test_parsers(parse: Any, good: dict[str, Any], bad: list[str]) -> None:
    for raw, value in good.items():
        assert parse(raw) == value, raw
    for raw in bad:
        with pytest.raises(ValueError):
            parse(raw)


def test_existence_parsers(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert option.existing_file(str(f)) == str(f)
    assert option.existing_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        option.existing_dir(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="is not a directory"):
        option.existing_dir(str(f))
    with pytest.raises(ValueError, match="is not a file"):
        option.existing_file(str(tmp_path))


def _resolve(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    return options.parse(argv, env, "test")[0]


def test_flag_over_variable_over_default() -> None:
    assert _resolve(["run"], {}).resync == 10.0
    assert _resolve(["run"], {"WEFTD_RESYNC": "3"}).resync == 3.0
    assert _resolve(["run", "--resync", "5"], {"WEFTD_RESYNC": "3"}).resync == 5.0
    # A flag given wins over a bad variable: the variable is not read.
    assert _resolve(["run", "--resync", "5"], {"WEFTD_RESYNC": "ten"}).resync == 5.0


def test_booleans_from_the_environment_and_the_command_line() -> None:
    assert _resolve(["run"], {"WEFTD_NO_PORTMAP": "false", "WEFTD_POLICY_KUBE": "false"}).no_portmap is False
    assert _resolve(["run"], {"WEFTD_POLICY_KUBE": "false"}).policy_kube is False
    assert _resolve(["run"], {"WEFTD_POLICY_KUBE": "True"}).policy_kube is True
    assert _resolve(["run", "--policy-kube"], {}).policy_kube is True
    assert _resolve(["run", "--policy-kube=false"], {"WEFTD_POLICY_KUBE": "true"}).policy_kube is False
    assert _resolve(["run"], {}).no_portmap is False


def test_bad_variable_is_named() -> None:
    with pytest.raises(OptionError) as e:
        options.parse(["run"], {"WEFTD_RESYNC": "ten"}, "test")
    assert str(e.value) == "weftd run: WEFTD_RESYNC='ten' is not a number"
    with pytest.raises(OptionError, match="WEFTD_NO_PORTMAP='maybe' must be true or false"):
        options.parse(["run"], {"WEFTD_NO_PORTMAP": "maybe"}, "test")


def test_bad_flag_is_named_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in ((["run", "--log-level", "verbose"], "--log-level 'verbose' must be one of debug, info"),
                        (["run", "--listen", "127.0.0.1:abc"], "--listen '127.0.0.1:abc' must be HOST:PORT"),
                        (["run", "--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises((OptionError, SystemExit)) as e:
            options.parse(argv, {}, "test")
        if isinstance(e.value, SystemExit):
            assert e.value.code == 2
            message = capsys.readouterr().err
            assert len(message.splitlines()) == 1, message
        else:
            message = str(e.value)
        assert words in message, message


def test_help_works_with_a_bad_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        options.parse(["run", "--help"], {"WEFTD_RESYNC": "ten", "WEFTD_POLICY_KUBE": "maybe"}, "test")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--resync SECONDS" in out and "(default: 10; env WEFTD_RESYNC)" in out.replace("\n", " ").replace(
        "                         ", "")


def test_help_shows_every_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    for command in options.COMMANDS:
        with pytest.raises(SystemExit):
            options.parse([command, "--help"], {}, "test")
        out = " ".join(capsys.readouterr().out.split())
        for opt in options.for_command(options.declared(), command):
            variables = ", ".join(opt.variables)
            assert f"default: {' '.join(opt.describe_default().split())}; env {variables})" in out, opt.flag


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        options.parse(["--version"], {}, "1.2.3")
    assert e.value.code == 0 and capsys.readouterr().out == "weftd 1.2.3\n"
    assert options.parse(["version"], {}, "1.2.3")[0].command == "version"


def test_empty_means_unset_for_options_without_a_default() -> None:
    args = _resolve(["run"], {"WEFTD_IFACE": "", "WEFTD_PUBLIC_IP": "", "WEFTD_POLICY_NFLOG_GROUP": ""})
    assert args.iface is None and args.public_ip is None and args.policy_nflog_group is None
    # An option with a default gets its parser's verdict on ''.
    with pytest.raises(OptionError, match="WEFTD_SUBNET_FILE='' is not a path"):
        options.parse(["run"], {"WEFTD_SUBNET_FILE": ""}, "test")
    # '' is the plugin-runs-itself setting of --cni-socket.
    assert _resolve(["run"], {"WEFTD_CNI_SOCKET": ""}).cni_socket == ""


def test_node_name_from_node_name_then_the_host() -> None:
    import socket

    assert _resolve(["run"], {}).node_name == socket.gethostname()
    assert _resolve(["run"], {"NODE_NAME": "k8s-node"}).node_name == "k8s-node"
    assert _resolve(["run"], {"NODE_NAME": "k8s-node", "WEFTD_NODE_NAME": "mine"}).node_name == "mine"
    with pytest.raises(OptionError, match="NODE_NAME='a b'"):
        options.parse(["run"], {"NODE_NAME": "a b"}, "test")


def test_origins() -> None:
    _, origins = options.parse(["run", "--iface", "eth1"], {"WEFTD_NET_CONF": "/x"}, "test")
    assert (origins["iface"], origins["net_conf"], origins["listen"]) == ("--iface", "WEFTD_NET_CONF", "default")


def test_a_command_reads_only_its_own_variables() -> None:
    # remove-node has no --listen: a bad WEFTD_LISTEN (meant for run) does not stop it.
    args, _ = options.parse(["remove-node"], {"WEFTD_LISTEN": "nope"}, "test")
    assert not hasattr(args, "listen")
    assert options.unknown_variables(options.declared(), {"WEFTD_LISTEN": "x", "WEFTD_POLICYKUBE": "1",
                                                          "NODE_NAME": "n"}) == ["WEFTD_POLICYKUBE"]


def test_declarations() -> None:
    declared = options.declared()
    flags = [o.flag for o in declared]
    assert len(flags) == len(set(flags))
    variables = [v for o in declared for v in o.variables]
    assert len(variables) == len(set(variables))
    for opt in declared:
        assert opt.flag.startswith("--") and opt.help and opt.commands, opt
        assert set(opt.commands) <= set(options.COMMANDS), opt
        if opt.default is not None:
            opt.convert(opt.default)  # every default is a value its own parser takes
        if opt.fallback is not None:
            assert opt.shown_default, f"{opt.flag}: --help must say what it falls back to"
    # Each store's and backend's own options are declared with it.
    assert {"--store-path", "--etcd-endpoint", "--kubeconfig", "--wireguard-device"} <= set(flags)


def test_no_flag_is_declared_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    from weftd.subnet.file import FileStore

    monkeypatch.setattr(FileStore, "options", (*FileStore.options, Option("--listen", "x", option.ALL)))
    with pytest.raises(RuntimeError, match="--listen is declared twice"):
        options.declared()


@pytest.mark.parametrize("manifest", ["kube-weft.yml", "kube-weft-uninstall.yml"])
def test_the_manifests_set_only_declared_variables_to_values_they_take(manifest: str) -> None:
    """Each container that runs weftd: every WEFTD_ variable it sets is an option's, and those of the
    command it runs parse (a variable of another command is ignored by this one: uninstall runs with
    weftd's whole environment)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "conf" / manifest).read_text()) if d]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    runs = [c for c in spec.get("initContainers", []) + spec["containers"] if c["command"][0].endswith("/weftd")]
    assert runs
    declared = options.declared()
    for container in runs:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert not options.unknown_variables(declared, env)
        by_var = {v: o for o in options.for_command(declared, container["command"][1]) for v in o.variables}
        for var, value in env.items():
            if var in by_var and value is not None and not by_var[var].parse.__name__.startswith("existing"):
                by_var[var].convert(value)
        if container["command"][1] == "run":
            assert by_var["WEFTD_POLICY_KUBE"].convert(env["WEFTD_POLICY_KUBE"]) is True


def test_readme_carries_the_generated_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert options.block_of(readme) == options.markdown(options.declared()), \
        "README.md's weftd options differ from the declarations: run `make docs`"
    assert options.replace_block(readme, options.markdown(options.declared())) == readme


def test_markdown_has_a_row_per_option_with_its_commands() -> None:
    rows = options.markdown(options.declared()).splitlines()[2:]
    assert len(rows) == len(options.declared())
    for row, opt in zip(rows, options.declared(), strict=True):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[:2] == [f"`{opt.flag}`", ", ".join(f"`{v}`" for v in opt.variables)], row
        assert cells[4] == ("all" if len(opt.commands) == 3 else ", ".join(opt.commands)), row
        assert opt.default is None or opt.default in cells[2], row


def test_version_is_pyprojects_and_in_the_metrics() -> None:
    assert version() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f'weft_build_info{{version="{version()}"}} 1.0' in generate_latest(Metrics().registry).decode()


@pytest.mark.parametrize(("conf", "words"), [
    ({"Network": "10.244.0.0"}, "Network '10.244.0.0' has no prefix length: write it as a CIDR such as"),
    ({"Network": 5}, "must be a CIDR string"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::"}, "IPv6Network 'fd00::' has no prefix length"),
    ({"Network": "10.244.0.0/16", "SubnetMin": "10.244.3.0/16"}, "has prefix length /16, but SubnetLen is 24"),
    ({"Network": "10.244.0.0/16", "SubnetMax": 7}, "SubnetMax 7 must be an address string"),
])
def test_network_config_messages(conf: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        NetworkConfig.parse(conf)
    # SubnetMin with the prefix it must have anyway stays accepted.
    assert NetworkConfig.parse({"Network": "10.244.0.0/16", "SubnetMin": "10.244.3.0/24"}).ipv4 is not None


def test_network_config_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "10.244.0.0"}')
    with pytest.raises(ConfigError, match=f"network config {path}: Network '10.244.0.0' has no prefix length"):
        NetworkConfig.load(path)
