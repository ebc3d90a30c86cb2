#!/usr/bin/env bash
# Builds the test cluster's third-party programs from their Go modules. Test infrastructure only: the product stays Rust.
#
#   tests/cluster/build.sh OUT k8s        etcd 3.6.4 and kube-apiserver 1.34.12
#   tests/cluster/build.sh OUT argo       Argo's workflow-controller v4.1.4, v4.0.7, v3.7.18
#   tests/cluster/build.sh OUT argoexec   Argo's own argoexec at the same versions (benchmarks)
#
# OUT gets a symbolic link per program: OUT/etcd, OUT/kube-apiserver, OUT/argo-v4.1/argoexec...,
# and OUT/argo-v4.1/module to the Argo module's source (its CRDs and examples).
# Each module here pins its versions (go.mod, go.sum). Binaries go to a cache outside the
# repository, keyed by the module's go.mod and go.sum, the Go version and the flags, so a fresh
# clone on the same machine finds them at once; Go's own module and build caches make a rebuild
# after a change cheap. Measured cold on 2 cores (modules already downloaded): kube-apiserver
# 3 min, etcd 10 s, each Argo controller about 2 min; warm: links only, seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")/go" && pwd)
cache=${EMISSARY_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/emissary-cluster}
export CGO_ENABLED=0 GOFLAGS=-mod=readonly

# build MODULE NAME PACKAGE [LDFLAGS [GOFLAGS...]]: builds PACKAGE of MODULE unless the cache
# holds it, and links it as OUT/NAME (k8s) or OUT/MODULE/NAME.
build() {
	local module=$1 name=$2 package=$3 ldflags="-s -w ${4:-}"
	local extra=("${@:5}")
	local key
	key=$(cat "$here/$module/go.mod" "$here/$module/go.sum" <(go version) <(echo "$package $ldflags ${extra[*]}") |
		sha256sum | cut -c1-16)
	local binary="$cache/$module/$name-$key"
	if [ ! -x "$binary" ]; then
		mkdir -p "$cache/$module"
		local start=$SECONDS
		echo "building $name ($module) from its Go module ..." >&2
		(cd "$here/$module" && go build -trimpath "${extra[@]}" -ldflags "$ldflags" -o "$binary.tmp" "$package")
		# Builds of older pins are not needed any more.
		find "$cache/$module" -maxdepth 1 -name "$name-*" ! -name "$name-$key*" -delete
		mv "$binary.tmp" "$binary"
		echo "built $name ($module) in $((SECONDS - start)) s" >&2
	fi
	local link="$out/$name"
	[ "$module" = k8s ] || link="$out/$module/$name"
	mkdir -p "$(dirname "$link")"
	ln -sfn "$binary" "$link"
}

# linux_modfile MODULE BASE: the published Argo module lacks osspecific/signal_linux.go (its
# darwin twin is there, and Linux has the same calls), so argoexec does not build for Linux from
# it. A copy of the module's source with that file added (the darwin one, for Linux) replaces
# it, through a go.mod of its own. Prints the go.mod's path.
linux_modfile() {
	local module=$1 base=$2 dir
	dir=$(cd "$here/$module" && go list -m -f '{{.Dir}}' "$base")
	local src="$cache/$module/src" files="$cache/$module/modfile"
	if [ ! -f "$src/workflow/executor/osspecific/signal_linux.go" ]; then
		rm -rf "$src" && mkdir -p "$cache/$module"
		cp -r "$dir" "$src.tmp" && chmod -R u+w "$src.tmp"
		{ echo "//go:build linux"; echo; cat "$dir/workflow/executor/osspecific/signal_darwin.go"; } \
			>"$src.tmp/workflow/executor/osspecific/signal_linux.go"
		mv "$src.tmp" "$src"
	fi
	mkdir -p "$files"
	{ cat "$here/$module/go.mod"; echo "replace $base => $src"; } >"$files/go.mod"
	cp "$here/$module/go.sum" "$files/go.sum"
	echo "$files/go.mod"
}

# -X flags that make kube-apiserver report VERSION instead of v0.0.0-master.
k8s_version_flags() {
	local v=$1 flags="" p
	local minor=${v#v1.}
	minor=${minor%%.*}
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		flags="$flags -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	done
	echo "$flags"
}

argo_modules=(argo-v4.1:v4:v4.1.4 argo-v4.0:v4:v4.0.7 argo-v3.7:v3:v3.7.18)

[ $# -ge 2 ] || { echo "usage: $0 OUT k8s|argo|argoexec..." >&2; exit 2; }
out=$1
shift
for what in "$@"; do
case "$what" in
k8s)
	build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$(k8s_version_flags v1.34.12)"
	build k8s etcd go.etcd.io/etcd/server/v3
	;;
argo | argoexec)
	for entry in "${argo_modules[@]}"; do
		IFS=: read -r module major version <<<"$entry"
		# ARGO_ONLY=argo-v4.1 builds one version (the benchmark needs only the newest).
		[ -z "${ARGO_ONLY:-}" ] || [ "$ARGO_ONLY" = "$module" ] || continue
		base=github.com/argoproj/argo-workflows/$major
		if [ "$what" = argo ]; then
			build "$module" workflow-controller "$base/cmd/workflow-controller" "-X $base.version=$version"
			# Its module's source, for the CRDs and examples the tests use.
			ln -sfn "$(cd "$here/$module" && go list -m -f '{{.Dir}}' "$base")" "$out/$module/module"
		else
			build "$module" argoexec "$base/cmd/argoexec" "-X $base.version=$version" \
				"-modfile=$(linux_modfile "$module" "$base")"
		fi
	done
	;;
*)
	echo "$0: unknown program set '$what' (k8s, argo, argoexec)" >&2
	exit 2
	;;
esac
done
