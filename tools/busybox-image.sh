#!/bin/bash
# Builds the OCI image archive the containerd tests run, for machines with no image registry: one layer
# holding Debian's busybox-static with every applet linked into /bin (sh, ip, ping, nc, wget, httpd, ...),
# default command `sleep 3600` unless one is given, PATH=/bin. umoci (Debian's package) writes the OCI
# layout; the archive is that layout as a tar, which `ctr images import` reads, naming the image after
# the layout's tag. The cluster's docker.io/library/busybox:1.29 runs `sh`, as upstream's does.
# Usage: busybox-image.sh ARCHIVE [NAME [COMMAND...]]   (NAME defaults to local/busybox:1)
set -euo pipefail
out=$1
name=${2:-local/busybox:1}
if [ $# -gt 2 ]; then cmdline=("${@:3}"); else cmdline=(/bin/sleep 3600); fi
# busybox-static's /bin/busybox: the image has no libc, and Debian's plain busybox package (which also
# ships /bin/busybox) links to it.
busybox=/bin/busybox
dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'ok installed' && command -v umoci >/dev/null ||
  { echo "busybox-image.sh: needs the Debian packages busybox-static and umoci (make deps installs them)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
layout=$work/layout

mkdir -p "$root"/{bin,etc,root,tmp,proc,sys,dev}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

umoci init --layout "$layout"
umoci new --image "$layout:$name"
umoci insert --image "$layout:$name" "$root" /
cmd=()
for arg in "${cmdline[@]}"; do cmd+=(--config.cmd "$arg"); done
umoci config --image "$layout:$name" --os linux --config.env PATH=/bin "${cmd[@]}"
umoci gc --layout "$layout"

tar --numeric-owner -C "$layout" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
