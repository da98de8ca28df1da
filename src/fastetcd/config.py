"""Server configuration: etcd's settings under etcd's names and defaults, plus the store choice.

``Config`` validates itself on construction and on ``validate()``; every problem is a ``ConfigError``
whose text is fit to show a user as is. Durations are plain seconds (floats); the Go duration syntax
etcd uses on its command line ("10m", "100ms") is parsed by ``parse_duration``.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field

from fastetcd.engine.auth_tokens import AuthOptionsError, parse_auth_token
from fastetcd.server.tls import TLSError, TLSInfo

GiB = 1024 * 1024 * 1024
DEFAULT_QUOTA_BACKEND_BYTES = 2 * GiB  # etcd's DefaultQuotaBytes, used when the flag is 0
DEFAULT_SNAPSHOT_COUNT = 100_000
DEFAULT_PROGRESS_NOTIFY_INTERVAL = 600.0
LOG_LEVELS = ("debug", "info", "warn", "error", "panic", "fatal")
STORES = ("embedded", "cosmos")
HA_MODES = ("auto", "on", "off")
TRANSPORTS = ("grpcio", "native")
COMPACTION_MODES = ("periodic", "revision")


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


# ----------------------------------------------------------------------------- Go durations

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([^\d.]+)")


def parse_duration(text: str) -> float:
    """Parse a Go ``time.Duration`` string ("1h30m", "100ms", "1.5s", "0") into seconds.

    Errors carry Go's wording, since that is what etcd users see for the same mistake.
    """
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ConfigError(f'time: invalid duration "{text}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            if re.fullmatch(r"\d+\.?\d*|\.\d+", s[pos:]):
                raise ConfigError(f'time: missing unit in duration "{text}"')
            raise ConfigError(f'time: invalid duration "{text}"')
        number, unit = m.groups()
        if unit not in _DURATION_UNITS:
            raise ConfigError(f'time: unknown unit "{unit}" in duration "{text}"')
        total += float(number) * _DURATION_UNITS[unit]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling of ``seconds`` for help texts and logs ("10m0s" style is not needed)."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= size and (seconds / size) == int(seconds / size):
            return f"{int(seconds / size)}{unit}"
    return f"{seconds}s"


# ----------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class URL:
    """A validated client/metrics URL. ``host`` is "" for "all interfaces" (``http://:2379``)."""

    scheme: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` as socket and gRPC bind APIs take it (IPv6 bracketed, "" → all interfaces)."""
        if not self.host:
            return f"[::]:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(raw: str) -> URL:
    """Parse ``http://host:port`` the way etcd's flag parser does, with etcd's error texts."""
    try:
        u = urllib.parse.urlsplit(raw)
    except ValueError as e:
        raise ConfigError(f"invalid URL {raw!r}: {e}") from None
    if u.scheme not in ("http", "https", "unix", "unixs"):
        raise ConfigError(f"URL scheme must be http, https, unix, or unixs: {raw}")
    if u.scheme not in ("http", "https"):
        raise ConfigError(f"URL scheme {u.scheme} is not supported yet (only http and https): {raw}")
    try:
        port = u.port
    except ValueError:
        port = None
    if port is None or not u.netloc.rpartition(":")[2].isdigit():
        raise ConfigError(f'URL address does not have the form "host:port": {raw}')
    if u.path:
        raise ConfigError(f"URL must not contain a path: {raw}")
    return URL(scheme=u.scheme, host=u.hostname or "", port=port)


# ----------------------------------------------------------------------------- Config


@dataclass
class Config:
    """All server settings. Field names are etcd's flag names in snake case."""

    name: str = "default"
    data_dir: str = ""  # "" means "{name}.etcd", etcd's default
    listen_client_urls: list[str] = field(default_factory=lambda: ["http://localhost:2379"])
    advertise_client_urls: list[str] = field(default_factory=lambda: ["http://localhost:2379"])
    listen_metrics_urls: list[str] = field(default_factory=list)
    max_request_bytes: int = 1_572_864
    max_txn_ops: int = 128
    # 0 means etcd's default (2 GiB); a negative value disables the quota, as in etcd.
    quota_backend_bytes: int = DEFAULT_QUOTA_BACKEND_BYTES
    snapshot_count: int = DEFAULT_SNAPSHOT_COUNT  # 0 means the default, as in etcd
    log_level: str = "info"
    store: str = "embedded"
    # The client port's HTTP/2 + gRPC implementation: grpcio, or libnghttp2 (server/native_transport.py).
    transport: str = "grpcio"
    # etcd's default is math.MaxUint32: no limit on the streams one client connection may open at a time.
    max_concurrent_streams: int = 2**32 - 1
    # fastetcd only (grpc-go's ConnectionTimeout, 120s there): how long a new client connection may take to
    # send its HTTP/2 preface and SETTINGS, or an HTTP/1 request head. Native transport; 0 disables it.
    handshake_timeout: float = 20.0
    auto_compaction_mode: str = "periodic"
    # periodic: a Go duration or a bare integer meaning hours; revision: a revision count; "0" = off.
    auto_compaction_retention: str = "0"
    # fastetcd only: how often revision-mode auto-compaction checks (etcd's is fixed at 5 minutes).
    auto_compaction_revision_interval: float = 300.0  # seconds
    experimental_watch_progress_notify_interval: float = DEFAULT_PROGRESS_NOTIFY_INTERVAL  # seconds
    # fastetcd only: several nodes over one store, one leader writing (engine/replica.py). "auto": on for
    # Cosmos DB (every node may share the container), off for the embedded store (one process per data dir).
    ha: str = "auto"
    # How long one renewal of leadership proves it (store/leadership.py's timing rule derives the rest):
    # a dead leader is replaced within about 1.1 x this.
    ha_lease: float = 5.0  # seconds
    cosmos_endpoint: str = ""
    # Secret: kept out of repr() and log_fields(). Empty means "use an Azure AD credential".
    cosmos_key: str = field(default="", repr=False)
    cosmos_database: str = "fastetcd"
    cosmos_container: str = "fastetcd"
    # etcd's: "simple", or "jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256,ttl=5m"
    auth_token: str = "simple"
    auth_token_ttl: int = 300  # seconds a simple token lives after its last use
    bcrypt_cost: int = 10  # bcrypt's cost for hashing user passwords (4..31)
    # TLS on https:// client and metrics URLs (etcd's client TLS flags; server/tls.py).
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    auto_tls: bool = False
    self_signed_cert_validity: int = 1  # years, for --auto-tls
    cipher_suites: list[str] = field(default_factory=list)  # Go's names; TLS 1.2 only, as in Go
    tls_min_version: str = "TLS1.2"
    tls_max_version: str = ""  # "": the highest the library has (TLS 1.3)

    @property
    def replicated(self) -> bool:
        """Whether this node runs as one of several over its store (a leader and followers)."""
        return self.ha == "on" or (self.ha == "auto" and self.store == "cosmos")

    def __post_init__(self) -> None:
        if not self.data_dir:
            self.data_dir = f"{self.name}.etcd"
        if self.quota_backend_bytes == 0:
            self.quota_backend_bytes = DEFAULT_QUOTA_BACKEND_BYTES
        if self.snapshot_count == 0:
            self.snapshot_count = DEFAULT_SNAPSHOT_COUNT
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first invalid setting."""
        for flag in ("listen_client_urls", "advertise_client_urls", "listen_metrics_urls"):
            for raw in getattr(self, flag):
                try:
                    parse_url(raw)
                except ConfigError as e:
                    raise ConfigError(f"--{_flag(flag)}: {e}") from None
        if not self.listen_client_urls:
            raise ConfigError("--listen-client-urls: at least one URL is required")
        for flag in ("max_request_bytes", "max_txn_ops"):
            if getattr(self, flag) <= 0:
                raise ConfigError(f"--{_flag(flag)} must be positive, got {getattr(self, flag)}")
        if not 0 < self.max_concurrent_streams <= 2**32 - 1:
            raise ConfigError(
                f"--max-concurrent-streams must be in 1..4294967295, got {self.max_concurrent_streams}"
            )
        if self.handshake_timeout < 0:
            raise ConfigError("--handshake-timeout must not be negative")
        if self.snapshot_count < 0:
            raise ConfigError(f"--snapshot-count must not be negative, got {self.snapshot_count}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level: unrecognized level {self.log_level!r} (use {'|'.join(LOG_LEVELS)})"
            )
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"--transport: unknown transport {self.transport!r} (use {'|'.join(TRANSPORTS)})"
            )
        if self.store not in STORES:
            raise ConfigError(f"--store: unknown store {self.store!r} (use {'|'.join(STORES)})")
        if self.auto_compaction_mode not in COMPACTION_MODES:
            raise ConfigError(f'unknown auto-compaction-mode "{self.auto_compaction_mode}"')
        self._compaction_retention()  # raises if unparsable
        if self.experimental_watch_progress_notify_interval < 0:
            raise ConfigError("--experimental-watch-progress-notify-interval must not be negative")
        try:
            kind, opts = parse_auth_token(self.auth_token)
        except AuthOptionsError as e:
            raise ConfigError(f"--auth-token: {e}") from None
        if kind == "jwt" and opts.get("ttl"):
            try:
                parse_duration(opts["ttl"])
            except ConfigError as e:
                raise ConfigError(f"--auth-token: jwt ttl: {e}") from None
        if self.auth_token_ttl < 0:
            raise ConfigError(f"--auth-token-ttl must not be negative, got {self.auth_token_ttl}")
        if self.bcrypt_cost < 0:
            raise ConfigError(f"--bcrypt-cost must not be negative, got {self.bcrypt_cost}")
        self._validate_tls()
        if not 0.1 <= self.ha_lease <= 600:
            raise ConfigError(f"--ha-lease: {self.ha_lease}s is outside 100ms..10m")
        if self.ha not in HA_MODES:
            raise ConfigError(f"--ha: unknown mode {self.ha!r} (use {'|'.join(HA_MODES)})")
        if self.store == "cosmos" and not self.cosmos_endpoint:
            raise ConfigError("--store cosmos needs --cosmos-endpoint")
        if self.store == "cosmos" and not (self.cosmos_database and self.cosmos_container):
            raise ConfigError("--store cosmos needs --cosmos-database and --cosmos-container")

    def _validate_tls(self) -> None:
        try:
            self.tls_info().validate()
        except TLSError as e:
            raise ConfigError(str(e)) from None
        if self.self_signed_cert_validity <= 0:
            raise ConfigError("--self-signed-cert-validity must be positive")
        has_tls = bool(self.cert_file or self.auto_tls)
        for kind, flag in (("client", "listen_client_urls"), ("metrics", "listen_metrics_urls")):
            for raw in getattr(self, flag):
                if parse_url(raw).scheme == "https" and not has_tls:
                    # etcd's text (--auto-tls also satisfies it, as in etcd)
                    raise ConfigError(
                        f"TLS key/cert (--cert-file, --key-file) must be provided for {kind} url {raw} "
                        "with HTTPS scheme"
                    )
        if self.transport == "grpcio" and any(u.scheme == "https" for u in self.client_urls):
            # grpcio's Python API cannot bound the TLS versions (its floor is TLS 1.2, its ceiling 1.3).
            if self.tls_min_version == "TLS1.3" or self.tls_max_version == "TLS1.2":
                raise ConfigError(
                    "--tls-min-version TLS1.3 and --tls-max-version TLS1.2 need --transport native: "
                    "grpcio serves TLS 1.2 and 1.3 and cannot be limited to one"
                )

    def tls_info(self, cert_file: str | None = None, key_file: str | None = None) -> TLSInfo:
        """The client TLS settings (also the metrics listener's, as in etcd). ``cert_file`` and
        ``key_file`` override the flags (--auto-tls's generated pair)."""
        return TLSInfo(
            cert_file=self.cert_file if cert_file is None else cert_file,
            key_file=self.key_file if key_file is None else key_file,
            trusted_ca_file=self.trusted_ca_file,
            client_cert_auth=self.client_cert_auth,
            cipher_suites=tuple(self.cipher_suites),
            min_version=self.tls_min_version,
            max_version=self.tls_max_version,
        )

    # --- parsed views -----------------------------------------------------------------------

    @property
    def client_urls(self) -> list[URL]:
        return [parse_url(u) for u in self.listen_client_urls]

    @property
    def metrics_urls(self) -> list[URL]:
        return [parse_url(u) for u in self.listen_metrics_urls]

    @property
    def auto_compaction_period(self) -> float:
        """Seconds of history periodic auto-compaction keeps; 0.0 when off or in revision mode."""
        value = self._compaction_retention()
        return float(value) if self.auto_compaction_mode == "periodic" else 0.0

    @property
    def auto_compaction_revisions(self) -> int:
        """Revisions revision-mode auto-compaction keeps; 0 when off or in periodic mode."""
        value = self._compaction_retention()
        return int(value) if self.auto_compaction_mode == "revision" else 0

    @property
    def auth_token_options(self) -> tuple[str, dict[str, str], float]:
        """--auth-token as (type, its options, a jwt token's lifetime in seconds; 0 for the default)."""
        kind, opts = parse_auth_token(self.auth_token)
        return kind, opts, parse_duration(opts["ttl"]) if opts.get("ttl") else 0.0

    def _compaction_retention(self) -> float:
        text = self.auto_compaction_retention.strip()
        # etcd: a bare non-negative integer is hours (periodic) or revisions (revision); else a duration.
        if text.isdigit():
            n = int(text)
            return n * 3600.0 if self.auto_compaction_mode == "periodic" else float(n)
        if self.auto_compaction_mode == "revision":
            raise ConfigError(f"error parsing CompactionRetention: {text!r} is not a revision count")
        try:
            seconds = parse_duration(text)
        except ConfigError as e:
            raise ConfigError(f"error parsing CompactionRetention: {e}") from None
        if seconds < 0:
            raise ConfigError(f"error parsing CompactionRetention: negative duration {text!r}")
        return seconds

    def log_fields(self) -> dict[str, object]:
        """The settings as log fields (etcd's hyphenated names), secrets masked."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "cosmos_key":
                value = "(set)" if value else ""
            out[_flag(f.name)] = value
        # "name" is reserved by logging.LogRecord, so it cannot travel in ``extra``.
        out["member-name"] = out.pop("name")
        return out


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")
