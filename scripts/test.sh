#!/usr/bin/env bash
# The test command: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m pytest -q -rs --durations=15 "$@"
