#!/usr/bin/env bash
# Build the linearizability checker (tests/linearizability/checker: porcupine and an etcd KV model) into
# bench/.bin/lincheck. tests/linearizability/lincheck.py runs this on first use, so a fresh clone needs
# nothing but Go and the Go module proxy.
#
# The checker is a module of this repository with go.mod and go.sum committed, so the build is
# reproducible: -mod=readonly refuses to change them, the proxy serves the pinned porcupine, and go.sum
# verifies it (no checksum database needed).
#
# Idempotent: does nothing if the binary is newer than every source file (FORCE=1 to rebuild).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="${repo_root}/tests/linearizability/checker"
out="${repo_root}/bench/.bin/lincheck"

if [[ -x "${out}" && "${FORCE:-0}" != "1" ]] && [[ -z "$(find "${src}" -newer "${out}" -type f)" ]]; then
    echo "build_lincheck: ${out} is up to date (FORCE=1 to rebuild)"
    exit 0
fi
command -v go >/dev/null || { echo "build_lincheck: go not found on PATH" >&2; exit 1; }
echo "build_lincheck: $(go version)"
mkdir -p "$(dirname "${out}")"
cd "${src}"
# The installed Go may be newer than go.mod's; never let it download another toolchain.
GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -mod=readonly" CGO_ENABLED=0 \
    go build -trimpath -ldflags="-s -w" -o "${out}.tmp.$$" .
mv "${out}.tmp.$$" "${out}"
echo "build_lincheck: built ${out}"
