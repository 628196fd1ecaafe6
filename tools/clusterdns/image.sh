#!/bin/bash
# The image of the offline test cluster's DNS (server.py beside this script: test-bed infrastructure, not
# part of Weft), as an OCI archive `ctr -n k8s.io images import` reads: Debian's minbase with python3 and
# python3-dnslib (cached by tools/images/lib.sh), and server.py in a layer of its own.
# Usage: image.sh OUT [NAME]   (NAME defaults to localhost/weft-clusterdns:1)
set -euo pipefail
IMAGE_TAG=dns
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../images/lib.sh"
out=$(realpath -m "${1:?usage: image.sh OUT [NAME]}")
name=${2:-localhost/weft-clusterdns:1}
server=/usr/local/lib/clusterdns/server.py
cache=$(dirname "$out")
mkdir -p "$cache"

rootfs=$(debian_rootfs "$cache" bookworm python3 python3-dnslib)
work=$(mktemp -d "$cache/.clusterdns.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/layer$(dirname "$server")"
chmod -R 0755 "$work/layer"
install -m 0644 "$here/server.py" "$work/layer$server"
dir_layer "$work/layer" "$work/server.tar"
oci_archive "$out" "$name" --os linux --config.workingdir / \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.entrypoint /usr/bin/python3 --config.entrypoint -u --config.entrypoint "$server" \
  --config.label org.opencontainers.image.title=weft-clusterdns \
  --config.label 'org.opencontainers.image.description=DNS of the offline test cluster (test-bed infrastructure, not part of Weft)' \
  -- "$rootfs" "$work/server.tar"
