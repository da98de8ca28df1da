#!/usr/bin/env bash
# Build etcd's own load generator (tools/benchmark of etcd v3.5) into bench/.bin/benchmark.
#
# Built from the Go module proxy as ci/go_proxy_build.sh explains.
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

# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_proxy_build build_etcd_benchmark "${out}" go.etcd.io/etcd/v3/tools/benchmark \
    "go.etcd.io/etcd/v3@${version}" "go.etcd.io/etcd/v3/tools/benchmark@${version}"
# bench/compare.py quotes this in its machine notes.
echo "etcd tools/benchmark ${version}, $(go version | cut -d' ' -f3)" > "${out}.version"
echo "build_etcd_benchmark: built ${out} (etcd ${version})"
"${out}" --help >/dev/null
