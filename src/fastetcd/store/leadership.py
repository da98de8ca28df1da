"""Leadership: which node of several over one store may write, and until when it may act as leader.

Fencing (``Store.append`` raising ``Fenced``) already keeps two writers from committing the same index.
Leadership adds what fencing cannot: a leader that answers linearizable reads from memory must know that
nobody else has committed since. So leadership is a lease, and this is the timing rule every
implementation keeps (``TimingRule`` holds the numbers):

* The leader renews its lease every ``renew`` seconds. A renewal *sent* at monotonic time ``s`` that
  succeeds makes the leader valid until ``s + lease - drift_margin`` by its own clock (``valid_until``).
  Past that, it serves no linearizable read and appends nothing until a renewal succeeds again.
* A candidate polls the leader record every ``poll`` seconds. It may take over only after it has seen the
  *same* version of the record, unrenewed, for a full ``lease`` by its own clock, counted from the moment
  the read that first returned that version *came back* (later than the leader's send time ``s``).
* So a candidate writes no earlier than ``s + lease`` in real time, while the old leader stopped at
  ``s + lease - drift_margin`` by a clock that may run slow by up to ``drift_margin / lease``.

Worked example (lease 5 s, renew 1 s, poll 0.5 s, margin 0.5 s): the leader's last successful renewal was
sent at t=100.0 and landed at 100.02. It serves until 104.5 by its clock. A candidate's poll comes back at
100.3 with that version and keeps seeing it; at 105.3 it takes the record over (a compare-and-swap on that
version, so a late renewal makes the takeover fail instead), claims the store, applies what the old leader
committed and starts writing: failover within ``lease + poll`` of the last renewal, plus the catch-up.

A graceful stop (``resign``) or ``transfer`` (etcd's MoveLeader) hands over without waiting out the lease:
the old leader stops acting as leader *before* it writes the record that lets the next one in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class TimingRule:
    lease: float = 5.0  # how long one renewal proves leadership
    renew: float = 1.0  # how often the leader renews
    poll: float = 0.5  # how often the others read the leader record
    drift_margin: float = 0.5  # clock-rate slack the leader gives up at the end of each lease

    def __post_init__(self) -> None:
        if not 0 < self.drift_margin < self.lease or not 0 < self.renew < self.lease - self.drift_margin:
            raise ValueError(f"inconsistent leadership timing: {self}")

    @classmethod
    def for_lease(cls, lease: float) -> TimingRule:
        """The rule fastetcd runs with for ``--ha-lease``: renew at 1/5, poll at 1/10, give up 1/10."""
        return cls(lease=lease, renew=lease / 5, poll=lease / 10, drift_margin=lease / 10)

    @property
    def failover_bound(self) -> float:
        """Seconds from the leader's last successful renewal until a successor may write."""
        return self.lease + self.poll


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    client_urls: tuple[str, ...]


@dataclass(frozen=True)
class Leader:
    member: Member
    term: int  # the leadership epoch (etcd's raft_term): +1 on every change of leader


class Leadership(Protocol):
    timing: TimingRule
    # Set when this node led and can no longer prove it (renewal failed past valid_until, or the record
    # was taken): the node must stop writing and serving linearizable reads at once. Cleared by campaign().
    lost: asyncio.Event

    async def start(self) -> None:
        """Publish this member and begin observing the leader record (members(), leader())."""

    async def campaign(self) -> int:
        """Return once this node leads, having kept the timing rule; the leadership term."""

    def valid_until(self) -> float:
        """``time.monotonic()`` until which this node's leadership is proven; 0.0 when it does not lead."""

    def leader(self) -> Leader | None:
        """The newest leader observed (possibly this node); None while there is none."""

    def members(self) -> list[Member]:
        """Members seen alive recently, this one included, ordered by id."""

    async def transfer(self, member_id: int) -> None:
        """Hand leadership to ``member_id`` (which must be alive) without waiting out the lease."""

    async def resign(self) -> None:
        """Stop leading now and let any other member take over at once."""

    async def close(self) -> None:
        """Stop renewing and observing; a leader resigns first."""
