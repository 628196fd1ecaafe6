#!/bin/bash
# The DNS e2e tests' second querier image, as upstream's test/images/jessie-dnsutils/Dockerfile makes it:
# Debian with dnsutils (dig; getent from libc, seq and sh from the base), on bookworm instead of jessie.
# Upstream's image also holds CoreDNS, downloaded from GitHub, which Debian does not package; the
# sig-network DNS Conformance tests run only dig and getent in it.
#   Usage: jessie-dnsutils.sh NAME OUT   (NAME: gcr.io/kubernetes-e2e-test-images/jessie-dnsutils:1.0)
set -euo pipefail
IMAGE_TAG=dnsutils
source "$(dirname "$0")/lib.sh"
name=${1:?usage: jessie-dnsutils.sh NAME OUT}
out=$(realpath -m "${2:?usage: jessie-dnsutils.sh NAME OUT}")
mkdir -p "$(dirname "$out")"
rootfs=$(debian_rootfs "$(dirname "$out")" bookworm bash coreutils bind9-dnsutils)
oci_archive "$out" "$name" --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd /bin/sh -- "$rootfs"
