#!/usr/bin/env bash
# Regenerates specdec/v1 from protos/ (tests/test_protos.py fails when they differ).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/specdec/v1/*.proto
