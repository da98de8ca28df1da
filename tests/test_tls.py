"""TLS and mutual TLS on the client port (and the metrics port), on both transports, beside etcd 3.5.1.

Real processes and real clients: etcdctl (grpc-go), a grpcio client, etcd's Go benchmark tool, Python's
ssl module for what a handshake gives (the served certificate, the refusal). Certificates come from one
test CA (fastetcd.testing.make_pki). Where etcd 3.5.1 has the same flag, it runs beside fastetcd with
the same flags and must answer alike (the refusal cases, endpoint health, flag errors).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop
from cryptography import x509
from etcdctl_compare import normalize
from servers import ServerFactory

from fastetcd.proto import rpc_pb2
from fastetcd.server.call_context import caller
from fastetcd.server.tls import ServerTLS, TLSInfo
from fastetcd.testing import (
    LOOPBACK,
    ClientTls,
    ServerProcess,
    ServerTls,
    TestPki,
    channel,
    etcd_tool,
    free_port,
    kv_stub,
    run_etcdctl,
    run_fastetcd,
)

TRANSPORTS = ("grpcio", "native")
REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "bench" / ".bin" / "benchmark"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def _start(factory: ServerFactory, kind: str, name: str, tls: ServerTls, client: ClientTls,
           transport: str = "grpcio", extra: tuple[str, ...] = ()) -> ServerProcess:
    args = [*extra, "--transport", transport] if kind == "fastetcd" else list(extra)
    return factory(kind, name, args, tls=tls, client_tls=client)


def _served_certificate(port: int) -> x509.Certificate:
    """The certificate a new connection is served (no verification: only what is on the wire)."""
    pem = ssl.get_server_certificate((LOOPBACK, port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode())


def _handshake_then_read(port: int, ctx: ssl.SSLContext) -> str:
    """Connect with ``ctx``, send an HTTP/2 preface, read: "ok" if the server talks back over TLS, else
    the failure (TLS 1.3 sends a client-certificate refusal after the client's handshake finished, so
    the refusal can show on the first read)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
                data = s.recv(100)
                return "ok" if data else "closed"
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            return f"refused: {type(e).__name__}"


def _client_context(pki: TestPki, cert: Any = None, *, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["h2"])
    if with_cert:
        chosen = cert or pki.client
        ctx.load_cert_chain(chosen.cert, chosen.key)
    return ctx


# ----------------------------------------------------------------------------------------- mutual TLS


