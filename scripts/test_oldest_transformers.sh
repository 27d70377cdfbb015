#!/usr/bin/env bash
# The engine tests again, under the oldest transformers that pyproject.toml declares (its one home):
# a virtual environment that sees this machine's packages (torch, vispec) but holds its own transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
oldest=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "no 'transformers>=X,' in pyproject.toml" >&2; exit 2; }
env_dir=${VISPEC_OLDEST_ENV:-/tmp/vispec-transformers-$oldest}
if [ ! -x "$env_dir/bin/python" ]; then
  $PY -m venv --system-site-packages "$env_dir"
fi
# [kernels]: newer transformers pull in `kernels`, whose later releases break the oldest's import
# (hub_kernels.py: "Either a revision or a version must be specified"); the extra pins the one it declares.
"$env_dir/bin/python" -m pip install -q "transformers[kernels]==$oldest"
"$env_dir/bin/python" -c "import transformers; assert transformers.__version__ == '$oldest', transformers.__version__"
echo "engine tests under transformers $oldest"
exec "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_engine_errors.py \
  tests/test_drafters.py tests/test_device_map.py tests/test_data.py tests/test_cli_generate.py "$@"
