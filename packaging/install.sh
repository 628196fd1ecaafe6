#!/bin/sh
# Installs or removes Weft's frozen bundle, used by `make install`/`make uninstall` and by the kind
# DaemonSet's init container (which has no make). Each bundle goes into its own directory named by
# its content, and `current` is switched to it atomically, so a plugin that containerd is running
# at that moment never sees half a bundle. The CNI binaries are relative symlinks into `current`,
# which stay right when the tree is copied or seen through a host mount.
#
# CONFLIST is an example for a node without weftd. It is written only where CNI_CONF_DIR holds no file
# of its name: on a node with weftd that file is weftd's (weftd writes it with the node's subnet, data
# directory and socket, and puts it back whenever something else changed it), and any other one is
# the operator's. `remove` takes the same CONFLIST and removes the installed file only while it still
# holds the example, so it never removes weftd's (`weftd uninstall` does that).
#
#   install.sh install BUNDLE LIBDIR CNI_BIN_DIR [BIN_DIR] [CONFLIST CNI_CONF_DIR]
#   install.sh remove LIBDIR CNI_BIN_DIR [BIN_DIR] [CONFLIST CNI_CONF_DIR]
set -eu

PLUGINS="weft weft-ipam"

swap() {  # swap LINK TARGET: point LINK at TARGET in one rename
    ln -sfn "$2" "$1.tmp.$$"
    mv -Tf "$1.tmp.$$" "$1"
}

ours() {  # ours LINK LIBDIR: LINK is a symlink that resolves into LIBDIR
    [ -L "$1" ] || return 1
    case "$(readlink -f "$1")" in "$(readlink -f "$2")"/*) return 0 ;; esac
    return 1
}

install_bundle() {
    bundle=$1 libdir=$2 cnibin=$3 bindir=${4:-} conflist=${5:-} confdir=${6:-}
    [ -x "$bundle/weft" ] || { echo "install.sh: no bundle at $bundle (run make build)" >&2; exit 1; }
    id=$(cd "$bundle" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z | xargs -0 cat | cksum | cut -d" " -f1)
    mkdir -p "$libdir" "$cnibin"
    if [ ! -d "$libdir/bundle-$id" ]; then
        rm -rf "$libdir/.bundle-$id.tmp"
        cp -a "$bundle" "$libdir/.bundle-$id.tmp"
        mv -T "$libdir/.bundle-$id.tmp" "$libdir/bundle-$id"
    fi
    previous=$(readlink "$libdir/current" 2>/dev/null || true)
    swap "$libdir/current" "bundle-$id"
    # Keep the previous bundle: a plugin started from it may still be importing modules.
    for old in "$libdir"/bundle-*; do
        name=$(basename "$old")
        [ "$name" = "bundle-$id" ] || [ "$name" = "$previous" ] || rm -rf "$old"
    done
    for p in $PLUGINS; do
        swap "$cnibin/$p" "$(realpath -m -s --relative-to="$cnibin" "$libdir/current/$p")"
    done
    if [ -n "$bindir" ]; then
        mkdir -p "$bindir"
        swap "$bindir/weftd" "$(realpath -m -s --relative-to="$bindir" "$libdir/current/weftd")"
    fi
    if [ -n "$conflist" ]; then
        mkdir -p "$confdir"
        name=$(basename "$conflist")
        tmp="$confdir/.$name.tmp.$$"
        cp "$conflist" "$tmp"
        chmod 0644 "$tmp"
        # A hard link never replaces an existing file, even one weftd writes between a test and the link.
        if ln "$tmp" "$confdir/$name" 2>/dev/null; then
            conf_note=", $confdir/$name"
        elif [ -e "$confdir/$name" ] || [ -L "$confdir/$name" ]; then
            conf_note=" ($confdir/$name exists: left as it is)"
        else
            rm -f "$tmp"
            echo "install.sh: cannot write $confdir/$name" >&2
            exit 1
        fi
        rm -f "$tmp"
    fi
    echo "installed bundle-$id: $cnibin/{$(echo $PLUGINS | tr ' ' ,)}${bindir:+, $bindir/weftd}${conf_note:-}"
}

remove_bundle() {
    libdir=$1 cnibin=$2 bindir=${3:-} conflist=${4:-} confdir=${5:-}
    for link in $(for p in $PLUGINS; do echo "$cnibin/$p"; done) ${bindir:+"$bindir/weftd"}; do
        if ours "$link" "$libdir"; then rm -f "$link"; fi
    done
    if [ -n "$conflist" ] && cmp -s "$conflist" "$confdir/$(basename "$conflist")"; then
        rm -f "$confdir/$(basename "$conflist")"
    fi
    rm -rf "$libdir"
    echo "removed $libdir and its links"
}

case "${1:-}" in
    install) shift; install_bundle "$@" ;;
    remove) shift; remove_bundle "$@" ;;
    *) echo "usage: $0 install|remove ..." >&2; exit 2 ;;
esac