def test_mtls_etcdctl_grpcio_and_benchmark(server_factory: ServerFactory, test_pki: TestPki,
                                            transport: str) -> None:
    pki = test_pki
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(), transport)
    assert fe.url.startswith("https://")
    good = pki.client_tls()

    rc, out, err = run_etcdctl(fe.endpoint, ["put", "k", "v"], tls=good)
    assert (rc, out) == (0, "OK\n"), err
    rc, out, err = run_etcdctl(fe.endpoint, ["get", "k"], tls=good)
    assert (rc, out) == (0, "k\nv\n"), err

    with channel(fe.endpoint, tls=good) as ch:
        kv_stub(ch).Put(rpc_pb2.PutRequest(key=b"g", value=b"grpcio"), timeout=10)
        got = kv_stub(ch).Range(rpc_pb2.RangeRequest(key=b"a", range_end=b"z"), timeout=10)
    assert [(kv.key, kv.value) for kv in got.kvs] == [(b"g", b"grpcio"), (b"k", b"v")]

    tool = benchmark_tool()
    run = subprocess.run(
        [str(tool), f"--endpoints=https://{fe.endpoint}", f"--cacert={pki.ca}", f"--cert={pki.client.cert}",
         f"--key={pki.client.key}", "--conns=2", "--clients=4", "put", "--total=200", "--key-size=8",
         "--val-size=16", "--key-space-size=50"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Requests/sec" in run.stdout and "Error distribution" not in run.stdout, run.stdout[-2000:]


def benchmark_tool() -> Path:
    """etcd's Go benchmark tool, built on first use as bench/compare.py does (needs Go)."""
    if not BENCHMARK.is_file():
        script = REPO / "ci" / "build_etcd_benchmark.sh"
        build = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        assert build.returncode == 0, f"{script} failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}"
    return BENCHMARK


REFUSALS: dict[str, Callable[[TestPki], ClientTls | None]] = {
    "no client certificate": lambda pki: pki.client_tls(with_cert=False),
    "certificate from another CA": lambda pki: pki.client_tls(pki.foreign_client),
    "expired certificate": lambda pki: pki.client_tls(pki.expired_client),
    "plain text to the TLS port": lambda pki: None,
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_like_etcd(server_factory: ServerFactory, test_pki: TestPki, transport: str,
                           case: str) -> None:
    pki = test_pki
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(), transport)
    etcd = _start(server_factory, "etcd", "etcd", pki.server_tls(), pki.client_tls())
    client = REFUSALS[case](pki)
    for server in (fe, etcd):
        # etcdctl: the https:// endpoint (http:// for plain text) with the case's certificates
        endpoint = server.endpoint if client is not None else f"http://{server.endpoint}"
        rc, out, err = run_etcdctl(endpoint, ["get", "k", "--dial-timeout=2s", "--command-timeout=3s"],
                                   tls=client, timeout=30)
        assert rc != 0 and out == "", f"{server.kind} answered ({case}): {out} {err}"
        assert "context deadline exceeded" in err, f"{server.kind}: {err}"
        # grpcio: the call fails UNAVAILABLE, no answer
        with channel(server.endpoint, tls=client) as ch:
            with pytest.raises(grpc.RpcError) as info:
                kv_stub(ch).Range(rpc_pb2.RangeRequest(key=b"k"), timeout=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, f"{server.kind}: {info.value}"
    # the handshake level: a refused client never gets an HTTP/2 frame back
    if client is not None and case != "no client certificate":
        cert = pki.foreign_client if "another CA" in case else pki.expired_client
        ctx = _client_context(pki, cert)
    elif client is not None:
        ctx = _client_context(pki, with_cert=False)
    if client is not None:
        # refused in the handshake, or (TLS 1.3: the client's side finishes first) closed after it
        assert _handshake_then_read(fe.port, ctx) != "ok", case
        assert _handshake_then_read(etcd.port, ctx) != "ok", case
        assert _handshake_then_read(fe.port, _client_context(pki)) == "ok"
    else:
        with socket.create_connection((LOOPBACK, fe.port), timeout=5) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            raw.settimeout(5)
            try:
                data = raw.recv(100)
            except ConnectionError:
                data = b""
            # no HTTP/2 SETTINGS frame: at most a TLS alert record (content type 21) before the close
            assert data == b"" or data[:1] == b"\x15", data


def test_endpoint_health_like_etcd(server_factory: ServerFactory, test_pki: TestPki, transport: str) -> None:
    pki = test_pki
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(), transport)
    etcd = _start(server_factory, "etcd", "etcd", pki.server_tls(), pki.client_tls())
    for server in (fe, etcd):
        rc, out, err = run_etcdctl(server.endpoint, ["endpoint", "health"], tls=pki.client_tls())
        assert rc == 0, f"{server.kind}: {err}"
        assert out.startswith(f"https://{server.endpoint} is healthy: successfully committed proposal"), out


# ----------------------------------------------------------------------------------------- reload


def test_certificate_replaced_on_disk_is_served_without_restart(server_factory: ServerFactory,
                                                                test_pki: TestPki, transport: str) -> None:
    pki = test_pki
    name = f"reload-server-{transport}"
    first = pki.issue(name, "fastetcd-test-server", server=True)
    tls = ServerTls(first.cert, first.key, pki.ca, client_cert_auth=True)
    fe = _start(server_factory, "fastetcd", "fe", tls, pki.client_tls(), transport)
    assert _served_certificate(fe.port).serial_number == first.serial
    held = channel(fe.endpoint, tls=pki.client_tls())  # a connection made before the change
    kv_stub(held).Put(rpc_pb2.PutRequest(key=b"before", value=b"1"), timeout=10)

    time.sleep(0.05)  # a different mtime even on coarse-grained file systems (the inode changes anyway)
    second = pki.issue(name, "fastetcd-test-server", server=True)  # renamed into place, as managers do
    assert second.serial != first.serial
    assert _served_certificate(fe.port).serial_number == second.serial
    rc, out, err = run_etcdctl(fe.endpoint, ["get", "before"], tls=pki.client_tls())
    assert (rc, out) == (0, "before\n1\n"), err
    # the connection made before the change goes on
    kv_stub(held).Put(rpc_pb2.PutRequest(key=b"after", value=b"2"), timeout=10)
    held.close()
    assert fe.alive()


# ----------------------------------------------------------------------------------------- auto TLS


def test_auto_tls_with_insecure_skip_verify(server_factory: ServerFactory, transport: str) -> None:
    auto = ServerTls(extra_args=("--auto-tls",))
    skip = ClientTls(insecure_skip_verify=True)
    fe = _start(server_factory, "fastetcd", "fe", auto, skip, transport)
    etcd = _start(server_factory, "etcd", "etcd", auto, skip)
    for server in (fe, etcd):
        rc, out, err = run_etcdctl(server.endpoint, ["put", "a", "1"], tls=skip)
        assert (rc, out) == (0, "OK\n"), f"{server.kind}: {err}"
        rc, out, err = run_etcdctl(server.endpoint, ["endpoint", "health"], tls=skip)
        assert rc == 0 and "is healthy" in out, f"{server.kind}: {err}"
        # without skipping verification the self-signed certificate is not trusted
        rc, out, err = run_etcdctl(server.endpoint, ["get", "a", "--dial-timeout=2s", "--command-timeout=3s"],
                                   tls=ClientTls(), timeout=30)
        assert rc != 0, f"{server.kind} trusted a self-signed certificate"
    # etcd's place for it: <data-dir>/fixtures/client/{cert,key}.pem, for the listen host
    cert = x509.load_pem_x509_certificate((fe.workdir / "fastetcd/fixtures/client/cert.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


# ----------------------------------------------------------------------------------------- the metrics port


def test_metrics_over_https(server_factory: ServerFactory, test_pki: TestPki) -> None:
    pki = test_pki
    port = free_port()
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(),
                extra=("--listen-metrics-urls", f"https://{LOOPBACK}:{port}"))
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    for path, expect in (("/health", b'"health":"true"'), ("/metrics", b"etcd_server_has_leader")):
        conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and expect in resp.read(), path
        conn.close()
    # the client TLS settings apply: a client without a certificate is refused
    bare = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn = http.client.HTTPSConnection(LOOPBACK, port, context=bare, timeout=10)
        conn.request("GET", "/health")
        conn.getresponse().read()
    assert fe.alive()


def test_http_endpoints_on_the_tls_client_port(server_factory: ServerFactory, test_pki: TestPki) -> None:
    """The native transport answers /health on the client port; over TLS too, by ALPN over HTTP/1.1 or
    HTTP/2 (curl's default), as etcd's client port does."""
    pki = test_pki
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(), "native")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ctx.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPSConnection(LOOPBACK, fe.port, context=ctx, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b'{"health":"true","reason":""}')
    assert _h2_get(fe.port, pki, "/health") == (b"200", b'{"health":"true","reason":""}')


def _h2_get(port: int, pki: TestPki, path: str) -> tuple[bytes, bytes]:
    """GET over HTTP/2 over TLS (ALPN h2), as curl does by default: (status, body)."""
    import h2.connection
    import h2.events

    ctx = _client_context(pki)
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=LOOPBACK) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "https"),
                              (":authority", f"{LOOPBACK}:{port}")], end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = b"", b""
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before the answer ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
            sock.sendall(conn.data_to_send())


