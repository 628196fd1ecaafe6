#!/bin/bash
# Build kube-apiserver from Debian's `kubernetes` source package (1.20.x, full upstream tree with vendor/),
# offline with Debian's Go. Usage: build.sh BUILD_DIR  -> prints the path of the cached binary.
# The binary is cached under BUILD_DIR/kube-apiserver/<source version>/, so a machine builds it once.
# The machine's apt sources are never touched: the deb-src entry lives in an apt configuration of our own.
set -euo pipefail
build=$(realpath -m "${1:?usage: build.sh BUILD_DIR}")
root=$build/kube-apiserver
aptdir=$root/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/sources.list.d"

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
bin=$out/kube-apiserver
if [ -x "$bin" ]; then ln -sfn "$version" "$root/current"; echo "$bin"; exit 0; fi

work=$root/work-$version
rm -rf "$work"; mkdir -p "$work"
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only kubernetes >&2)
dsc=$(ls "$work"/kubernetes_*.dsc)
dpkg-source --no-check -x "$dsc" "$work/src" >&2
src=$work/src

# reflect2 v1.0.1 breaks with Go >= 1.18 (it relies on runtime internals); Debian ships v1.0.2.
rdeb=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "$rdeb/go.mod" ] || { echo "build.sh: $rdeb missing: install golang-github-modern-go-reflect2-dev" >&2; exit 1; }
rm -rf "$src/vendor/github.com/modern-go/reflect2"
mkdir -p "$src/vendor/github.com/modern-go/reflect2"
(cd "$rdeb" && find . -name '*_test.go' -prune -o -type f -print0 | xargs -0 cp --parents -t "$src/vendor/github.com/modern-go/reflect2")
sed -i 's#github.com/modern-go/reflect2 v1\.0\.1#github.com/modern-go/reflect2 v1.0.2#g' "$src/go.mod" "$src/vendor/modules.txt"
sed -i '\#^github.com/modern-go/reflect2 v1\.0\.1#d' "$src/go.sum"
grep -q 'modern-go/reflect2 v1.0.2' "$src/vendor/modules.txt" || { echo "build.sh: vendor/modules.txt not updated" >&2; exit 1; }

export GOCACHE=$root/gocache GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on GOTOOLCHAIN=local
unset GOPATH GOBIN
(cd "$src" && make WHAT=cmd/kube-apiserver >&2)
mkdir -p "$out"
install -m 0755 "$src/_output/local/bin/linux/$(go env GOARCH)/kube-apiserver" "$bin.tmp"
mv "$bin.tmp" "$bin"
ln -sfn "$version" "$root/current"
rm -rf "$work"
echo "$bin"
