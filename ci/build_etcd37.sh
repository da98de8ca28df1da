#!/usr/bin/env bash
# Build the etcd v3.7 server into bench/.bin/etcd-3.7: the reference for KV.RangeStream (an etcd 3.7 RPC)
# in tests/test_range_stream.py and bench/kube_bench.py.
#
# The `etcd` binary is the main package at the root of the go.etcd.io/etcd/server/v3 module (its main.go
# calls etcdmain.Main); the repository's root module is not on the module proxy at v3.7.x. Like
# ci/build_etcd_benchmark.sh, it is built from a throw-away module that merely requires it: as a
# dependency, etcd's replace directives are ignored and its sibling modules (api, client, pkg) resolve
# from the Go module proxy at the versions server/v3's go.mod names.
#
# Idempotent: does nothing if the binary exists and reports the wanted version (FORCE=1 to rebuild).
# Env: ETCD37_VERSION (default v3.7.3), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${repo_root}/bench/.bin/etcd-3.7"
version="${ETCD37_VERSION:-v3.7.3}"

if [[ -x "${out}" && "${FORCE:-0}" != "1" ]] && "${out}" --version 2>/dev/null | grep -qx "etcd Version: ${version#v}"; then
    echo "build_etcd37: ${out} already present ($("${out}" --version | sed -n 1p); FORCE=1 to rebuild)"
    exit 0
fi

command -v go >/dev/null || { echo "build_etcd37: go not found on PATH" >&2; exit 1; }
echo "build_etcd37: $(go version)"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
cd "${work}"

# The installed Go may be far newer than etcd's; never let it try to download another toolchain.
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:-} -mod=mod"

echo "build_etcd37: creating temp module in ${work}"
go mod init fastetcd.local/etcd37 >/dev/null 2>&1
echo "build_etcd37: fetching go.etcd.io/etcd/server/v3@${version} and its dependencies"
go get "go.etcd.io/etcd/server/v3@${version}"

echo "build_etcd37: compiling the etcd server"
mkdir -p "$(dirname "${out}")"
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "${out}.tmp" go.etcd.io/etcd/server/v3
mv "${out}.tmp" "${out}"
echo "build_etcd37: built ${out}: $("${out}" --version | sed -n 1p)"