# ----------------------------------------------------------------------------------------- versions, ciphers


def _negotiate(port: int, pki: TestPki, version: ssl.TLSVersion, ciphers: str | None = None) -> str:
    ctx = _client_context(pki)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=LOOPBACK) as s:
                return f"{s.version()} {s.cipher()[0]}"
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused: {type(e).__name__}"


def test_cipher_suites_and_versions(server_factory: ServerFactory, test_pki: TestPki, transport: str) -> None:
    pki = test_pki
    suite = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"  # the test CA's keys are ECDSA P-256
    extra: tuple[str, ...] = ("--cipher-suites", suite)
    if transport == "native":
        extra += ("--tls-max-version", "TLS1.2")
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(), pki.client_tls(), transport, extra)
    # a TLS 1.2 client gets the one suite, and one that offers only others is refused
    assert _negotiate(fe.port, pki, ssl.TLSVersion.TLSv1_2) == "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256"
    other = _negotiate(fe.port, pki, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert other.startswith("refused"), other
    if transport == "native":
        assert _negotiate(fe.port, pki, ssl.TLSVersion.TLSv1_3).startswith("refused")
    else:  # grpcio cannot limit versions (the flag is refused at start, below); TLS 1.3's suites are Go's
        assert _negotiate(fe.port, pki, ssl.TLSVersion.TLSv1_3).startswith("TLSv1.3")
    rc, out, err = run_etcdctl(fe.endpoint, ["put", "c", "1"], tls=pki.client_tls())
    assert (rc, out) == (0, "OK\n"), err

    if transport == "native":
        only13 = _start(server_factory, "fastetcd", "fe13", pki.server_tls(), pki.client_tls(), transport,
                        ("--tls-min-version", "TLS1.3"))
        assert _negotiate(only13.port, pki, ssl.TLSVersion.TLSv1_2).startswith("refused")
        assert _negotiate(only13.port, pki, ssl.TLSVersion.TLSv1_3).startswith("TLSv1.3")


def _flag_error(args: list[str]) -> tuple[int, str]:
    proc = run_fastetcd(*args, "--data-dir", "/nonexistent/never-created")
    return proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def _etcd_error(args: list[str], tmp_path: Path) -> str:
    proc = subprocess.run([etcd_tool("etcd"), "--data-dir", str(tmp_path / "never"), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    for line in proc.stderr.splitlines():
        if '"failed to start etcd"' in line:
            return json.loads(line)["error"]
    raise AssertionError(proc.stderr[-1000:])


def test_tls_flag_errors_like_etcd(tmp_path: Path, test_pki: TestPki) -> None:
    url = f"https://{LOOPBACK}:{free_port()}"
    urls = ["--listen-client-urls", url, "--advertise-client-urls", url]
    cert = ["--cert-file", str(test_pki.server.cert), "--key-file", str(test_pki.server.key)]
    for args in (urls, [*urls, *cert, "--cipher-suites", "TLS_NOT_A_SUITE"]):
        rc, line = _flag_error(args)
        assert rc == 2, line
        assert line == f"fastetcd: error: {_etcd_error(args, tmp_path)}"
    rc, line = _flag_error([*urls, *cert, "--tls-min-version", "TLS1.3", "--transport", "grpcio"])
    assert rc == 2 and "need --transport native" in line, line
    rc, line = _flag_error([*urls, *cert, "--tls-min-version", "TLS1.1"])
    assert rc == 2, line
    assert line == 'fastetcd: error: unexpected TLS version "TLS1.1" (must be one of: TLS1.2, TLS1.3)'
    rc, line = _flag_error([*urls, *cert, "--tls-min-version", "TLS1.3", "--cipher-suites",
                            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "--transport", "native"])
    assert rc == 2, line
    assert line == "fastetcd: error: cipher suites cannot be configured when only TLS1.3 is enabled"
    # a key that is not the certificate's: refused at start (exit 1), nothing served
    bad = run_fastetcd(*urls, "--cert-file", str(test_pki.server.cert),
                       "--key-file", str(test_pki.client.key), "--data-dir", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "cannot load --cert-file" in bad.stderr, bad.stderr[-500:]


# ----------------------------------------------------------------------------------------- the caller's CN


class _InProcess:
    """One transport serving one route that answers the caller's certificate CN, on a loop thread of its
    own: what the services would see (server/call_context.py), through a real TLS handshake."""

    def __init__(self, transport: str, info: TLSInfo, loop: str = "uvloop") -> None:
        # uvloop is what fastetcd serves on; the stock loop is its fallback where uvloop is missing.
        self.loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tls = ServerTLS(info)
        self.transport = transport
        self.port = self._call(self._start(info.client_cert_auth))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, client_cert_auth: bool) -> int:
        async def who(raw: bytes) -> bytes:
            return (caller().common_name or "<none>").encode()

        async def who_stream(requests: Any, send: Any) -> None:
            async for _ in requests:
                await send((caller().common_name or "<none>").encode())

        def who_direct(raw: bytes) -> bytes:  # a "direct" route: answered without a coroutine
            return (caller().common_name or "<none>").encode()

        routes: Any = {"/test.Caller/Who": ("unary", who), "/test.Caller/WhoStream": ("bidi", who_stream),
                       "/test.Caller/WhoDirect": ("direct", who_direct)}
        if self.transport == "native":
            from fastetcd.server.native_transport import NativeServer

            self.server: Any = NativeServer(routes, max_request_bytes=1 << 20,
                                            client_cert_auth=client_cert_auth)
            port = free_port()
            await self.server.start(LOOPBACK, port, ssl_context=self.tls.server_context())
            return port
        from fastetcd.server import grpc_transport

        self.server = grpc_transport.build_server(routes, max_request_bytes=1 << 20,
                                                  client_cert_auth=client_cert_auth)
        port = self.server.add_secure_port(f"{LOOPBACK}:0", grpc_transport.server_credentials(self.tls))
        await self.server.start()
        return port

    def close(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def in_process(request: pytest.FixtureRequest) -> Iterator[Callable[[str, TLSInfo], _InProcess]]:
    made: list[_InProcess] = []

    def make(transport: str, info: TLSInfo) -> _InProcess:
        made.append(_InProcess(transport, info, request.param))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _who(port: int, client: ClientTls) -> tuple[str, str, str]:
    """The CN a unary, a bidi and a direct handler see."""
    with channel(f"{LOOPBACK}:{port}", tls=client) as ch:
        unary = ch.unary_unary("/test.Caller/Who")(b"", timeout=10).decode()
        stream = [r.decode() for r in ch.stream_stream("/test.Caller/WhoStream")(iter([b"x"]), timeout=10)]
        direct = ch.unary_unary("/test.Caller/WhoDirect")(b"", timeout=10).decode()
    return unary, stream[0], direct


def test_client_certificate_cn_reaches_the_services(in_process: Callable[[str, TLSInfo], _InProcess],
                                                    test_pki: TestPki, transport: str) -> None:
    pki = test_pki
    kube = pki.issue("kube-apiserver-client", "kube-apiserver")
    files = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
             "trusted_ca_file": str(pki.ca)}
    server = in_process(transport, TLSInfo(**files, client_cert_auth=True))
    assert _who(server.port, pki.client_tls(kube)) == ("kube-apiserver",) * 3
    assert _who(server.port, pki.client_tls()) == ("root",) * 3
    # a CA file alone requires a certificate, but (as in etcd) its CN is no user without --client-cert-auth
    plain = in_process(transport, TLSInfo(**files, client_cert_auth=False))
    assert _who(plain.port, pki.client_tls(kube)) == ("<none>",) * 3


# ----------------------------------------------------------------------------------------- kube-apiserver


# What kube-apiserver does against its etcd over mutual TLS, as etcdctl commands (grpc-go, like
# kube-apiserver's client). Auth is on, with no password anywhere: the administrator's certificate (CN
# "root") makes it root and kube-apiserver's (CN "kube-apiserver") makes it a user whose role covers
# /registry/ only, as etcd does under --client-cert-auth. Steps: (args, expected stdout or None for a
# refusal); every step must also match etcd 3.5.1 exactly (exit code, stdout, stderr).
KUBE_AUTH_SETUP: list[list[str]] = [
    ["user", "add", "root", "--new-user-password=not-used-by-anyone"],
    ["user", "grant-role", "root", "root"],
    ["role", "add", "kube"],
    ["role", "grant-permission", "kube", "readwrite", "/registry/", "--prefix=true"],
    ["user", "add", "kube-apiserver", "--no-password"],
    ["user", "grant-role", "kube-apiserver", "kube"],
    ["auth", "enable"],
]
KUBE_STEPS: list[tuple[list[str], str | None]] = [
    (["put", "/registry/namespaces/default", "ns-v1"], "OK\n"),
    (["put", "/registry/pods/default/web-0", "pod-v1"], "OK\n"),
    (["get", "/registry/pods/default/web-0"], "/registry/pods/default/web-0\npod-v1\n"),
    (["get", "/registry/", "--prefix", "--keys-only"],
     "/registry/namespaces/default\n\n/registry/pods/default/web-0\n\n"),
    (["del", "/registry/pods/default/web-0"], "1\n"),
    (["get", "/registry/", "--prefix", "--keys-only"], "/registry/namespaces/default\n\n"),
    # outside its prefix, and the administration it has no role for: refused
    (["put", "/other/key", "x"], None),
    (["get", "/other/key"], None),
    (["get", "", "--prefix", "--keys-only"], None),
    (["user", "list"], None),
]


def test_kube_apiserver_style_client(server_factory: ServerFactory, test_pki: TestPki,
                                     transport: str) -> None:
    pki = test_pki
    kube = pki.client_tls(pki.issue("kube-apiserver", "kube-apiserver"))
    fe = _start(server_factory, "fastetcd", "fe", pki.server_tls(client_cert_auth=True), kube, transport)
    etcd = _start(server_factory, "etcd", "etcd", pki.server_tls(client_cert_auth=True), kube)
    admin = pki.client_tls()  # CN "root"
    for server in (fe, etcd):
        for args in KUBE_AUTH_SETUP:
            rc, _, err = run_etcdctl(server.endpoint, args, tls=admin)
            assert rc == 0, f"{server.kind}: {args}: {err}"
    def ctl(server: ServerProcess, args: list[str], client: ClientTls) -> tuple[int, str, str]:
        rc, out, err = run_etcdctl(server.endpoint, args, tls=client)
        return rc, normalize(out, server.endpoint), normalize(err, server.endpoint)  # client log lines

    for args, want in KUBE_STEPS:
        got, expected = ctl(fe, args, kube), ctl(etcd, args, kube)
        assert got == expected, f"{args}: fastetcd {got} etcd {expected}"
        if want is None:
            assert got[0] != 0 and "permission denied" in got[2], (args, got)
        else:
            assert got[:2] == (0, want), (args, got)
    # the administrator's certificate is root: it reads everything, and a certificate's CN that is no user
    # gets nothing
    rc, out, _ = run_etcdctl(fe.endpoint, ["get", "/registry/namespaces/default", "--print-value-only"],
                             tls=admin)
    assert (rc, out) == (0, "ns-v1\n")
    stranger = pki.client_tls(pki.issue("stranger", "not-a-user"))
    got = ctl(fe, ["get", "/registry/", "--prefix"], stranger)
    assert got == ctl(etcd, ["get", "/registry/", "--prefix"], stranger)
    assert got[0] != 0, got


# ----------------------------------------------------------------------------------------- the --tls option


def test_harness_tls_option(harness_tls: bool, server_pair: Any) -> None:
    """Under --tls the fixtures' servers (fastetcd and the oracle) serve mutual TLS only and the harness's
    clients use it; without it, plain text. CI's TLS pass runs this to prove the pass is really over TLS."""
    scheme = "https" if harness_tls else "http"
    for server in (server_pair.subject, server_pair.oracle):
        assert server.url == f"{scheme}://{server.endpoint}"
        rc, out, err = run_etcdctl(server.endpoint, ["put", "h", "1"])  # the harness's default client
        assert (rc, out) == (0, "OK\n"), err
        if harness_tls:
            with channel(server.endpoint, tls=None) as ch, pytest.raises(grpc.RpcError):
                kv_stub(ch).Range(rpc_pb2.RangeRequest(key=b"h"), timeout=3)
