#!/bin/bash
# Weft's image, the one the Dockerfile describes, without docker: Debian's minbase with the packages
# weftd runs on a node, the frozen bundle from `make build` and packaging/install.sh (which the
# DaemonSet's init container runs). Named docker.io/library/weft:VERSION, VERSION being what the
# bundle's weftd reports (pyproject.toml's), the name containerd gives the manifest's `weft:VERSION`.
# The root filesystem is cached by package list (tools/images/lib.sh); the bundle's layer is made anew.
#   Usage: weft.sh BUNDLE OUT
# tests/unit/test_image.py reads the settings below and the Dockerfile, and fails when they differ.
set -euo pipefail
IMAGE_TAG=weft
source "$(dirname "$0")/lib.sh"

SUITE=bookworm
# nftables and iptables for weftd's NAT rules and the reference plugins (libnftables, which weftd loads,
# comes with nftables), wireguard-go for the wireguard backend on kernels without the module, and
# wireguard-tools for `wg` (weftd derives public keys with it; operators run `wg show`).
PACKAGES=(nftables iptables wireguard-go wireguard-tools)
BUNDLE_DIR=/opt/weft/bundle
INSTALL_SCRIPT=/opt/weft/install.sh
ENTRYPOINT=$BUNDLE_DIR/weftd
CMD=run
INSTALL_SOURCE=packaging/install.sh
# debian:bookworm-slim's
ENV_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

bundle=$(realpath "${1:?usage: weft.sh BUNDLE OUT}")
out=$(realpath -m "${2:?usage: weft.sh BUNDLE OUT}")
install_sh=$(realpath "$(dirname "$0")/../../$INSTALL_SOURCE")
[ -x "$bundle/weftd" ] || { echo "weft.sh: no weftd in $bundle: run make build" >&2; exit 1; }
version=$("$bundle/weftd" --version | awk '$1 == "weftd" {print $2}')
case $version in ''|unknown) echo "weft.sh: $bundle/weftd reports no version" >&2; exit 1 ;; esac
name=docker.io/library/weft:$version
cache=$(dirname "$out")
mkdir -p "$cache"

rootfs=$(debian_rootfs "$cache" "$SUITE" "${PACKAGES[@]}")

# Every shared library the bundle's programs and extensions load is in the bundle or in the root
# filesystem (PyInstaller bundles all but the C library's own).
have=$( { find "$bundle" -name '*.so*' -printf '%f\n'
          tar -tf "$rootfs" | sed -n -E 's#^\./(usr/)?lib(64)?/([^/]+/)?([^/]+\.so[^/]*)$#\4#p'; } | sort -u)
missing=$(find "$bundle" -type f ! -name '*.py*' -print0 | xargs -0 sh -c 'readelf -d "$@" 2>/dev/null || true' sh | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort -u |
  comm -23 - <(echo "$have"))
[ -z "$missing" ] || { echo "weft.sh: the bundle needs libraries the image lacks: $missing" >&2; exit 1; }

work=$(mktemp -d "$cache/.weft.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "layer: $bundle as $BUNDLE_DIR, $INSTALL_SOURCE as $INSTALL_SCRIPT"
mkdir -p "$work/layer$(dirname "$BUNDLE_DIR")" "$work/layer$(dirname "$INSTALL_SCRIPT")"
chmod -R 0755 "$work/layer"
cp -a "$bundle" "$work/layer$BUNDLE_DIR"
cp -p "$install_sh" "$work/layer$INSTALL_SCRIPT"
dir_layer "$work/layer" "$work/weft.tar"

oci_archive "$out" "$name" --config.env "PATH=$ENV_PATH" --config.entrypoint "$ENTRYPOINT" --config.cmd "$CMD" \
  -- "$rootfs" "$work/weft.tar"
