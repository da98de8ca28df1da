"""The ``fastetcd`` command: etcd's flags (or FASTETCD_* environment variables) → Config → serve.

Exit codes: 0 after a clean shutdown on SIGINT/SIGTERM, 1 when the server cannot start or fails
(unusable data dir, port in use), 2 for a bad flag or value.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from fastetcd import ETCD_COMPAT_VERSION, __commit_id__, __version__
from fastetcd.config import (
    COMPACTION_MODES,
    LOG_LEVELS,
    STORES,
    TRANSPORTS,
    Config,
    ConfigError,
    format_duration,
    parse_duration,
)
from fastetcd.log import setup_logging
from fastetcd.store.base import StoreError

ENV_PREFIX = "FASTETCD_"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_log = logging.getLogger(__name__)


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError("parse error: not an integer") from None


def _parse_urls(text: str) -> list[str]:
    # etcd takes URL lists comma-separated in one flag value.
    return [u.strip() for u in text.split(",") if u.strip()]


def _parse_str(text: str) -> str:
    return text


def _parse_bool(text: str) -> bool:
    # Go's strconv.ParseBool, which etcd's boolean flags use.
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConfigError("parse error: not a boolean")


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class _Option:
    flag: str  # without the leading dashes, exactly etcd's spelling
    parse: Callable[[str], Any]
    help: str
    default_text: str | None = None  # what --help shows when the Config default needs explaining
    secret: bool = False

    @property
    def field(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")


_OPTIONS: tuple[_Option, ...] = (
    _Option("name", _parse_str, "Human-readable name for this member."),
    _Option("data-dir", _parse_str, "Path to the data directory.", default_text="${name}.etcd"),
    _Option(
        "listen-client-urls", _parse_urls, "List of URLs to listen on for client traffic (comma-separated)."
    ),
    _Option(
        "advertise-client-urls",
        _parse_urls,
        "List of this member's client URLs to advertise to the public. Required when "
        "--listen-client-urls is set.",
    ),
    _Option(
        "listen-metrics-urls",
        _parse_urls,
        "List of URLs to listen on for the metrics and health endpoints.",
        default_text="",
    ),
    _Option("max-request-bytes", _parse_int, "Maximum client request size in bytes the server will accept."),
    _Option("max-txn-ops", _parse_int, "Maximum number of operations permitted in a transaction."),
    _Option(
        "quota-backend-bytes",
        _parse_int,
        "Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB, negative disables).",
        default_text="0",
    ),
    _Option(
        "snapshot-count",
        _parse_int,
        "Number of committed transactions to trigger a snapshot to disk (bounds the log replayed at start).",
    ),
    _Option("log-level", _parse_str, f"Configures log level: {', '.join(LOG_LEVELS)}."),
    _Option(
        "auto-compaction-mode",
        _parse_str,
        f"Interpret 'auto-compaction-retention' one of: {'|'.join(COMPACTION_MODES)}. 'periodic' for "
        "duration based retention, defaulting to hours if no time unit is provided (e.g. '5m'). "
        "'revision' for revision number based retention.",
    ),
    _Option(
        "auto-compaction-retention",
        _parse_str,
        "Auto compaction retention length. 0 means disable auto compaction.",
    ),
    _Option(
        "auto-compaction-revision-interval",
        parse_duration,
        "fastetcd only: how often 'revision' mode auto compaction runs (etcd's fixed interval is 5m).",
    ),
    _Option(
        "experimental-watch-progress-notify-interval",
        parse_duration,
        "Duration of periodical watch progress notification (Go duration, e.g. 10m, 100ms).",
    ),
    _Option(
        "max-concurrent-streams",
        _parse_int,
        "Maximum concurrent streams that each client can open at a time.",
    ),
    _Option(
        "handshake-timeout",
        parse_duration,
        "fastetcd only, native transport: time a new client connection has to send the HTTP/2 preface and "
        "SETTINGS (or an HTTP/1 request head) before it is closed; 0 disables it.",
    ),
    _Option("store", _parse_str, f"Where data lives: {' or '.join(STORES)}."),
    _Option(
        "transport",
        _parse_str,
        f"Client port's HTTP/2 + gRPC implementation: {' or '.join(TRANSPORTS)} (native: libnghttp2, "
        "which also answers HTTP/1.1 /health and /version on the client port).",
    ),
    _Option(
        "ha",
        _parse_str,
        "fastetcd only: run as one of several nodes over one store, one leader writing and the others "
        "following (auto: on with --store cosmos; on: also several processes over one --data-dir; off).",
    ),
    _Option(
        "ha-lease",
        parse_duration,
        "fastetcd only: how long one renewal proves leadership (Go duration); a dead leader is replaced "
        "within about 1.1x this, and a cut-off leader stops serving a tenth of it earlier.",
    ),
    _Option(
        "cosmos-endpoint",
        _parse_str,
        "Azure Cosmos DB account endpoint (with --store cosmos).",
        default_text="",
    ),
    _Option(
        "cosmos-key",
        _parse_str,
        "Azure Cosmos DB account key; empty uses an Azure AD credential. Prefer the environment variable.",
        default_text="",
        secret=True,
    ),
    _Option("cosmos-database", _parse_str, "Azure Cosmos DB database name."),
    _Option("cosmos-container", _parse_str, "Azure Cosmos DB container name."),
    _Option(
        "auth-token",
        _parse_str,
        "Specify auth token specific options: 'simple', or "
        "'jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256,ttl=5m' (sign-method: RS/PS/ES/HS 256/384/512).",
    ),
    _Option("auth-token-ttl", _parse_int, "The lifetime in seconds of the auth token (simple tokens)."),
    _Option("bcrypt-cost", _parse_int, "Specify bcrypt algorithm cost factor for auth password hashing."),
    # Security: etcd's client TLS flags (they also cover https:// metrics URLs, as in etcd).
    _Option("cert-file", _parse_str, "Path to the client server TLS cert file.", default_text=""),
    _Option("key-file", _parse_str, "Path to the client server TLS key file.", default_text=""),
    _Option("trusted-ca-file", _parse_str, "Path to the client server TLS trusted CA cert file "
            "(clients must then present a certificate it signed).", default_text=""),
    _Option("client-cert-auth", _parse_bool, "Enable client cert authentication (the certificate's CN "
            "identifies the user).", default_text="false"),
    _Option("auto-tls", _parse_bool, "Client TLS using generated certificates (self-signed, kept in "
            "<data-dir>/fixtures/client).", default_text="false"),
    _Option("self-signed-cert-validity", _parse_int, "The validity period of the --auto-tls certificate, "
            "in years."),
    _Option("cipher-suites", _parse_list, "Comma-separated list of supported TLS cipher suites (Go's "
            "names; TLS 1.2 only; empty: the library's defaults).", default_text=""),
    _Option("tls-min-version", _parse_str, "Minimum TLS version supported: TLS1.2 or TLS1.3."),
    _Option("tls-max-version", _parse_str, "Maximum TLS version supported: TLS1.2 or TLS1.3 (empty: the "
            "highest available).", default_text=""),
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the line is what a user or a supervisor log needs.
        raise _UsageError(message)


def _default_text(opt: _Option, defaults: Config) -> str:
    if opt.default_text is not None:
        return opt.default_text
    value = getattr(defaults, opt.field)
    if isinstance(value, list):
        return ",".join(value)
    if opt.parse is parse_duration:
        return format_duration(value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = _Parser(
        prog="fastetcd",
        description=(
            "fastetcd: an etcd v3.5 API server (gRPC, byte-compatible with etcd clients and etcdctl) with a "
            "compiled MVCC core and an embedded durable store.\n\n"
            f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> "
            "(upper case, '-' → '_'), e.g. FASTETCD_DATA_DIR; a flag on the command line wins over the "
            "environment."
        ),
        epilog=(
            "examples:\n"
            "  fastetcd                                   serve on localhost:2379, data in ./default.etcd\n"
            "  fastetcd --data-dir /var/lib/fastetcd \\\n"
            "      --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://10.0.0.5:2379"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for opt in _OPTIONS:
        # A boolean flag alone means true (Go's flag package: --client-cert-auth, --auto-tls=false).
        is_bool = opt.parse is _parse_bool
        flag_kw: dict[str, Any] = {"nargs": "?", "const": "true"} if is_bool else {}
        parser.add_argument(
            f"--{opt.flag}",
            dest=opt.field,
            default=None,
            metavar="BOOL" if is_bool else opt.flag.rsplit("-", 1)[-1].upper(),
            help=f"{opt.help} [default: '{_default_text(opt, defaults)}'; env {opt.env}]",
            **flag_kw,
        )
    parser.add_argument("--version", action="store_true", help="Print the version and exit.")
    return parser


def git_sha() -> str:
    """The commit fastetcd was built from, as etcd prints it; "N/A" for a release built from an sdist."""
    if __commit_id__:
        return __commit_id__.removeprefix("g")[:9]  # setuptools-scm's git node is "g" + the hash
    # Built from an sdist (a wheel from `python -m build`): no git, but a dev version carries "+g<hash>".
    m = re.search(r"\+g([0-9a-f]{7,})", __version__)
    return m.group(1)[:9] if m else "N/A"


def version_text() -> str:
    # etcd's layout (etcd --version): the version from git tags (setuptools-scm), then the commit.
    return (
        f"fastetcd Version: {__version__}\n"
        f"Git SHA: {git_sha()}\n"
        f"etcd API Version: {ETCD_COMPAT_VERSION}\n"
        f"Python Version: {platform.python_version()}\n"
        f"OS/Arch: {sys.platform}/{platform.machine()}"
    )


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Config | None, list[str]]:
    """Flags + environment → Config (None when --version was asked) and warnings to log.

    Raises ConfigError / _UsageError with a user-facing message.
    """
    ns = build_parser().parse_args(list(argv))
    if ns.version:
        return None, []
    warnings: list[str] = []
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    known_env = {opt.env for opt in _OPTIONS}
    for opt in _OPTIONS:
        raw = getattr(ns, opt.field)
        source = f"flag --{opt.flag}"
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], f"environment variable {opt.env}"
        elif raw is not None and opt.env in environ:
            warnings.append(f"environment variable {opt.env} is shadowed by flag --{opt.flag}")
        if raw is None:
            continue
        try:
            values[opt.field] = opt.parse(raw)
        except ConfigError as e:
            shown = "***" if opt.secret else raw
            raise ConfigError(f'invalid value "{shown}" for {source}: {e}') from None
        explicit.add(opt.flag)
    for key in environ:
        if key.startswith(ENV_PREFIX) and key not in known_env:
            warnings.append(f"unrecognized environment variable {key}")
    # etcd refuses this combination: clients would be told to connect to the default localhost URL.
    if "listen-client-urls" in explicit and "advertise-client-urls" not in explicit:
        raise ConfigError("--advertise-client-urls is required when --listen-client-urls is set explicitly")
    return Config(**values), warnings


def snapshot_main(argv: Sequence[str]) -> int:
    """``fastetcd snapshot restore FILE [--data-dir DIR] [--name NAME]`` (etcd's ``snapshot restore``)."""
    parser = argparse.ArgumentParser(prog="fastetcd snapshot", description="Restore a snapshot.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("restore", help="create a data dir from a snapshot saved with etcdctl snapshot save")
    p.add_argument("file")
    p.add_argument("--name", default="default", help="member name; the data dir defaults to NAME.etcd")
    p.add_argument("--data-dir", default=None, help="the new data dir (must not exist, or be empty)")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from fastetcd.snapshot_restore import RestoreError, restore  # late: needs the store built

    data_dir = ns.data_dir or f"{ns.name}.etcd"
    try:
        snap = restore(ns.file, data_dir)
    except RestoreError as e:
        print(f"fastetcd: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"restored snapshot at revision {snap.revision} into {data_dir}")
    return EXIT_OK


def import_main(argv: Sequence[str]) -> int:
    """``fastetcd import SOURCE --data-dir DIR``: a new data dir from an etcd v3 backend."""
    parser = argparse.ArgumentParser(
        prog="fastetcd import",
        description="Create a fastetcd data dir from etcd: a file saved with 'etcdctl snapshot save', or a "
        "stopped etcd's member/snap/db (or its data dir).",
    )
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("--data-dir", required=True, help="the new data dir (must not exist, or be empty)")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from fastetcd.engine.alarms import NAMES as ALARM_NAMES
    from fastetcd.etcd_import import EtcdImportError, import_etcd  # late: needs the core built

    try:
        r = import_etcd(ns.source, ns.data_dir)
    except EtcdImportError as e:
        print(f"fastetcd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"imported etcd at revision {r.revision} (compact revision {r.compact_rev}, {r.keys} keys, "
        f"{r.versions} versions, {r.leases} leases) into {ns.data_dir}"
    )
    if r.alarms:
        names = ", ".join(f"{ALARM_NAMES.get(a, a)} (member {m:x})" for m, a in r.alarms)
        print(f"active alarms carried over: {names}; disarm with etcdctl alarm disarm", file=sys.stderr)
    if r.users or r.roles or r.auth_enabled:
        print(f"users: {r.users}, roles: {r.roles}, auth {'enabled' if r.auth_enabled else 'disabled'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["snapshot"]:
        return snapshot_main(argv[1:])
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    try:
        config, warnings = parse_config(argv, os.environ)
    except (ConfigError, _UsageError) as e:
        print(f"fastetcd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    if config is None:
        print(version_text())
        return EXIT_OK

    setup_logging(config.log_level)
    for w in warnings:
        _log.warning(w)
    _log.info(
        "starting fastetcd",
        extra={
            "fastetcd-version": __version__,
            "etcd-api-version": ETCD_COMPAT_VERSION,
            "python-version": platform.python_version(),
            **config.log_fields(),
        },
    )
    return run(config)


def run(config: Config) -> int:
    """Serve ``config`` until SIGINT/SIGTERM; returns the exit code."""
    if config.log_level != "debug":
        # gRPC's C core writes plain-text lines straight to stderr, breaking the one-JSON-object-per-line
        # stream; what it reports (a failed bind, say) reaches us as exceptions anyway. An explicit
        # GRPC_VERBOSITY still wins. Must happen before grpc is first imported.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if config.cipher_suites and config.transport == "grpcio":
        # grpcio takes its TLS 1.2 cipher list only from this variable, read once when grpc starts.
        from fastetcd.server.tls import openssl_ciphers

        os.environ["GRPC_SSL_CIPHER_SUITES"] = openssl_ciphers(config.cipher_suites)
    from fastetcd.app import serve  # late: --help and flag errors must not need the server built

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve_until_signalled(serve, config))
    except (StoreError, OSError) as e:
        print(f"fastetcd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        return 130
    except Exception:
        _log.critical("fastetcd stopped on an unexpected error", exc_info=True)
        return EXIT_FAILURE
    _log.info("fastetcd stopped")
    return EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve_until_signalled(
    serve: Callable[[Config, asyncio.Event], Coroutine[Any, Any, None]], config: Config
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            # A second signal means the graceful path is stuck; acknowledged writes are already durable.
            _log.warning("received second signal, exiting immediately", extra={"signal": sig.name})
            logging.shutdown()
            os._exit(EXIT_FAILURE)
        _log.info("received signal, shutting down", extra={"signal": sig.name})
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await serve(config, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
