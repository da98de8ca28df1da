"""Types the fixtures in conftest.py hand to tests; the processes themselves come from fastetcd.testing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastetcd.testing import ServerProcess


@dataclass
class ServerPair:
    """The server under test and the oracle it is compared with."""

    subject: ServerProcess
    oracle: ServerProcess


# start(kind, name, extra_args=(), **kwargs) -> ServerProcess; see the server_factory fixture.
ServerFactory = Callable[..., ServerProcess]
