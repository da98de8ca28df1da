"""What every service shares: the engine it asks and etcd's header on every answer."""

from __future__ import annotations

from fastetcd.engine.state_machine import StateMachine
from fastetcd.server.header import Header


class Service:
    def __init__(self, sm: StateMachine, header: Header) -> None:
        self.sm = sm
        self.header = header

    def _fill(self, resp) -> bytes:
        """``resp`` serialized, with the header etcd fills in (the committed revision unless already set)."""
        resp.header.SetInParent()
        self.header.fill(resp.header, self.sm.committed_rev)
        return resp.SerializeToString()
