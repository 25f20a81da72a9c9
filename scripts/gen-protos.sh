#!/usr/bin/env bash
# Regenerate the gRPC stubs from api/**/*.proto (checked in; a test fails when they are stale).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t protos < <(find api -name '*.proto' | sort)
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. \
  "${protos[@]}"
