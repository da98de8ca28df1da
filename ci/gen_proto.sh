#!/usr/bin/env bash
# Regenerates the committed Python code for proto/fastetcd/proto/*.proto. The output is committed (not built at
# install time) and tests/test_proto_current.py fails if it is stale, so run this after every .proto edit,
# with the grpcio-tools version pinned in pyproject.toml's test extra (the output embeds its version).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src proto/fastetcd/proto/*.proto
