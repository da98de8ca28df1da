"""Start, probe and stop fastetcd and real etcd server processes on free loopback ports.

Every server runs in its own session (process group), so stopping it reaches anything it spawned, and
writes stdout and stderr to a log file in its work dir (a file, not a pipe: a chatty server never blocks
on a full pipe). Whoever starts a server stops it: :meth:`ServerProcess.kill` or
:meth:`ServerProcess.stop`, or use the server as a context manager.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from fastetcd.testing.etcdctl import etcd_tool
from fastetcd.testing.ports import LOOPBACK, free_port
from fastetcd.testing.stubs import range_answers
from fastetcd.testing.tls import DEFAULT, ClientTls, ServerTls, _Default, resolve_client, resolve_server

START_TIMEOUT_S = 30.0
ServerKind = Literal["etcd", "fastetcd"]


def stop_process_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                       timeout: float = 10.0) -> int:
    """Send ``sig`` to the process group led by ``proc`` and reap it; SIGKILL if it outlives ``timeout``.

    ``proc`` must have been started with ``start_new_session=True``. Returns its exit code (negative: the
    signal that ended it). A process that already exited is only reaped.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=timeout)


@dataclass
class ServerProcess:
    """One running (or exited) server process started by :func:`spawn`."""

    kind: ServerKind
    proc: subprocess.Popen[bytes]
    endpoint: str
    """``host:port`` of its client URL (what gRPC dials and etcdctl's ``--endpoints`` takes)."""
    workdir: Path
    """The directory holding its data dir and log."""
    log_path: Path
    log_offset: int = 0
    """Where this run's output starts in ``log_path`` (a restart on the same work dir appends)."""
    cosmos_container: str | None = None
    """The Cosmos container a fastetcd on the Cosmos store uses, else None."""
    metrics_url: str | None = None
    """``http://host:port`` of its ``--listen-metrics-urls`` (/metrics, /health) when started with
    ``metrics=True``, else None."""
    client_tls: ClientTls | None = None
    """How a client reaches it over TLS (its client URL is https://), or None: plain text."""
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        """Its client URL: ``http://`` or ``https://`` + :attr:`endpoint`."""
        return f"{'https' if self.client_tls is not None else 'http'}://{self.endpoint}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it (no clean shutdown: a crash)."""
        stop_process_group(self.proc, signal.SIGKILL)
        self._close_log()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0, *, escalate: bool = True) -> int:
        """Ask the server to shut down with ``sig`` and return its exit code.

        If it is still running after ``timeout`` seconds it is killed; with ``escalate=False`` that is an
        error (TimeoutError with the log tail), for tests of a clean shutdown.
        """
        if not escalate:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                why = f"{self.kind} did not exit within {timeout}s of signal {sig}"
                raise TimeoutError(f"{why}; log tail:\n{self.log_tail()}") from None
        code = stop_process_group(self.proc, sig, timeout)
        self._close_log()
        return code

    def output(self) -> str:
        """Everything this run has written to stdout and stderr so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of this run's output (for failure messages)."""
        text = self.output()
        return "\n".join(text.splitlines()[-n:]) if text else "<no log>"

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def spawn(kind: ServerKind, argv: Sequence[str], endpoint: str, workdir: Path, log_path: Path, *,
          env: Mapping[str, str] | None = None, cwd: Path | None = None) -> ServerProcess:
    """Start ``argv`` in a session of its own, its output appended to ``log_path``; does not wait."""
    log_file = open(log_path, "ab")  # closed by ServerProcess.kill/stop
    offset = log_file.tell()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except BaseException:
        log_file.close()
        raise
    return ServerProcess(kind, proc, endpoint, workdir, log_path, offset, _log_file=log_file)


