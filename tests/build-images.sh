#!/usr/bin/env bash
# Builds the images (emissary, argoexec, emissary-agent) FROM scratch as OCI archives with
# buildah, no Docker daemon:
#   tests/build-images.sh EMISSARY_BIN OUT_DIR [AGENT_BIN]
# buildah runs with --isolation chroot and the vfs driver under a throwaway root: the default
# OCI runtime refuses this machine's hybrid cgroups (feasibility.md section 4).
set -euo pipefail
emissary_bin=$1
out=$2
agent_bin=${3:-}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
buildah=(buildah --root "$work/root" --runroot "$work/run" --storage-driver vfs)

build() { # name dockerfile-dir context-files...
    local name=$1 dir=$2; shift 2
    local ctx="$work/ctx-$name"
    mkdir -p "$ctx"
    cp "$@" "$ctx/"
    "${buildah[@]}" bud --quiet --isolation chroot --layers=false -t "localhost/$name:dev" -f "$dir/Dockerfile" "$ctx" >/dev/null
    rm -f "$out/$name.oci.tar"
    "${buildah[@]}" push --quiet "localhost/$name:dev" "oci-archive:$out/$name.oci.tar:$name:dev"
    printf '%-16s %9d bytes  %s\n' "$name" "$(stat -c %s "$out/$name.oci.tar")" "$out/$name.oci.tar"
}

build emissary images/emissary "$emissary_bin"
build argoexec images/argoexec "$emissary_bin"
if [ -n "$agent_bin" ]; then
    build emissary-agent images/agent "$agent_bin" /etc/ssl/certs/ca-certificates.crt
fi
