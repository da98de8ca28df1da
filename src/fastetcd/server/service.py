"""What every service shares: the engine it asks, etcd's header on every answer, and who is calling."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from fastetcd.engine.auth_store import AuthStore
from fastetcd.engine.auth_tokens import AuthInfo
from fastetcd.engine.state_machine import StateMachine
from fastetcd.server.call_context import ANONYMOUS, CALLER
from fastetcd.server.header import Header


def auth_info(auth: AuthStore) -> AuthInfo | None:
    """The current call's user (etcd's AuthInfoFromCtx), None for nobody; raises "invalid auth token".

    A call without a token or certificate costs a context-variable read: the common case, auth off."""
    c = CALLER.get()
    if c is ANONYMOUS or (c.token is None and c.common_name is None):
        return None
    return auth.auth_info(c.token, c.common_name)


def may_read(auth: AuthStore, key: bytes, range_end: bytes) -> None:
    """etcd's read check for the current call, with the hot path (auth off, nobody calling) first."""
    if CALLER.get() is ANONYMOUS and not auth.state.enabled:
        return
    auth.is_range_permitted(auth_info(auth), key, range_end)


class Service:
    def __init__(self, sm: StateMachine, header: Header) -> None:
        self.sm = sm
        self.header = header

    def _fill(self, resp) -> bytes:
        """``resp`` serialized, with the header etcd fills in (the committed revision unless already set)."""
        resp.header.SetInParent()
        self.header.fill(resp.header, self.sm.committed_rev)
        return resp.SerializeToString()


def answer(pending: asyncio.Future, encode: Callable[[Any], bytes]) -> asyncio.Future[bytes]:
    """A DIRECT handler's answer to a write (routes.py): ``encode(response)`` once the engine's future
    resolves, from its done callback, so no coroutine runs per call."""
    out = pending.get_loop().create_future()
    pending.add_done_callback(functools.partial(_encode_when_done, encode, out))
    return out


def _encode_when_done(
    encode: Callable[[Any], bytes], out: asyncio.Future[bytes], pending: asyncio.Future
) -> None:
    if out.done():  # the caller gave up (its call was cancelled)
        return
    if pending.cancelled():
        out.cancel()
        return
    exc = pending.exception()
    if exc is not None:
        out.set_exception(exc)
        return
    out.set_result(encode(pending.result()))
