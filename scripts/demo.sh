#!/usr/bin/env bash
# Sets up (slow only the first time), serves draft, target and orchestrator on the default model,
# and streams one generation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m specdec.serve --prompt "${1:-Explain in two sentences why the sky is blue.}" --max-tokens "${MAX_TOKENS:-96}"
