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

# .venv-tt: the pinned ttnn for the Tenstorrent backend's chip-less tests (tests/tt). ttnn installs
# only on Python 3.10 / 3.12 and needs no torch for those tests. Skipped, with a note, without either.
TTNN_VERSION=0.81.1
PYTHON_TT=${PYTHON_TT:-}
if [ -z "$PYTHON_TT" ]; then
  pyenv_versions=${PYENV_ROOT:-$HOME/.pyenv}/versions
  for candidate in "$pyenv_versions"/3.12*/bin/python python3.12 "$pyenv_versions"/3.10*/bin/python python3.10; do
    # A pyenv shim exists even where it cannot run, so each candidate must start and say its version.
    if "$candidate" -c 'import sys; assert sys.version_info[:2] in ((3, 10), (3, 12))' 2>/dev/null; then
      PYTHON_TT=$candidate
      break
    fi
  done
fi
if [ -z "$PYTHON_TT" ]; then
  echo "setup: no Python 3.12 or 3.10 found; the ttnn API tests (tests/tt) will be skipped" >&2
  [ -z "${SPECDEC_REQUIRE_TTNN:-}" ] || exit 1  # CI must run them
  exit 0
fi
if [ ! -x .venv-tt/bin/python ]; then
  "$PYTHON_TT" -m venv .venv-tt
fi
want_tt="ttnn==$TTNN_VERSION"
if [ "$(cat .venv-tt/.specdec-installed 2>/dev/null)" != "$want_tt" ]; then
  .venv-tt/bin/python -m pip install --quiet "ttnn==$TTNN_VERSION" "pytest>=8"
  echo "$want_tt" > .venv-tt/.specdec-installed
fi
