"""Interoperability with grpcio (Python's gRPC stack): the shared scenario (tests/interop/scenario.py) on
the project's generated stubs, against fastetcd on both transports and real etcd 3.5.1."""

from __future__ import annotations

from interop import grpcio_client
from interop.scenario import check, params_for

from fastetcd.testing import ServerProcess


def test_grpcio_scenario(interop_server: ServerProcess, interop_server_kind: str) -> None:
    params = params_for(interop_server, "grpcio")
    result = grpcio_client.run(vars(params))
    check(result, params, interop_server_kind)
