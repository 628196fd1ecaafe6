# Helpers the image scripts source: a Debian root filesystem from packages (cached), a layer from a
# directory, and an OCI archive from layers, which `ctr images import` reads, naming the image after
# the layout's tag. No registry and no docker: mmdebstrap builds the root filesystem as a tar, and
# umoci (both Debian packages) writes the OCI layout around the layers as they are.

say() { printf '[image %-8s %4ds] %s\n' "${IMAGE_TAG:-}" "$SECONDS" "$*" >&2; }

# What a Debian root filesystem leaves out: documentation, manuals and translations (the copyright
# files stay), apt's lists and cache (mmdebstrap's own clean-up), logs, and the device nodes, which
# the runtime makes in every container's /dev.
ROOTFS_DPKG_OPTS=(
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
)

# debian_rootfs CACHE SUITE PACKAGE...: prints the path of a tar of SUITE's minbase variant with the
# packages and what they depend on (no recommends), built once per suite, package list and recipe
# under CACHE/rootfs/. The Debian mirrors are the machine's own apt sources.
debian_rootfs() {
  local cache=$1 suite=$2; shift 2
  local packages key out
  packages=$(printf '%s\n' "$@" | sort -u | paste -sd, -)
  key=$( { echo "$suite $packages"; printf '%s\n' "${ROOTFS_DPKG_OPTS[@]}"; declare -f debian_rootfs;
           mmdebstrap --version; } | sha256sum | cut -c1-16)
  out=$cache/rootfs/$suite-$key.tar
  if [ ! -f "$out" ]; then
    local sources=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] && grep -q '^[^#[:space:]]' "$f" && sources+=("$f")
    done
    mkdir -p "$cache/rootfs"
    say "Debian $suite minbase with $packages (mmdebstrap, cached as $out)"
    # merged /usr made as debootstrap (and so debian:bookworm-slim) makes it, with usr-is-merged: left to
    # apt, init-system-helpers' "usrmerge | usr-is-merged" brings usrmerge and perl (40 MB) along.
    mmdebstrap --quiet --variant=minbase --include="$packages" "${ROOTFS_DPKG_OPTS[@]}" \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --customize-hook='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old' \
      "$suite" - "${sources[@]}" </dev/null |
      mmtarfilter --path-exclude='/dev/*' >"$out.tmp" || { rm -f "$out.tmp"; return 1; }
    mv -f "$out.tmp" "$out"
  fi
  echo "$out"
}

# dir_layer DIR TAR: a layer holding what DIR holds, at the image's root, owned by root. The layer
# has no entry for the root itself, which would set the image root's mode to DIR's.
dir_layer() {
  local entries=()
  mapfile -t entries < <(ls -A "$1")
  tar --numeric-owner --owner=0 --group=0 --sort=name -C "$1" -cf "$2" -- "${entries[@]}"
}

# oci_archive OUT NAME CONFIG_OPTION... -- LAYER...: an OCI archive of the layers in order, tagged
# NAME, with umoci's config options (--config.entrypoint, --config.cmd, --config.env, ...).
oci_archive() {
  local out=$1 name=$2; shift 2
  local config=() layout layer
  while [ "$1" != -- ]; do config+=("$1"); shift; done
  shift
  layout=$out.layout
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$name"
  for layer; do
    umoci raw add-layer --image "$layout:$name" "$layer"
  done
  umoci config --image "$layout:$name" "${config[@]}"
  umoci gc --layout "$layout"
  tar --numeric-owner -C "$layout" -cf "$out.tmp" .
  rm -rf "$layout"
  mv -f "$out.tmp" "$out"
  say "$out: $(du -h "$out" | cut -f1)"
}
