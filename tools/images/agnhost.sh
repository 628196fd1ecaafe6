#!/bin/bash
# The e2e tests' agnhost image, as upstream's test/images/agnhost/Dockerfile makes it, on Debian's
# minbase instead of Alpine: the tools the tests run inside it (sh and bash, nc, curl, wget, dig and
# nslookup, ip and ss, ps, iperf 2), /agnhost (built from the same tree by tools/kube/build.sh),
# /agnhost-2 linked to it, /uploads, the porter's certificate and key, ENTRYPOINT /agnhost, CMD pause.
# Upstream's image also holds CoreDNS, downloaded from GitHub, which Debian does not package: the
# tests that start /coredns in agnhost cannot run with this image.
#   Usage: agnhost.sh AGNHOST KUBE_SRC NAME OUT  (NAME: k8s.gcr.io/e2e-test-images/agnhost:2.21)
set -euo pipefail
IMAGE_TAG=agnhost
source "$(dirname "$0")/lib.sh"
usage="usage: agnhost.sh AGNHOST KUBE_SRC NAME OUT"
agnhost=$(realpath "${1:?$usage}")
src=$(realpath "${2:?$usage}")
name=${3:?$usage}
out=$(realpath -m "${4:?$usage}")
cache=$(dirname "$out")
mkdir -p "$cache"
if readelf -l "$agnhost" | grep -q INTERP; then
  echo "agnhost.sh: $agnhost is linked dynamically: the image needs it static (CGO_ENABLED=0)" >&2; exit 1
fi

# Alpine's bind-tools is Debian's bind9-dnsutils; iperf is iperf 2 in both.
rootfs=$(debian_rootfs "$cache" bookworm bash coreutils curl wget netcat-openbsd iproute2 procps \
  ca-certificates bind9-dnsutils iperf)

work=$(mktemp -d "$cache/.agnhost.XXXXXX")
trap 'rm -rf "$work"' EXIT
layer=$work/layer
mkdir -m 0755 "$layer" "$layer/uploads" "$layer/usr" "$layer/usr/local" "$layer/usr/local/bin"
install -m 0755 "$agnhost" "$layer/agnhost"
ln -s agnhost "$layer/agnhost-2"
install -m 0644 "$src/test/images/agnhost/porter/localhost.crt" "$src/test/images/agnhost/porter/localhost.key" "$layer/"
ln -s /usr/bin/iperf "$layer/usr/local/bin/iperf"
dir_layer "$layer" "$work/agnhost.tar"

ports=()
for p in 80 8080 8081 9376; do ports+=(--config.exposedports "$p/tcp"); done
oci_archive "$out" "$name" --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  "${ports[@]}" --config.entrypoint /agnhost --config.cmd pause -- "$rootfs" "$work/agnhost.tar"
