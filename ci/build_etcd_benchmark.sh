#!/usr/bin/env bash
# Build etcd's own load generator (tools/benchmark of etcd v3.5) into bench/.bin/benchmark.
#
# `go install go.etcd.io/etcd/v3/tools/benchmark@v3.5.x` is refused because etcd's root go.mod carries
# replace directives, so the tool is built from a throw-away module that merely requires etcd: as a
# dependency, etcd's replace directives are ignored and its sub-modules resolve from the module proxy.
#
# Idempotent: does nothing if the binary exists (set FORCE=1 to rebuild).
# Env: ETCD_BENCH_VERSION (default v3.5.21), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${repo_root}/bench/.bin/benchmark"
version="${ETCD_BENCH_VERSION:-v3.5.21}"

if [[ -x "${out}" && "${FORCE:-0}" != "1" ]]; then
    echo "build_etcd_benchmark: ${out} already present (FORCE=1 to rebuild)"
    exit 0
fi

command -v go >/dev/null || { echo "build_etcd_benchmark: go not found on PATH" >&2; exit 1; }
echo "build_etcd_benchmark: $(go version)"

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
cd "${work}"

# The installed Go may be far newer than etcd's; never let it try to download another toolchain.
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:-} -mod=mod"

echo "build_etcd_benchmark: creating temp module in ${work}"
go mod init fastetcd.local/etcdbench >/dev/null 2>&1
echo "build_etcd_benchmark: fetching go.etcd.io/etcd/v3@${version} and its dependencies"
go get "go.etcd.io/etcd/v3@${version}"
go get "go.etcd.io/etcd/v3/tools/benchmark@${version}"

echo "build_etcd_benchmark: compiling tools/benchmark"
mkdir -p "$(dirname "${out}")"
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "${out}.tmp" go.etcd.io/etcd/v3/tools/benchmark
mv "${out}.tmp" "${out}"
# bench/compare.py quotes this in its machine notes.
echo "etcd tools/benchmark ${version}, $(go version | cut -d' ' -f3)" > "${out}.version"
echo "build_etcd_benchmark: built ${out} (etcd ${version})"
"${out}" --help >/dev/null
