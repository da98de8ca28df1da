#!/usr/bin/env bash
# Build the etcd v3.7 server into bench/.bin/etcd-3.7: the reference for KV.RangeStream (an etcd 3.7 RPC)
# in tests/test_range_stream.py and bench/kube_bench.py.
#
# The `etcd` binary is the main package at the root of the go.etcd.io/etcd/server/v3 module (its main.go
# calls etcdmain.Main); the repository's root module is not on the module proxy at v3.7.x. Built as
# ci/go_proxy_build.sh explains.
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

# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_proxy_build build_etcd37 "${out}" go.etcd.io/etcd/server/v3 "go.etcd.io/etcd/server/v3@${version}"
echo "build_etcd37: built ${out}: $("${out}" --version | sed -n 1p)"
