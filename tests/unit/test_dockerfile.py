"""The Dockerfile and `make image` (tools/images/weft.sh) describe one image: the same Debian release,
the same packages, the bundle and install.sh at the same places, the same entrypoint and command. And
the manifest runs the version the image is tagged with."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BUILD_SCRIPT = ROOT / "tools" / "images" / "weft.sh"
MANIFEST = ROOT / "conf" / "kube-weft.yml"


@dataclass(frozen=True)
class Recipe:
    suite: str
    packages: frozenset[str]
    copies: dict[str, str]  # destination in the image -> source in the checkout
    entrypoint: list[str]
    cmd: list[str]


def dockerfile(text: str) -> Recipe:
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    m = re.fullmatch(r"debian:(\w+)-slim", base.strip())
    assert m, f"FROM {base}: expected debian:<release>-slim"
    packages: set[str] = set()
    for op, arg in instructions:
        if op == "RUN":
            for command in arg.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["apt-get", "install"]:
                    packages.update(w for w in words[2:] if not w.startswith("-"))
    copies = {}
    for op, arg in instructions:
        if op == "COPY":
            src, dst = arg.split()
            copies[dst] = src
    (entrypoint,) = [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    return Recipe(m.group(1), frozenset(packages), copies, entrypoint, cmd)


def build_script(text: str) -> Recipe:
    """The settings weft.sh declares, as `NAME=value` or `NAME=(word...)` lines, `$NAME` expanded."""
    values: dict[str, list[str]] = {}
    for m in re.finditer(r"^([A-Z_]+)=(\(.*\)|\S+)$", text, re.MULTILINE):
        raw = re.sub(r"\$(\w+)", lambda v: " ".join(values[v.group(1)]), m.group(2))
        values[m.group(1)] = shlex.split(raw[1:-1]) if raw.startswith("(") else [raw]

    def one(name: str) -> str:
        (value,) = values[name]
        return value

    # The script copies the bundle it is given: `make image` gives it `make build`'s.
    return Recipe(one("SUITE"), frozenset(values["PACKAGES"]),
                  {one("BUNDLE_DIR"): ".build/dist/weft", one("INSTALL_SCRIPT"): one("INSTALL_SOURCE")},
                  [one("ENTRYPOINT")], [one("CMD")])


def test_the_dockerfile_and_the_image_build_describe_one_image() -> None:
    docker, script = dockerfile(DOCKERFILE.read_text()), build_script(BUILD_SCRIPT.read_text())
    assert script == docker
    assert script.packages >= {"nftables", "iptables", "wireguard-go", "wireguard-tools"}
    assert script.entrypoint == [f"{next(d for d, s in script.copies.items() if s == '.build/dist/weft')}/weftd"]


def test_the_image_build_copies_make_builds_bundle() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^BUNDLE := \$\(DIST\)/weft$", makefile, re.MULTILINE)
    assert re.search(r"^DIST := \$\(BUILD\)/dist$", makefile, re.MULTILINE)
    assert re.search(r"^BUILD := \.build$", makefile, re.MULTILINE)
    assert re.search(r"^\tbash tools/images/weft\.sh \$\(BUNDLE\) \$@$", makefile, re.MULTILINE)


def test_the_manifest_runs_the_image_of_this_version() -> None:
    """weft.sh tags the image with the version the bundle reports, pyproject.toml's; containerd names the
    manifest's `weft:<version>` docker.io/library/weft:<version>, the name the image is imported under."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (ds,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {f"weft:{version}"}


def test_a_difference_is_found() -> None:
    """The parsers read what differs: another package, path or command in either file breaks the match."""
    text = DOCKERFILE.read_text()
    for changed in (text.replace("wireguard-tools", "wireguard-tools tcpdump"),
                    text.replace("COPY packaging/install.sh /opt/weft/install.sh",
                                 "COPY packaging/install.sh /opt/install.sh"),
                    text.replace('CMD ["run"]', 'CMD ["run", "--debug"]'),
                    text.replace("bookworm-slim", "trixie-slim")):
        assert changed != text
        assert dockerfile(changed) != build_script(BUILD_SCRIPT.read_text())
    script = BUILD_SCRIPT.read_text()
    changed = script.replace("PACKAGES=(nftables ", "PACKAGES=(nftables tcpdump ")
    assert changed != script and build_script(changed) != dockerfile(text)
