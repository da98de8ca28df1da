"""TLS for the client and metrics listeners: etcd's TLS flags → SSL contexts, reloaded when files change.

One job: from etcd's ``--cert-file``, ``--key-file``, ``--trusted-ca-file``, ``--client-cert-auth``,
``--cipher-suites`` and ``--tls-min-version`` / ``--tls-max-version`` (``TLSInfo``), build what the
transports serve with, and notice certificates replaced on disk. etcd reads its certificate per handshake
(``GetCertificate``), so a renewed certificate is served to new connections without a restart; here
every handshake stats the files (cheap) and a change rebuilds the contexts once:

- asyncio listeners (native transport, metrics) get a context whose SNI callback, which OpenSSL runs
  early in every handshake, swaps in the newest context (``SSLObject.context``);
- grpcio's certificate-configuration fetcher (grpc_transport.py) asks ``ServerTLS.refresh_pem``.

etcd's rules kept here: a trusted CA file or ``--client-cert-auth`` makes a client certificate signed by
that CA (by the system's CAs without a CA file) required at the handshake; TLS 1.2 is the default floor;
``--cipher-suites`` takes Go's names and limits TLS 1.2 only (Go does not let TLS 1.3's be chosen).
``--auto-tls`` is ``self_cert``: a self-signed certificate, kept in the data dir as etcd keeps its own.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TLSError(ValueError):
    """A TLS setting or file is unusable; the message says which, in etcd's words where etcd has them."""


# Go's crypto/tls names (what etcd's --cipher-suites takes) → OpenSSL's names. Go 1.16 spells the
# ChaCha20 suites both ways; OpenSSL 3 no longer has RC4, so those fail when the context is built.
GO_CIPHER_SUITES: dict[str, str] = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}

# etcd's --tls-min-version / --tls-max-version values; "" lets the library choose (max: TLS 1.3).
TLS_VERSIONS: dict[str, ssl.TLSVersion | None] = {
    "": None,
    "TLS1.2": ssl.TLSVersion.TLSv1_2,
    "TLS1.3": ssl.TLSVersion.TLSv1_3,
}

ALPN_GRPC = ("h2", "http/1.1")  # the client port: gRPC, and HTTP/1 endpoints over the same TLS port
ALPN_HTTP1 = ("http/1.1",)  # the metrics listener (h11)


def openssl_ciphers(go_names: Sequence[str]) -> str:
    """``--cipher-suites`` (Go's names) as an OpenSSL cipher list; etcd's error for an unknown name."""
    out = []
    for name in go_names:
        if name not in GO_CIPHER_SUITES:
            raise TLSError(f'unexpected TLS cipher suite "{name}"')
        out.append(GO_CIPHER_SUITES[name])
    return ":".join(dict.fromkeys(out))


def tls_version(value: str) -> ssl.TLSVersion | None:
    if value not in TLS_VERSIONS:
        raise TLSError(f'unexpected TLS version "{value}" (must be one of: TLS1.2, TLS1.3)')
    return TLS_VERSIONS[value]


@dataclass(frozen=True)
class TLSInfo:
    """etcd's client ``transport.TLSInfo``: the files and options one set of listeners serves with."""

    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    cipher_suites: tuple[str, ...] = ()
    min_version: str = "TLS1.2"
    max_version: str = ""

    @property
    def empty(self) -> bool:
        return not self.cert_file and not self.key_file

    @property
    def requires_client_cert(self) -> bool:
        """etcd's ServerConfig: a CA file or --client-cert-auth means RequireAndVerifyClientCert."""
        return bool(self.trusted_ca_file) or self.client_cert_auth

    def validate(self) -> None:
        """Check the options (not the files): etcd's checks and texts."""
        if bool(self.cert_file) != bool(self.key_file):
            raise TLSError("--cert-file and --key-file must be given together")
        openssl_ciphers(self.cipher_suites)
        low, high = tls_version(self.min_version), tls_version(self.max_version)
        if low is not None and high is not None and low > high:
            raise TLSError(
                f"min version ({self.min_version}) is greater than max version ({self.max_version})"
            )
        if low == ssl.TLSVersion.TLSv1_3 and self.cipher_suites:
            raise TLSError("cipher suites cannot be configured when only TLS1.3 is enabled")


@dataclass(frozen=True)
class PemFiles:
    """The PEM bytes a grpcio server takes (it cannot read files itself)."""

    cert_chain: bytes
    private_key: bytes
    root_certificates: bytes | None


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    # Inode, size and ns mtime: a file replaced by rename (certbot, cert-manager, kubelet's atomic
    # writer) gets a new inode even within one mtime tick.
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _system_ca_pem() -> bytes | None:
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            return Path(path).read_bytes()
    return None


