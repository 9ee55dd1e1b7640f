#!/usr/bin/env bash
# The whole suite, the slow real-model tests included: what CI runs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -m "" "$@"
