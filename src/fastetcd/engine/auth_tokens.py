"""Auth tokens: etcd's token providers (server/auth/simple_token.go, jwt.go, options.go).

A token names a user and the auth revision it was issued at; the auth store turns it back into that
``AuthInfo`` on every request. Tokens are per node and in memory, never in the log: a restart (etcd's too)
forgets simple tokens, and clients authenticate again.

- ``simple``: ``<16 random letters>.<index>``, remembered for ``--auth-token-ttl`` seconds after its last
  use. Reports the auth store's current revision, so it never goes stale; a password change or a deleted
  user forgets that user's tokens, and disabling auth forgets them all.
- ``jwt,pub-key=P,priv-key=K,sign-method=RS256,ttl=5m``: a signed token carrying the user name, the auth
  revision it was issued at and an expiry; valid on any node holding the key. Once auth changes, its
  revision is old and the client must authenticate again.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fastetcd import errors

SIMPLE_TOKEN_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIMPLE_TOKEN_LENGTH = 16
DEFAULT_JWT_TTL = 300.0  # etcd's DefaultTTL: 5m
JWT_METHODS = frozenset(
    f"{family}{bits}" for family in ("RS", "PS", "ES", "HS") for bits in ("256", "384", "512")
)


class AuthOptionsError(ValueError):
    """--auth-token is not something etcd would start with (auth.ErrInvalidAuthOpts and friends)."""


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """Who a request runs as: etcd's auth.AuthInfo. Revision 0 means nobody (no token, no certificate)."""

    username: str
    revision: int


class TokenProvider(Protocol):
    def info(self, token: str, revision: int) -> AuthInfo | None:
        """The user ``token`` stands for (``revision``: the store's current one), None if not valid."""

    def assign(self, username: str, revision: int, index: int) -> str:
        """A new token for ``username``; ``index`` numbers simple tokens (etcd: the raft index)."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def invalidate_user(self, username: str) -> None: ...


class SimpleTokens:
    """etcd's tokenSimple: random tokens kept in memory, each alive ``ttl`` seconds after its last use."""

    def __init__(self, ttl: float = 300.0, clock: Any = time.monotonic) -> None:
        self.ttl = ttl if ttl > 0 else 300.0
        self.clock = clock
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (user name, deadline)
        self.enabled = False
        self._next_sweep = 0.0

    def info(self, token: str, revision: int) -> AuthInfo | None:
        # etcd first checks the shape "<prefix>.<uint index>", then the table.
        prefix, dot, index = token.partition(".")
        if not dot or "." in index or not index.isdigit():
            return None
        found = self.tokens.get(token)
        if found is None:
            return None
        now = self.clock()
        if now > found[1]:
            del self.tokens[token]
            return None
        self.tokens[token] = (found[0], now + self.ttl)  # each use extends its life, as etcd's keeper
        return AuthInfo(found[0], revision)

    def assign(self, username: str, revision: int, index: int) -> str:
        prefix = "".join(secrets.choice(SIMPLE_TOKEN_LETTERS) for _ in range(SIMPLE_TOKEN_LENGTH))
        token = f"{prefix}.{index}"
        if self.enabled:  # etcd drops tokens assigned while its keeper is off
            self._sweep()
            self.tokens[token] = (username, self.clock() + self.ttl)
        return token

    def _sweep(self) -> None:
        """Forget expired tokens, at most once a second (etcd's keeper ticks every second; here a token
        being added is the tick, so a burst of logins does not rescan the table for each)."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for token in [t for t, (_, deadline) in self.tokens.items() if now > deadline]:
            del self.tokens[token]

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self.tokens.clear()

    def invalidate_user(self, username: str) -> None:
        for token in [t for t, (name, _) in self.tokens.items() if name == username]:
            del self.tokens[token]


class JwtTokens:
    """etcd's tokenJWT over PyJWT: claims ``username``, ``revision`` and ``exp``."""

    def __init__(self, method: str, key: Any, verify_key: Any, ttl: float, verify_only: bool) -> None:
        self.method = method
        self.key = key  # what signs (a private key, or the HMAC secret)
        self.verify_key = verify_key  # what verifies (its public key, or the secret)
        self.ttl = ttl
        self.verify_only = verify_only

    def info(self, token: str, revision: int) -> AuthInfo | None:
        import jwt

        try:
            claims = jwt.decode(token, self.verify_key, algorithms=[self.method])
        except jwt.PyJWTError:
            return None
        username, rev = claims.get("username"), claims.get("revision")
        if not isinstance(username, str) or not isinstance(rev, int | float):
            return None
        return AuthInfo(username, int(rev))

    def assign(self, username: str, revision: int, index: int) -> str:
        import jwt

        if self.verify_only:
            raise errors.VERIFY_ONLY
        # Go's encoding/json writes a map's keys sorted: the same claims, in the same order, as etcd's.
        claims = {"exp": int(time.time() + self.ttl), "revision": revision, "username": username}
        return jwt.encode(claims, self.key, algorithm=self.method)

    def enable(self) -> None:
        pass

    def disable(self) -> None:
        pass

    def invalidate_user(self, username: str) -> None:
        pass  # a JWT is valid until it expires or the auth revision moves past it


