#!/usr/bin/env bash
# The whole suite, the slow real-model tests included: what CI runs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
status=0
.venv/bin/python -m pytest -m "" "$@" || status=$?
# The ttnn backend against the pinned ttnn, in its own Python (see setup.sh). --noconftest: the
# main suite's fixtures need torch, which .venv-tt does not carry.
if [ -x .venv-tt/bin/python ]; then
  PYTHONPATH=. .venv-tt/bin/python -m pytest --noconftest -p no:cacheprovider -q tests/tt || status=$?
fi
exit $status
