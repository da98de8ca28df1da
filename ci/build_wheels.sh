#!/usr/bin/env bash
# Build fastetcd's sdist and a manylinux wheel for one CPython, into OUTDIR (default dist/).
#
#   ci/build_wheels.sh [PYTHON] [OUTDIR]          # PYTHON defaults to python3
#
# 1. `python -m build` makes the sdist from the git checkout (setuptools-scm puts the version from git tags
#    into it), then the wheel from that sdist: so every wheel also proves the sdist builds from source.
# 2. `auditwheel repair` turns the linux_* wheel into a manylinux_* one: it copies the shared libraries the
#    extensions link and the policy does not allow (libnghttp2, linked by the native transport
#    fastetcd/server/_native) into fastetcd.libs/ and points the extension's RPATH there (patchelf), so the
#    wheel needs no libnghttp2 on the user's machine.
# 3. The wheel must hold the native transport: setup.py skips it silently without libnghttp2's headers, and
#    a wheel without it would only fail later, on `--transport native`.
#
# Other CPythons and architectures: run the same script inside PyPA's manylinux images, which carry every
# supported CPython under /opt/python and an old glibc (the wheel then runs on every distro at least that
# new). For example, CPython 3.12 and 3.13 on aarch64 (natively, or on x86_64 through qemu-user-static):
#
#   docker run --rm -v "$PWD":/io -w /io quay.io/pypa/manylinux_2_28_aarch64 \
#       bash -c 'for v in cp311-cp311 cp312-cp312 cp313-cp313; do
#                    ci/build_wheels.sh /opt/python/$v/bin/python wheelhouse; done'
#
# (manylinux_2_28_x86_64 likewise for x86_64; the image is AlmaLinux, so step 0 uses dnf.) The git checkout
# must be mounted whole (.git included) so setuptools-scm finds the version; git may need
# `git config --global --add safe.directory /io` inside the container.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
OUT="${2:-dist}"
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# 0. libnghttp2's headers, before the build (Debian in CI, AlmaLinux in the manylinux images).
if ! pkg-config --exists libnghttp2 2>/dev/null && [ ! -f /usr/include/nghttp2/nghttp2.h ]; then
    if command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq libnghttp2-dev pkg-config
    elif command -v dnf >/dev/null; then
        dnf install -y -q libnghttp2-devel
    else
        echo "build_wheels: libnghttp2's headers are missing and no apt-get or dnf to install them" >&2
        exit 1
    fi
fi
# The tools (patchelf from PyPI: a static binary, so no distro package is needed).
"$PYTHON" -m pip install -q build auditwheel patchelf

raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
"$PYTHON" -m build --outdir "$raw" .

wheel="$(ls "$raw"/fastetcd-*.whl)"
# The listing first, grep after: `grep -q` stops reading at the first match, and under pipefail the
# lister's broken pipe would fail the check.
listing="$("$PYTHON" -m zipfile -l "$wheel")"
if ! grep -q 'fastetcd/server/_native\.' <<<"$listing"; then
    echo "build_wheels: $wheel has no native transport (fastetcd/server/_native); was libnghttp2 found?" >&2
    exit 1
fi

mkdir -p "$OUT"
"$PYTHON" -m auditwheel repair --wheel-dir "$OUT" "$wheel"
cp "$raw"/fastetcd-*.tar.gz "$OUT"/
repaired="$(ls -t "$OUT"/fastetcd-*manylinux*.whl | head -n 1)"
"$PYTHON" -m auditwheel show "$repaired"
echo "build_wheels: $repaired and $(ls "$OUT"/fastetcd-*.tar.gz | tail -n 1)"