class ServerTLS:
    """The serving side of one ``TLSInfo``: SSL contexts and PEM bytes, rebuilt when a file changes.

    Built at start-up, where an unreadable file or a key that does not match its certificate is a
    ``TLSError``. Later a change that cannot be loaded (a half-written renewal, say) is logged and the
    previous certificate kept; the next handshake tries again.
    """

    def __init__(self, info: TLSInfo) -> None:
        info.validate()
        if info.empty:
            raise TLSError("TLS needs --cert-file and --key-file (or --auto-tls)")
        self.info = info
        self._lock = threading.Lock()  # grpcio's fetcher runs on grpc's threads, SNI on the event loop
        self._generation = 0
        self._stamps = self._file_stamps()
        self._pem = self._read_pem()
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._context(ALPN_GRPC)  # raises TLSError now if the files are unusable

    @property
    def generation(self) -> int:
        """Bumped every time changed files were loaded (grpcio's fetcher compares it)."""
        return self._generation

    def _file_stamps(self) -> tuple[object, ...]:
        return tuple(_stamp(p) for p in (self.info.cert_file, self.info.key_file, self.info.trusted_ca_file))

    def _read_pem(self) -> PemFiles:
        info = self.info
        try:
            cert = Path(info.cert_file).read_bytes()
            key = Path(info.key_file).read_bytes()
            ca = Path(info.trusted_ca_file).read_bytes() if info.trusted_ca_file else None
        except OSError as e:
            raise TLSError(f"cannot read TLS file: {e}") from None
        if ca is None and info.requires_client_cert:
            ca = _system_ca_pem()  # Go verifies client certificates against the system pool then
        return PemFiles(cert, key, ca)

    def _build(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        info = self.info
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        low, high = tls_version(info.min_version), tls_version(info.max_version)
        ctx.minimum_version = low or ssl.TLSVersion.TLSv1_2
        if high is not None:
            ctx.maximum_version = high
        if info.cipher_suites:
            try:
                ctx.set_ciphers(openssl_ciphers(info.cipher_suites))
            except ssl.SSLError as e:
                raise TLSError(f"--cipher-suites: none of the suites is available here ({e})") from None
        try:
            ctx.load_cert_chain(info.cert_file, info.key_file)
        except (OSError, ssl.SSLError) as e:
            raise TLSError(
                f"cannot load --cert-file {info.cert_file} / --key-file {info.key_file}: {e}"
            ) from None
        if info.requires_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                if info.trusted_ca_file:
                    ctx.load_verify_locations(cafile=info.trusted_ca_file)
                else:
                    ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
            except (OSError, ssl.SSLError) as e:
                raise TLSError(f"cannot load --trusted-ca-file {info.trusted_ca_file}: {e}") from None
        ctx.set_alpn_protocols(list(alpn))
        return ctx

    def _context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = self._contexts[alpn] = self._build(alpn)
        return ctx

    def refresh(self) -> bool:
        """Reload if a file changed since the last load; True when something new was loaded."""
        stamps = self._file_stamps()
        if stamps == self._stamps:
            return False
        with self._lock:
            if stamps == self._stamps:
                return False
            try:
                pem = self._read_pem()
                fresh = {alpn: self._build(alpn) for alpn in (self._contexts or {ALPN_GRPC: None})}
            except TLSError as e:
                log.warning("TLS files changed but cannot be loaded; still serving the previous ones",
                            extra={"error": str(e)})
                return False
            self._stamps, self._pem, self._contexts = stamps, pem, fresh
            self._generation += 1
        log.info("reloaded TLS certificate", extra={"cert-file": self.info.cert_file})
        return True

    def pem(self) -> PemFiles:
        """The current PEM bytes (after ``refresh``)."""
        return self._pem

    def server_context(self, alpn: tuple[str, ...] = ALPN_GRPC) -> ssl.SSLContext:
        """A context for ``loop.create_server(ssl=...)`` that serves the newest files to every handshake."""
        base = self._context(alpn)

        def on_hello(obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
            # OpenSSL calls this on every ClientHello, with or without SNI, before the certificate is
            # chosen: the place to put the newest context under this connection.
            self.refresh()
            newest = self._context(alpn)
            if obj.context is not newest:
                obj.context = newest

        base.sni_callback = on_hello
        return base


def common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (``getpeercert()``), or None."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def self_cert(directory: str | Path, hosts: Sequence[str], validity_years: int = 1) -> tuple[str, str]:
    """etcd's ``transport.SelfCert`` for ``--auto-tls``: (cert file, key file) in ``directory``.

    As etcd, an existing pair there is used again, else a self-signed ECDSA P-256 certificate is made for
    ``hosts`` (IP addresses and DNS names; it is its own CA, so a client can trust it by that file).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.is_file() and key_path.is_file():
        return str(cert_path.resolve()), str(key_path.resolve())
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "etcd")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * validity_years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=True,
                          content_commitment=False, data_encipherment=False, key_agreement=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path.resolve()), str(key_path.resolve())
