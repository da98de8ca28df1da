# Sourced by ci/build_*.sh: build a Go main package of etcd from the Go module proxy.
#
# `go install <pkg>@<version>` is refused for etcd's modules because their go.mod files carry replace
# directives, so the package is built inside a throw-away module that merely requires it: as a dependency,
# etcd's replace directives are ignored and its sibling modules resolve from the proxy at the versions the
# required module's go.mod names.
#
# go_proxy_build TAG OUT PACKAGE MODULE@VERSION...  (TAG prefixes the progress lines)

go_proxy_build() {
    local tag="$1" out="$2" pkg="$3"
    shift 3
    command -v go >/dev/null || { echo "${tag}: go not found on PATH" >&2; return 1; }
    echo "${tag}: $(go version)"
    local work status=0
    work="$(mktemp -d)"
    (
        cd "${work}"
        # The installed Go may be far newer than etcd's; never let it try to download another toolchain.
        export GOTOOLCHAIN=local
        export GOFLAGS="${GOFLAGS:-} -mod=mod"
        echo "${tag}: creating temp module in ${work}"
        go mod init fastetcd.local/build >/dev/null 2>&1
        for module in "$@"; do
            echo "${tag}: fetching ${module} and its dependencies"
            go get "${module}"
        done
        echo "${tag}: compiling ${pkg}"
        mkdir -p "$(dirname "${out}")"
        CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "${out}.tmp" "${pkg}"
        mv "${out}.tmp" "${out}"
    ) || status=$?
    rm -rf "${work}"
    return "${status}"
}

# go_etcd_server_build TAG OUT VERSION: the `etcd` server of release VERSION (vX.Y.Z) into OUT: the main package
# at the root of the go.etcd.io/etcd/server/v3 module (its main.go calls etcdmain.Main; the repository's root
# module is not on the proxy at every release). Does nothing if OUT exists and reports VERSION (FORCE=1 to
# rebuild).
go_etcd_server_build() {
    local tag="$1" out="$2" version="$3"
    if [[ -x "${out}" && "${FORCE:-0}" != "1" ]] && "${out}" --version 2>/dev/null | grep -qx "etcd Version: ${version#v}"; then
        echo "${tag}: ${out} already present ($("${out}" --version | sed -n 1p); FORCE=1 to rebuild)"
        return 0
    fi
    go_proxy_build "${tag}" "${out}" go.etcd.io/etcd/server/v3 "go.etcd.io/etcd/server/v3@${version}" || return
    echo "${tag}: built ${out}: $("${out}" --version | sed -n 1p)"
}
