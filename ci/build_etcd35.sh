#!/usr/bin/env bash
# Build the etcd v3.5.21 server into bench/.bin/etcd-3.5: the 3.5 line with etcd-io/etcd#14370 fixed (a
# one-member cluster answers a write only once its WAL is synced; fixed in 3.5.5). bench/t6_floor.py
# measures T6, a durable put's latency, against it beside etcd 3.5.1, which answers before its sync.
#
# Built from the module proxy as ci/build_etcd37.sh builds etcd 3.7.3 (see ci/go_proxy_build.sh).
#
# Idempotent: does nothing if the binary exists and reports the wanted version (FORCE=1 to rebuild).
# Env: ETCD35_VERSION (default v3.5.21), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${repo_root}/bench/.bin/etcd-3.5"
version="${ETCD35_VERSION:-v3.5.21}"

if [[ -x "${out}" && "${FORCE:-0}" != "1" ]] && "${out}" --version 2>/dev/null | grep -qx "etcd Version: ${version#v}"; then
    echo "build_etcd35: ${out} already present ($("${out}" --version | sed -n 1p); FORCE=1 to rebuild)"
    exit 0
fi

# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_proxy_build build_etcd35 "${out}" go.etcd.io/etcd/server/v3 "go.etcd.io/etcd/server/v3@${version}"
echo "build_etcd35: built ${out}: $("${out}" --version | sed -n 1p)"
