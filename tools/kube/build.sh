#!/bin/bash
# Build Kubernetes 1.20 binaries from Debian's `kubernetes` source package (the full upstream tree
# with vendor/), offline with Debian's Go.
#   Usage: build.sh BUILD_DIR NAME...   NAME: kube-apiserver kubelet kube-proxy kube-scheduler
#          kube-controller-manager e2e.test ginkgo agnhost
# Binaries are cached under BUILD_DIR/kube/<source version>/ with the extracted tree and Go's build
# cache beside them, so a machine builds each once; BUILD_DIR/kube/current points at the version.
# The machine's apt sources are never touched: the deb-src entry lives in an apt configuration of our
# own. Progress goes to stderr; stdout gets the binaries' directory.
set -euo pipefail
build=$(realpath -m "${1:?usage: build.sh BUILD_DIR NAME...}"); shift
[ $# -gt 0 ] || { echo "build.sh: name at least one binary" >&2; exit 2; }
root=$build/kube
aptdir=$root/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/sources.list.d"
start=$SECONDS
say() { printf '[kube build %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

declare -A what=(
  [kube-apiserver]=cmd/kube-apiserver [kubelet]=cmd/kubelet [kube-proxy]=cmd/kube-proxy
  [kube-scheduler]=cmd/kube-scheduler [kube-controller-manager]=cmd/kube-controller-manager
  [e2e.test]=test/e2e/e2e.test [ginkgo]=vendor/github.com/onsi/ginkgo/ginkgo
  [agnhost]=test/images/agnhost)
for name; do [ -n "${what[$name]:-}" ] || { echo "build.sh: unknown binary '$name'" >&2; exit 2; }; done

# The Debian mirror host the machine already uses for bookworm main (deb822 or one-line format).
mirror=$(
  { awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |$|\n)/ && /Components:[^\n]*main/ {
           if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { s=substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s } }' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    grep -hE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[a-z]+://[^ ]+[[:space:]]+bookworm[[:space:]].*main' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//; s/[[:space:]].*//'
  } | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb-src [signed-by=$keyring] $mirror bookworm main" >"$aptdir/sources.list"

apt_opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
          -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
[ "$(id -u)" = 0 ] && apt_opts+=(-o "APT::Sandbox::User=root")

if ! ls "$aptdir"/lists/*Sources* >/dev/null 2>&1; then
  apt-get "${apt_opts[@]}" update -qq >&2
fi
version=$(apt-cache "${apt_opts[@]}" showsrc kubernetes | awk '/^Version:/ {print $2; exit}')
[ -n "$version" ] || { echo "build.sh: no kubernetes source package in $mirror bookworm main" >&2; exit 1; }
out=$root/$version
missing=()
for name; do [ -x "$out/$name" ] || missing+=("$name"); done
if [ ${#missing[@]} -eq 0 ]; then ln -sfn "$version" "$root/current"; echo "$out"; exit 0; fi
say "kubernetes $version: building ${missing[*]} (cached under $out)"

src=$out/src
if [ ! -f "$src/.weft-prepared" ]; then
  say "fetching and unpacking the source package"
  work=$out/fetch
  rm -rf "$work" "$src"; mkdir -p "$work"
  (cd "$work" && apt-get "${apt_opts[@]}" source --download-only kubernetes >&2)
  dpkg-source --no-check -x "$(ls "$work"/kubernetes_*.dsc)" "$src" >/dev/null
  rm -f "$out"/kubernetes_*  # dpkg-source leaves a copy of the tarballs beside the tree
  rm -rf "$work"
  # reflect2 v1.0.1 breaks with Go >= 1.18 (it relies on runtime internals); Debian ships v1.0.2.
  rdeb=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -f "$rdeb/go.mod" ] || { echo "build.sh: $rdeb missing: install golang-github-modern-go-reflect2-dev" >&2; exit 1; }
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$src/vendor/github.com/modern-go/reflect2"
  (cd "$rdeb" && find . -name '*_test.go' -prune -o -type f -print0 | xargs -0 cp --parents -t "$src/vendor/github.com/modern-go/reflect2")
  sed -i 's#github.com/modern-go/reflect2 v1\.0\.1#github.com/modern-go/reflect2 v1.0.2#g' "$src/go.mod" "$src/vendor/modules.txt"
  sed -i '\#^github.com/modern-go/reflect2 v1\.0\.1#d' "$src/go.sum"
  grep -q 'modern-go/reflect2 v1.0.2' "$src/vendor/modules.txt" || { echo "build.sh: vendor/modules.txt not updated" >&2; exit 1; }
  touch "$src/.weft-prepared"
fi

export GOCACHE=$root/gocache GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local
unset GOPATH GOBIN
arch=$(go env GOARCH)
targets=()
for name in "${missing[@]}"; do targets+=("${what[$name]}"); done
say "go build ${targets[*]} (minutes; e2e.test is the longest)"
# agnhost runs in images of its own: static, as upstream builds it.
(cd "$src" && KUBE_STATIC_OVERRIDES=agnhost make WHAT="${targets[*]}" >&2)
for name in "${missing[@]}"; do
  install -m 0755 "$src/_output/local/bin/linux/$arch/$name" "$out/$name.tmp"
  mv "$out/$name.tmp" "$out/$name"
done
ln -sfn "$version" "$root/current"
say "done: ${missing[*]}"
echo "$out"
