#!/usr/bin/env bash
# Build h2spec (HTTP/2 conformance tester) into bench/.bin/h2spec: tests/test_h2spec.py runs its generic and
# http2 sections against the native transport.
#
# h2spec has no go.mod, so the proxy serves it as v2.2.1+incompatible and its dependencies are whatever the
# build resolves; they are pinned here so that the build is reproducible. Built as ci/go_proxy_build.sh
# explains (a throw-away module requiring the pinned versions).
#
# Idempotent: does nothing if the binary exists and was built from the wanted version (FORCE=1 to rebuild).
# Env: H2SPEC_VERSION (default v2.2.1+incompatible), GOFLAGS/GOPROXY as usual.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${repo_root}/bench/.bin/h2spec"
version="${H2SPEC_VERSION:-v2.2.1+incompatible}"
stamp="h2spec ${version}"

if [[ -x "${out}" && "${FORCE:-0}" != "1" ]] && [[ "$(cat "${out}.version" 2>/dev/null)" == "${stamp}" ]]; then
    echo "build_h2spec: ${out} already present (${stamp}; FORCE=1 to rebuild)"
    exit 0
fi

# shellcheck source=ci/go_proxy_build.sh
source "${repo_root}/ci/go_proxy_build.sh"
go_proxy_build build_h2spec "${out}" github.com/summerwind/h2spec/cmd/h2spec \
    "github.com/summerwind/h2spec@${version}" \
    golang.org/x/net@v0.62.0 golang.org/x/text@v0.43.0 golang.org/x/sys@v0.49.0 \
    github.com/spf13/cobra@v1.10.2 github.com/spf13/pflag@v1.0.9 \
    github.com/fatih/color@v1.19.0 github.com/mattn/go-colorable@v0.1.14 github.com/mattn/go-isatty@v0.0.20
echo "${stamp}" > "${out}.version"
echo "build_h2spec: built ${out} (${stamp})"
