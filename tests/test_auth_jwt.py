"""JWT auth tokens (``--auth-token jwt,...``): what Authenticate returns is accepted by later calls, a
tampered token is not, and the tokens are etcd's own: with the same key, a token one server signed is
accepted by the other (fastetcd's by etcd 3.5.1 and the other way round)."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from servers import ServerFactory

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import rpc_pb2_grpc
from fastetcd.testing import channel, kv_stub


def _keys(tmp_path: Path, method: str) -> tuple[Path, Path]:
    priv, pub = tmp_path / f"{method}.key", tmp_path / f"{method}.pub"
    if method.startswith("HS"):  # a shared secret: etcd signs and verifies with priv-key's bytes
        priv.write_bytes(b"0123456789abcdef0123456789abcdef-hmac-secret")
        pub.write_bytes(b"")
        return priv, pub
    if method.startswith(("RS", "PS")):
        key = rsa.generate_private_key(65537, 2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _setup(endpoint: str) -> None:
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        auth.UserAdd(pb.AuthUserAddRequest(name="root", password="rootpw"))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"))
        auth.AuthEnable(pb.AuthEnableRequest())


def _token(endpoint: str) -> str:
    with channel(endpoint) as ch:
        req = pb.AuthenticateRequest(name="root", password="rootpw")
        return rpc_pb2_grpc.AuthStub(ch).Authenticate(req).token


def _get(endpoint: str, token: str) -> str:
    with channel(endpoint) as ch:
        try:
            kv_stub(ch).Range(pb.RangeRequest(key=b"k"), metadata=[("token", token)])
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return "OK"


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.mark.parametrize("method", ["RS256", "PS384", "ES256", "HS256"])
def test_jwt_tokens(server_factory: ServerFactory, tmp_path: Path, method: str) -> None:
    priv, pub = _keys(tmp_path, method)
    keys = f"priv-key={priv}" if method.startswith("HS") else f"pub-key={pub},priv-key={priv}"
    option = f"jwt,{keys},sign-method={method},ttl=5m"
    args = ("--auth-token", option, "--bcrypt-cost", "4")
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(server_factory, "fastetcd", "subject", args)
        oracle_f = pool.submit(server_factory, "etcd", "oracle", args)
    fe, etcd = subject_f.result().endpoint, oracle_f.result().endpoint
    for endpoint in (fe, etcd):
        _setup(endpoint)
    token = _token(fe)
    assert token.count(".") == 2
    claims = _claims(token)
    assert list(claims) == ["exp", "revision", "username"]  # etcd's claims, in etcd's order
    assert (claims["username"], claims["revision"]) == ("root", 3)
    assert _get(fe, token) == "OK"
    assert _get(fe, _token(fe)) == "OK"  # a second Authenticate's token works as well
    # the same user at the same auth revision: each server takes the other's token
    assert _get(etcd, token) == "OK"
    assert _get(fe, _token(etcd)) == "OK"
    # tampered: another user named in the payload, or a signature that does not match
    head, payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "username": "alice"}).encode()).rstrip(b"=")
    invalid = "UNAUTHENTICATED: etcdserver: invalid auth token"
    for bad in (f"{head}.{forged.decode()}.{sig}", f"{head}.{payload}.{sig[:-4]}AAAA", token + "x", "a.b.c"):
        assert _get(fe, bad) == invalid
        assert _get(etcd, bad) == invalid


def test_jwt_token_goes_stale_when_auth_changes(server_factory: ServerFactory, tmp_path: Path) -> None:
    """A JWT names the auth revision it was issued at: after any auth change it is refused until the
    client authenticates again (etcd 3.5.2's error text, on which clients do that by themselves)."""
    priv, pub = _keys(tmp_path, "RS256")
    args = ("--auth-token", f"jwt,pub-key={pub},priv-key={priv},sign-method=RS256", "--bcrypt-cost", "4")
    fe = server_factory("fastetcd", "subject", args).endpoint
    _setup(fe)
    token = _token(fe)
    assert _get(fe, token) == "OK"
    with channel(fe) as ch:
        rpc_pb2_grpc.AuthStub(ch).RoleAdd(pb.AuthRoleAddRequest(name="r"), metadata=[("token", token)])
    assert _get(fe, token) == "INVALID_ARGUMENT: etcdserver: revision of auth store is old"
    assert _get(fe, _token(fe)) == "OK"


def test_bad_jwt_options_refuse_to_start(tmp_path: Path) -> None:
    from fastetcd.testing import run_fastetcd

    priv, _ = _keys(tmp_path, "RS256")
    for option, why in (
        ("jwt,priv-key=x,sign-method=XX256", "invalid auth signature method"),
        ("jwt,sign-method=RS256", "missing key data"),
        ("jwt,priv-key", "invalid auth token option"),
        ("oauth", "unknown auth token type"),
    ):
        done = run_fastetcd("--auth-token", option)
        assert done.returncode == 2 and why in done.stderr, done.stderr
    done = run_fastetcd("--auth-token", f"jwt,priv-key={tmp_path}/missing,sign-method=RS256",
                        "--data-dir", str(tmp_path / "d"), "--listen-client-urls", "http://127.0.0.1:0",
                        "--advertise-client-urls", "http://127.0.0.1:0")
    assert done.returncode == 1 and "No such file or directory" in done.stderr, done.stderr
    assert priv.exists()
