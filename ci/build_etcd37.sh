#!/usr/bin/env bash
# Build the etcd v3.7 server into bench/.bin/etcd-3.7: the reference for KV.RangeStream (an etcd 3.7 RPC)
# in tests/test_range_stream.py and bench/kube_bench.py.
#
# Built from the Go module proxy as ci/go_proxy_build.sh explains (go_etcd_server_build).
#
# Idempotent: does nothing if the binary exists and reports the wanted version (FORCE=1 to rebuild).
# Env: ETCD37_VERSION (default v3.7.3), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_etcd_server_build build_etcd37 "${repo_root}/bench/.bin/etcd-3.7" "${ETCD37_VERSION:-v3.7.3}"
