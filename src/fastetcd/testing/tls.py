"""TLS for test servers and clients: a throwaway PKI, the server flags, and the client side of it.

``make_pki(dir)`` writes a CA, a server certificate for 127.0.0.1/localhost and client certificates (a
good one, one from another CA, an expired one) as PEM files. ``ServerTls`` is the flags a server (fastetcd
or etcd: they take the same ones) serves with; ``ClientTls`` is what a client presents and trusts, as
grpcio channel credentials or etcdctl flags.

A process-wide default (``set_default_tls``) makes every server :mod:`fastetcd.testing` starts, and every
client it builds (``channel``, ``range_answers``, ``run_etcdctl``), use TLS unless the call chooses
otherwise: that is how a whole suite runs once over TLS (the tests' ``--tls`` option)::

    pki = make_pki(tmp / "pki")
    set_default_tls(pki.server_tls(), pki.client_tls())
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import grpc


class _Default:
    """The marker for "use the process-wide default" (None means "no TLS" and must stay expressible)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts and presents. ``insecure_skip_verify`` trusts whatever the server serves
    (etcdctl's --insecure-skip-tls-verify; for grpcio, the certificate fetched from the server)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure_skip_verify: bool = False

    def etcdctl_flags(self) -> list[str]:
        flags = []
        if self.ca is not None:
            flags.append(f"--cacert={self.ca}")
        if self.cert is not None:
            flags += [f"--cert={self.cert}", f"--key={self.key}"]
        if self.insecure_skip_verify:
            # etcdctl applies the skip only to a TLS config it made: without certificate flags, only when
            # told not to use its default "insecure transport" (then it makes an empty one).
            flags += ["--insecure-transport=false", "--insecure-skip-tls-verify"]
        return flags

    def grpc_credentials(self, endpoint: str) -> grpc.ChannelCredentials:
        import grpc

        root = self.ca.read_bytes() if self.ca is not None else None
        if self.insecure_skip_verify:
            host, _, port = endpoint.rpartition(":")
            root = ssl.get_server_certificate((host, int(port)), timeout=5).encode()
        key = self.key.read_bytes() if self.key is not None else None
        chain = self.cert.read_bytes() if self.cert is not None else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


@dataclass(frozen=True)
class ServerTls:
    """etcd's client TLS flags for a server (fastetcd and etcd take the same ones)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_cert_auth: bool = False
    extra_args: tuple[str, ...] = ()  # e.g. ("--auto-tls",), ("--cipher-suites", "...")

    def args(self) -> list[str]:
        out: list[str] = []
        if self.cert is not None:
            out += ["--cert-file", str(self.cert), "--key-file", str(self.key)]
        if self.ca is not None:
            out += ["--trusted-ca-file", str(self.ca)]
        if self.client_cert_auth:
            out.append("--client-cert-auth")
        return out + list(self.extra_args)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True)
class TestPki:
    """PEM files under ``directory``: ``ca`` signs ``server`` and ``client``; ``other_ca`` signs
    ``foreign_client``; ``expired_client`` is signed by ``ca`` but no longer valid."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca: Path
    ca_key: Path
    server: CertFiles
    client: CertFiles
    other_ca: Path
    foreign_client: CertFiles
    expired_client: CertFiles
    extra: dict[str, CertFiles] = field(default_factory=dict)

    def server_tls(self, client_cert_auth: bool = True) -> ServerTls:
        return ServerTls(self.server.cert, self.server.key, self.ca if client_cert_auth else None,
                         client_cert_auth)

    def client_tls(self, cert: CertFiles | None = None, *, with_cert: bool = True) -> ClientTls:
        chosen = (cert or self.client) if with_cert else None
        return ClientTls(self.ca, chosen.cert if chosen else None, chosen.key if chosen else None)

    def issue(self, name: str, common_name: str, *, server: bool = False,
              hosts: Sequence[str] = ("127.0.0.1", "localhost"), valid_days: float = 30,
              not_before_days: float = -1) -> CertFiles:
        """Another certificate signed by ``ca`` (``name``.pem / ``name``-key.pem; overwritten in place
        by a later call with the same name, for reload tests)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        return _issue(self.directory, name, common_name, ca_cert, ca_key, server=server, hosts=hosts,
                      valid_days=valid_days, not_before_days=not_before_days)


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(directory: Path, name: str) -> tuple[Any, Any, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert, key, cert_path, key_path


def _issue(directory: Path, name: str, common_name: str, ca_cert: Any, ca_key: Any, *, server: bool,
           hosts: Sequence[str], valid_days: float, not_before_days: float) -> CertFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    # Server certificates serve both ways, as etcd's docs suggest for a member (and kubeadm's etcd certs).
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now + datetime.timedelta(days=not_before_days))
        .not_valid_after(now + datetime.timedelta(days=not_before_days + valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    # Written to new files and renamed into place, as certificate managers do: a server reloading on a
    # handshake never reads a half-written pair... except between the two renames (it then keeps the old).
    for path, data in ((key_path, None), (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
        tmp = path.with_suffix(".tmp")
        if data is None:
            _write_key(tmp, key)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    return CertFiles(cert_path, key_path, serial)


def make_pki(directory: Path) -> TestPki:
    """A fresh test PKI in ``directory`` (created); its paths are absolute (servers run in their work dir)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key, ca_path, ca_key_path = _ca(directory, "ca")
    other_cert, other_key, other_path, _ = _ca(directory, "other-ca")
    loopback = ("127.0.0.1", "localhost")
    return TestPki(
        directory=directory,
        ca=ca_path,
        ca_key=ca_key_path,
        server=_issue(directory, "server", "fastetcd-test-server", ca_cert, ca_key, server=True,
                      hosts=loopback, valid_days=30, not_before_days=-1),
        client=_issue(directory, "client", "root", ca_cert, ca_key, server=False, hosts=(), valid_days=30,
                      not_before_days=-1),
        other_ca=other_path,
        foreign_client=_issue(directory, "foreign-client", "root", other_cert, other_key, server=False,
                              hosts=(), valid_days=30, not_before_days=-1),
        expired_client=_issue(directory, "expired-client", "root", ca_cert, ca_key, server=False, hosts=(),
                              valid_days=1, not_before_days=-3),
    )


# ---------------------------------------------------------------------------------- process-wide default

_default_server: ServerTls | None = None
_default_client: ClientTls | None = None


def set_default_tls(server: ServerTls | None,
                    client: ClientTls | None) -> tuple[ServerTls | None, ClientTls | None]:
    """Make servers started without a TLS choice serve with ``server`` and clients built without one use
    ``client``; returns the previous pair (to restore). ``(None, None)``: plain text, the default."""
    global _default_server, _default_client
    previous = (_default_server, _default_client)
    _default_server, _default_client = server, client
    return previous


def default_server_tls() -> ServerTls | None:
    return _default_server


def default_client_tls() -> ClientTls | None:
    return _default_client


def resolve_client(tls: ClientTls | None | _Default) -> ClientTls | None:
    return _default_client if isinstance(tls, _Default) else tls


def resolve_server(tls: ServerTls | None | _Default) -> ServerTls | None:
    return _default_server if isinstance(tls, _Default) else tls
