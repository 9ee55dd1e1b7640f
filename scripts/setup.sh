#!/usr/bin/env bash
# Creates .venv, installs torch (pinned: an unpinned torch pulls a multi-GB CUDA build), then the
# project, then fetches the default model into ~/.cache/specdec. A second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.specdec-installed
want="torch==$TORCH_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
  "$PY" -m pip install --quiet -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
"$PY" -m specdec.models fetch
