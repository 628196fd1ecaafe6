#!/bin/bash
# Runs tests/unit as an unprivileged user (nobody), from a world-readable copy of the sources and of
# the venv's packages: proof that the pure unit tests need neither root nor the namespace lab.
# Usage: tests/unit/unprivileged.sh VENV_PYTHON [pytest args]
set -euo pipefail
py=${1:?usage: unprivileged.sh VENV_PYTHON [pytest args]}; shift
cd "$(dirname "$0")/../.."
as_nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
purelib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The venv's base interpreter, unless nobody cannot run it (a pyenv under /root): then Debian's.
interp=$("$py" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
"${as_nobody[@]}" test -x "$interp" 2>/dev/null || interp=/usr/bin/python$ver
tmp=$(mktemp -d /tmp/weft-unit.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/site"
cp -a weftlib cni_plugin ipam weftd tests conf tools Dockerfile Makefile pyproject.toml README.md "$tmp/src/"
cp -a "$purelib/." "$tmp/site/"
chmod -R a+rX "$tmp"
cd "$tmp/src"
"${as_nobody[@]}" env -i PATH=/usr/bin:/bin HOME="$tmp" PYTHONDONTWRITEBYTECODE=1 "$interp" -c \
  'import site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, "."); import pytest
sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[2:], "tests/unit"]))' "$tmp/site" "$@"
