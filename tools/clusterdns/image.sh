#!/bin/bash
# Builds the image of the offline test cluster's DNS (server.py beside this script: test-bed infrastructure, not
# part of Weft) as an OCI archive that `ctr -n k8s.io images import` reads, naming the image after the layout's
# tag: a Debian bookworm minbase rootfs with python3 and python3-dnslib made by mmdebstrap, and server.py in a
# layer of its own, wrapped by umoci (both Debian's packages; `make deps` installs them).
# Cached by its inputs: the rootfs by suite, packages and mirror (the slow step, about a minute), the archive by
# the rootfs, this script, server.py and the name. A rerun with nothing changed does nothing.
# Usage: image.sh ARCHIVE [NAME]   (NAME defaults to localhost/weft-clusterdns:1; DEBIAN_MIRROR overrides the mirror)
set -euo pipefail
out=$1
name=${2:-localhost/weft-clusterdns:1}
here=$(cd "$(dirname "$0")" && pwd)
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-dnslib
server=/usr/local/lib/clusterdns/server.py

for tool in mmdebstrap umoci; do
  command -v $tool >/dev/null || { echo "image.sh: needs the Debian package $tool (make deps installs it)" >&2; exit 1; }
done
# The rootfs is kept out of the archive's directory, whose *.tar files are all images (the cluster imports them).
cache=$(mkdir -p "$(dirname "$out")/.cache" && cd "$(dirname "$out")/.cache" && pwd)
rootfs_key=$(printf '%s\n' "$suite" "$packages" "$mirror" | sha256sum | cut -c1-16)
rootfs=$cache/clusterdns-rootfs-$rootfs_key.tar
key=$(cat "$0" "$here/server.py" <(printf '%s\n' "$name" "$rootfs_key") | sha256sum | cut -c1-16)
if [ -f "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$key" ]; then
  echo "image.sh: $out is up to date ($name)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -f "$rootfs" ]; then
  echo "image.sh: building the $suite rootfs with $packages (mmdebstrap, about a minute)"
  # mmdebstrap mounts /proc, /sys and /dev into the chroot it builds: in a mount namespace of its own, so the
  # machine's mount table never sees them.
  unshare --mount --propagation private \
    mmdebstrap --quiet --mode=root --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      "$suite" "$work/rootfs.tar" "$mirror"
  rm -f "$cache"/clusterdns-rootfs-*.tar
  mv "$work/rootfs.tar" "$rootfs"
fi

echo "image.sh: writing $out ($name)"
layout=$work/layout
mkdir -p "$work/add"
install -m 0644 "$here/server.py" "$work/add/server.py"
umoci init --layout "$layout"
umoci new --image "$layout:$name"
umoci raw add-layer --image "$layout:$name" "$rootfs"
umoci insert --image "$layout:$name" "$work/add/server.py" "$server"
umoci config --image "$layout:$name" --os linux --config.workingdir / \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.entrypoint /usr/bin/python3 --config.entrypoint -u --config.entrypoint "$server" \
  --config.label org.opencontainers.image.title=weft-clusterdns \
  --config.label 'org.opencontainers.image.description=DNS of the offline test cluster (test-bed infrastructure, not part of Weft)'
umoci gc --layout "$layout"
tar --numeric-owner -C "$layout" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "$key" > "$out.inputs"
echo "image.sh: $out: $(du -h "$out" | cut -f1); import with: ctr -n k8s.io images import $out"