def wait_ready(server: ServerProcess, timeout: float = START_TIMEOUT_S, poll_interval: float = 0.05) -> None:
    """Wait until ``server`` answers a Range (see :func:`~fastetcd.testing.range_answers`).

    Raises RuntimeError with the log tail if it exits first, or kills it and raises if it is not ready
    within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.kind} exited with code {server.proc.returncode} before answering;"
                f" log tail:\n{server.log_tail()}"
            )
        if range_answers(server.endpoint, timeout=1.0, tls=server.client_tls):
            return
        time.sleep(poll_interval)
    server.kill()
    raise RuntimeError(
        f"{server.kind} did not answer a Range within {timeout}s; log tail:\n{server.log_tail()}"
    )


def _wait_or_kill(server: ServerProcess, timeout: float) -> None:
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.kill()  # also closes its log file
        raise


def _workdir(path: Path) -> Path:
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _endpoint(port: int | None) -> str:
    return f"{LOOPBACK}:{port or free_port()}"


def _metrics_args(metrics: bool) -> tuple[list[str], str | None]:
    """``--listen-metrics-urls`` on a free loopback port (the same flag in etcd and fastetcd), and its URL."""
    if not metrics:
        return [], None
    url = f"http://{LOOPBACK}:{free_port()}"
    return ["--listen-metrics-urls", url], url


# ----------------------------------------------------------------------------------------------------
# real etcd


def _tls_choice(tls: ServerTls | None | _Default,
                client_tls: ClientTls | None | _Default) -> tuple[ServerTls | None, ClientTls | None]:
    """The server's TLS flags and how the harness reaches it. Both default to the process-wide TLS
    (fastetcd.testing.tls); a server given its own TLS needs its own client side too (the probe)."""
    server = resolve_server(tls)
    if isinstance(tls, _Default) or not isinstance(client_tls, _Default):
        client = resolve_client(client_tls)
    else:
        client = None
    if server is not None and client is None:
        raise ValueError("a server on TLS needs client_tls (how the readiness probe and clients reach it)")
    return server, client


def etcd_command(endpoint: str, peer_port: int, data_dir: Path, *, name: str = "oracle", fsync: bool = False,
                 log_level: str = "error", extra_args: Sequence[str] = (),
                 binary: str | None = None, tls: ServerTls | None = None) -> list[str]:
    """The command line of a single-member etcd serving clients on ``endpoint`` (``host:port``), over
    TLS with ``tls`` (https:// client URLs and its flags)."""
    peer = f"http://{LOOPBACK}:{peer_port}"
    scheme = "https" if tls is not None else "http"
    argv = [
        binary or etcd_tool("etcd"),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://{endpoint}",
        "--advertise-client-urls", f"{scheme}://{endpoint}",
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{name}={peer}",
        "--log-level", log_level,
    ]  # fmt: skip
    if not fsync:
        argv.append("--unsafe-no-fsync")
    if tls is not None:
        argv.extend(tls.args())
    argv.extend(extra_args)
    return argv


def start_etcd(workdir: Path, extra_args: Sequence[str] = (), *, port: int | None = None, fsync: bool = False,
               name: str = "oracle", log_level: str = "error", binary: str | None = None,
               metrics: bool = False, wait: bool = True, timeout: float = START_TIMEOUT_S,
               tls: ServerTls | None | _Default = DEFAULT,
               client_tls: ClientTls | None | _Default = DEFAULT) -> ServerProcess:
    """A single-member real etcd with its data in ``workdir/etcd`` and its log in ``workdir/etcd.log``.

    fsync is off by default: an oracle's answers do not depend on it and runs are several times faster;
    crash tests and benchmarks that want etcd's durability pass ``fsync=True``. Starting again on the same
    ``workdir`` finds the data of the previous run. ``binary`` defaults to :func:`etcd_tool`. With
    ``metrics`` it also serves /metrics on a port of its own (:attr:`ServerProcess.metrics_url`). ``tls`` and
    ``client_tls``: see :func:`start_fastetcd`.
    """
    server_tls, client = _tls_choice(tls, client_tls)
    workdir = _workdir(workdir)
    endpoint = _endpoint(port)
    metrics_args, metrics_url = _metrics_args(metrics)
    argv = etcd_command(endpoint, free_port(), workdir / "etcd", name=name, fsync=fsync, log_level=log_level,
                        extra_args=[*metrics_args, *extra_args], binary=binary, tls=server_tls)
    server = spawn("etcd", argv, endpoint, workdir, workdir / "etcd.log", cwd=workdir)
    server.metrics_url = metrics_url
    server.client_tls = client
    if wait:
        _wait_or_kill(server, timeout)
    return server


# ----------------------------------------------------------------------------------------------------
# fastetcd


@dataclass(frozen=True)
class CosmosTarget:
    """A Cosmos DB account (for tests: the Cosmos test server) that fastetcd processes store their data in."""

    endpoint: str
    key: str
    database: str = "fastetcd-tests"


@dataclass(frozen=True)
class FastetcdDefaults:
    """What every fastetcd started by this module gets unless the call says otherwise.

    ``extra_args`` go on every fastetcd command line :func:`fastetcd_command` builds (before the caller's
    own extra args, so those win), e.g. a transport chosen by a pytest option. ``cosmos``, when set, is
    called on every :func:`start_fastetcd` that chooses no store, and that fastetcd then runs on the Cosmos
    store it returns.
    """

    extra_args: tuple[str, ...] = ()
    cosmos: Callable[[], CosmosTarget] | None = None

    @property
    def store(self) -> str:
        """"embedded" or "cosmos": the store of a fastetcd started without a choice of its own."""
        return "embedded" if self.cosmos is None else "cosmos"


_defaults = FastetcdDefaults()


def set_fastetcd_defaults(extra_args: Sequence[str] = (),
                          cosmos: Callable[[], CosmosTarget] | None = None) -> FastetcdDefaults:
    """Replace the process-wide :class:`FastetcdDefaults`; returns the previous ones (to restore)."""
    global _defaults
    previous = _defaults
    _defaults = FastetcdDefaults(tuple(extra_args), cosmos)
    return previous


def fastetcd_defaults() -> FastetcdDefaults:
    """The current process-wide :class:`FastetcdDefaults`."""
    return _defaults


def cosmos_container_for(workdir: Path) -> str:
    """The Cosmos container that stands in for a work dir: fresh for every new dir, the same on a restart.

    The readable part helps when reading the Cosmos server's log; the digest makes it unique (pytest's
    tmp dirs repeat names like "subject" in every test).
    """
    resolved = str(Path(workdir).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{Path(resolved).parent.name}-{Path(resolved).name}")
    return f"{readable[-60:].lstrip('-')}-{digest}"


def cosmos_args(target: CosmosTarget, container: str) -> list[str]:
    """fastetcd flags for a Cosmos container (the key travels in FASTETCD_COSMOS_KEY, never in argv)."""
    return [
        "--store", "cosmos",
        "--cosmos-endpoint", target.endpoint,
        "--cosmos-database", target.database,
        "--cosmos-container", container,
    ]  # fmt: skip


def fastetcd_env(pythonpath: Sequence[str | Path] | None = None,
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a fastetcd child process.

    This process's environment without inherited ``FASTETCD_*`` settings (they would change what is being
    tested), unbuffered output, and ``pythonpath`` in front of PYTHONPATH. By default that is the
    directory holding the ``fastetcd`` package this process imported, so the child runs the same code
    (installed, editable, or a checkout's ``src/`` with an in-place build). ``extra`` is added last.
    """
    if pythonpath is None:
        import fastetcd

        pythonpath = [Path(fastetcd.__file__).resolve().parents[1]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTETCD_")}
    parts = [str(p) for p in pythonpath]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def fastetcd_argv(*args: str, python: str | None = None) -> list[str]:
    """``python -m fastetcd <args>`` exactly as given: for testing the command line itself.

    Servers meant to serve should be started through :func:`fastetcd_command` / :func:`start_fastetcd`,
    which add the listen flags and the process-wide default args.
    """
    return [python or sys.executable, "-m", "fastetcd", *args]


def run_fastetcd(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0,
                 python: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fastetcd <args>`` to completion (a command, not a server: ``--version``,
    ``snapshot restore``, a bad flag) in :func:`fastetcd_env` plus ``env``; output captured as text."""
    return subprocess.run(fastetcd_argv(*args, python=python), capture_output=True, text=True,
                          env=fastetcd_env(extra=env), timeout=timeout)


def fastetcd_command(endpoint: str, data_dir: Path | None, *, name: str | None = "fe",
                     extra_args: Sequence[str] = (), python: str | None = None,
                     tls: ServerTls | None = None) -> list[str]:
    """The command line of a fastetcd serving clients on ``endpoint`` (``host:port``).

    The one place a serving fastetcd's command line is built: listen and advertise URLs, ``--name`` and
    ``--data-dir`` (either left out when None: the server's own defaults apply), then the process-wide
    :attr:`FastetcdDefaults.extra_args`, then ``extra_args``. With ``tls``: https:// URLs and its flags.
    """
    url = f"{'https' if tls is not None else 'http'}://{endpoint}"
    args: list[str] = []
    if name is not None:
        args += ["--name", name]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    args += ["--listen-client-urls", url, "--advertise-client-urls", url]
    if tls is not None:
        args += tls.args()
    return fastetcd_argv(*args, *_defaults.extra_args, *extra_args, python=python)


def start_fastetcd(workdir: Path, extra_args: Sequence[str] = (), *, port: int | None = None,
                   name: str | None = "fe", explicit_data_dir: bool = True,
                   cosmos: CosmosTarget | None = None, container: str | None = None,
                   python: str | None = None, pythonpath: Sequence[str | Path] | None = None,
                   metrics: bool = False, wait: bool = True, timeout: float = START_TIMEOUT_S,
                   tls: ServerTls | None | _Default = DEFAULT,
                   client_tls: ClientTls | None | _Default = DEFAULT) -> ServerProcess:
    """A fastetcd with its data in ``workdir/fastetcd`` and its log in ``workdir/fastetcd.log``.

    It runs in ``workdir``. With ``explicit_data_dir=False`` neither ``--name`` nor ``--data-dir`` is
    passed, so the server's defaults apply there (etcd's ``{name}.etcd``) unless ``extra_args`` set them.
    Starting again on the same ``workdir`` (and ``port``, if given) finds the previous run's data.

    The store: ``cosmos`` if given, else the process-wide default (:class:`FastetcdDefaults`) unless
    ``extra_args`` choose a store. On Cosmos the container is ``container`` or the one standing in for
    ``workdir`` (:func:`cosmos_container_for`). ``python`` and ``pythonpath`` choose the interpreter and
    the code it runs (see :func:`fastetcd_env`). With ``metrics`` it also serves /metrics on a port of
    its own (:attr:`ServerProcess.metrics_url`). With ``wait`` (default) this returns once the server
    answers a Range, and raises RuntimeError if it does not within ``timeout``.

    TLS: ``tls`` (the server's flags; https:// URLs) and ``client_tls`` (how the probe and the harness's
    clients reach it) default to the process-wide TLS of fastetcd.testing.tls, plain text unless set.
    """
    server_tls, client = _tls_choice(tls, client_tls)
    workdir = _workdir(workdir)
    endpoint = _endpoint(port)
    metrics_args, metrics_url = _metrics_args(metrics)
    extra: dict[str, str] = {}
    store_args: list[str] = []
    if cosmos is None and _defaults.cosmos is not None and "--store" not in extra_args:
        cosmos = _defaults.cosmos()
    if cosmos is not None:
        container = container or cosmos_container_for(workdir)
        store_args = cosmos_args(cosmos, container)
        extra["FASTETCD_COSMOS_KEY"] = cosmos.key
    argv = fastetcd_command(
        endpoint,
        workdir / "fastetcd" if explicit_data_dir else None,
        name=name if explicit_data_dir else None,
        extra_args=[*store_args, *metrics_args, *extra_args],
        python=python,
        tls=server_tls,
    )
    server = spawn("fastetcd", argv, endpoint, workdir, workdir / "fastetcd.log",
                   env=fastetcd_env(pythonpath, extra), cwd=workdir)
    server.metrics_url = metrics_url
    server.client_tls = client
    server.cosmos_container = container if cosmos is not None else None
    if wait:
        _wait_or_kill(server, timeout)
    return server


def start_server(kind: ServerKind, workdir: Path, extra_args: Sequence[str] = (),
                 **kwargs: object) -> ServerProcess:
    """:func:`start_etcd` or :func:`start_fastetcd` by ``kind``; keyword arguments go through."""
    if kind == "etcd":
        return start_etcd(workdir, extra_args, **kwargs)  # type: ignore[arg-type]
    if kind == "fastetcd":
        return start_fastetcd(workdir, extra_args, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown server kind {kind!r}")
