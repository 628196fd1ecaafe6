#!/bin/bash
# The pod sandbox image kubelet runs in every pod: build/pause/linux/pause.c from the Kubernetes source
# tree, compiled statically as upstream's build/pause/Makefile does, alone in one layer, ENTRYPOINT
# /pause (upstream's build/pause/Dockerfile).
#   Usage: pause.sh KUBE_SRC NAME OUT     (NAME: k8s.gcr.io/pause:3.2, what kubelet 1.20 asks for)
set -euo pipefail
IMAGE_TAG=pause
source "$(dirname "$0")/lib.sh"
src=$(realpath "${1:?usage: pause.sh KUBE_SRC NAME OUT}")
name=${2:?usage: pause.sh KUBE_SRC NAME OUT}
out=$(realpath -m "${3:?usage: pause.sh KUBE_SRC NAME OUT}")
mkdir -p "$(dirname "$out")"
# The version pause -v prints: the tree's own pause version (TAG in its Makefile).
tag=$(sed -n -E 's/^TAG[[:space:]]*[?:]?=[[:space:]]*([^[:space:]]+).*/\1/p' "$src/build/pause/Makefile")
[ -n "$tag" ] || { echo "pause.sh: no TAG in $src/build/pause/Makefile" >&2; exit 1; }

work=$(mktemp -d "$(dirname "$out")/.pause.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -m 0755 "$work/layer"
say "gcc -static $src/build/pause/linux/pause.c (pause v$tag)"
gcc -Os -Wall -Werror -static -DVERSION="v$tag" -o "$work/layer/pause" "$src/build/pause/linux/pause.c"
strip "$work/layer/pause"
dir_layer "$work/layer" "$work/pause.tar"
oci_archive "$out" "$name" --config.entrypoint /pause -- "$work/pause.tar"
