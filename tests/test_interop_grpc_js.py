"""Interoperability with grpc-js (Node's gRPC stack, @grpc/grpc-js with the etcd protos loaded by
@grpc/proto-loader): the shared scenario (tests/interop/scenario.py), run by tests/interop/grpc_js/scenario.js
against fastetcd on both transports and real etcd 3.5.1. The npm packages are installed on first use."""

from __future__ import annotations

from interop.scenario import check, params_for, run_client
from interop.tools import GRPC_JS_DIR, grpc_js_client

from fastetcd.testing import ServerProcess


def test_grpc_js_scenario(interop_server: ServerProcess, interop_server_kind: str) -> None:
    client = grpc_js_client()
    params = params_for(interop_server, "grpc-js")
    result = run_client(client, params, cwd=GRPC_JS_DIR)
    assert result["client"].startswith("grpc-js 1.")
    check(result, params, interop_server_kind)
