#!/usr/bin/env bash
# Build the etcd v3.5.21 server into bench/.bin/etcd-3.5: the 3.5 line with etcd-io/etcd#14370 fixed (a
# one-member cluster answers a write only once its WAL is synced; fixed in 3.5.5). bench/t6_floor.py
# measures T6, a durable put's latency, against it beside etcd 3.5.1, which answers before its sync.
#
# Built from the Go module proxy as ci/go_proxy_build.sh explains (go_etcd_server_build).
#
# Idempotent: does nothing if the binary exists and reports the wanted version (FORCE=1 to rebuild).
# Env: ETCD35_VERSION (default v3.5.21), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_etcd_server_build build_etcd35 "${repo_root}/bench/.bin/etcd-3.5" "${ETCD35_VERSION:-v3.5.21}"