def parse_auth_token(option: str) -> tuple[str, dict[str, str]]:
    """etcd's decomposeOpts: "jwt,sign-method=RS256,..." → ("jwt", {"sign-method": "RS256", ...})."""
    kind, *rest = option.split(",")
    opts: dict[str, str] = {}
    for item in rest:
        pair = item.split("=")
        if len(pair) != 2 or pair[0] in opts:
            raise AuthOptionsError(f"invalid auth token option {option!r}")
        opts[pair[0]] = pair[1]
    if kind not in ("simple", "jwt"):
        raise AuthOptionsError(f"unknown auth token type {kind!r} (use simple or jwt)")
    if kind == "jwt":
        if opts.get("sign-method") not in JWT_METHODS:
            raise AuthOptionsError(f"invalid auth signature method {opts.get('sign-method', '')!r}")
        if not (opts.get("priv-key") or opts.get("pub-key")):
            raise AuthOptionsError("missing key data: jwt needs priv-key= (and/or pub-key= to verify only)")
    return kind, opts


def token_provider(kind: str, opts: dict[str, str], simple_ttl: float, jwt_ttl: float) -> TokenProvider:
    """The provider ``--auth-token`` names (``parse_auth_token``'s answer); reads key files. Raises
    AuthOptionsError: etcd refuses to start with a token option it cannot use."""
    if kind == "simple":
        return SimpleTokens(simple_ttl)
    ttl = jwt_ttl or DEFAULT_JWT_TTL
    method = opts["sign-method"]
    files: dict[str, bytes] = {}
    for name in ("priv-key", "pub-key"):
        if opts.get(name):
            try:
                with open(opts[name], "rb") as f:
                    files[name] = f.read()
            except OSError as e:
                raise AuthOptionsError(f"jwt {name}: {e.strerror or e}: {opts[name]}") from None
    priv, pub = files.get("priv-key"), files.get("pub-key")
    if method.startswith("HS"):
        if not priv:
            raise AuthOptionsError("missing key data: jwt HMAC signing needs priv-key=")
        return JwtTokens(method, priv, priv, ttl, verify_only=False)
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(priv, password=None) if priv else None
        public = serialization.load_pem_public_key(pub) if pub else None
    except (ValueError, TypeError) as e:
        raise AuthOptionsError(f"jwt key: {e}") from None
    if private is not None and public is not None and private.public_key().public_numbers() != (
        public.public_numbers()  # type: ignore[union-attr]
    ):
        raise AuthOptionsError("public and private keys don't match")
    if private is None:
        return JwtTokens(method, None, public, ttl, verify_only=True)
    return JwtTokens(method, private, private.public_key(), ttl, verify_only=False)
