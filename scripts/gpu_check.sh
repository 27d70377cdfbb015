#!/usr/bin/env bash
# GPU truth in one command (issue 11): on a bare machine with an NVIDIA GPU and a CUDA torch, build for the
# local arch, run the CUDA tests, compute-sanitizer on small named cases (scripts/gpu_cases.py, the repros of
# bugs 1 and 3 among them), the kernel microbenchmarks on the GPU grid and the end-to-end oracle benchmark at
# 7B shapes (random weights initialised on the GPU); writes benchmarks/results/<gpu>-check.md and prints a
# one-screen summary. Every stage is timed and can be skipped by name.
#
#   bash scripts/gpu_check.sh                       # everything (budget: <= 10 minutes on an H100)
#   bash scripts/gpu_check.sh --skip e2e,sanitizer
#   bash scripts/gpu_check.sh --smoke               # CPU smoke mode (CI): same stages, CPU build, tiny grid
#
# Stages: build tests sanitizer kernels e2e. Exit status: the number of failed stages (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
SKIP=","
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --skip) SKIP=",$2,"; shift ;;
    --skip=*) SKIP=",${1#--skip=},"; ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch (use --smoke for the CPU smoke mode)" >&2
  exit 2
fi
DEV=$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)
LABEL=$("$PY" - <<EOF
import torch
name = torch.cuda.get_device_name() if "$DEV" == "cuda" else "cpu-smoke"
print("".join(c if c.isalnum() or c in "._-" else "-" for c in name))
EOF
)
RESULTS=benchmarks/results
LOGS=$(mktemp -d -t vispec-gpu-check-XXXX)
mkdir -p "$RESULTS"
SUMMARY=()
FAILED=0

stage() {  # stage NAME COMMAND...: timed, logged, skippable
  local name=$1; shift
  if [[ "$SKIP" == *",$name,"* ]]; then
    SUMMARY+=("| $name | skipped | - |"); echo "== $name: skipped"; return
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  tail -n 15 "$LOGS/$name.log"
  if [ $rc = 0 ]; then SUMMARY+=("| $name | ok | $dt s |"); else SUMMARY+=("| $name | FAILED (exit $rc) | $dt s |"); FAILED=$((FAILED + 1)); fi
}

build() {
  if [ "$SMOKE" = 1 ]; then  # CI built the CPU extension already: check it loads and registers the ops
    "$PY" -c "import vispec, torch; from vispec import ops; print('ops:', [n for n in dir(torch.ops.vispec) if not n.startswith('_')])"
    return
  fi
  local arch
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  "$PY" -m pip install -q ninja cmake
  VISPEC_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace &&
    "$PY" -c "from vispec import ops; assert ops.cuda_built(), 'CUDA kernels missing'; print('CUDA kernels built for sm_$arch')"
}

tests() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m pytest -q -x tests/test_verify.py tests/test_tree_attention.py -k "cpu and (last_kept or nan or zero_uniform)"
  else
    "$PY" -m pytest -q tests/test_verify.py tests/test_tree_attention.py tests/test_compact_kv.py tests/test_opcheck.py \
      -k "cuda" -p no:randomly
  fi
}

sanitizer() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" scripts/gpu_cases.py --device cpu
    return
  fi
  "$PY" scripts/gpu_cases.py --device cuda || return 1
  local tool rc=0
  for tool in memcheck racecheck synccheck initcheck; do
    echo "-- compute-sanitizer --tool $tool (vispec kernels only)"
    compute-sanitizer --tool "$tool" --error-exitcode 9 --kernel-name kns=vispec \
      "$PY" scripts/gpu_cases.py --device cuda || rc=1
  done
  return $rc
}

kernels() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m vispec.bench.kernels --device cpu --smoke --no-ref --out "$LOGS/kernels.md"
  else
    "$PY" -m vispec.bench.kernels --device cuda --out "$RESULTS/$LABEL.md"
  fi
}

e2e() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m vispec.bench.e2e --suite medium --quick --prompts 1 --models LLaVA-NeXT --acceptance 1.0 --device cpu \
      --compile --out "$LOGS/e2e.md"
  else
    "$PY" -m vispec.bench.e2e --suite 7b --compile
  fi
}

stage build build
stage tests tests
stage sanitizer sanitizer
stage kernels kernels
stage e2e e2e

REPORT="$RESULTS/$LABEL-check.md"
[ "$SMOKE" = 1 ] && REPORT="$LOGS/check.md"
{
  echo "# scripts/gpu_check.sh on $LABEL"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  for f in "$LOGS"/*.log; do
    echo "## $(basename "$f" .log)"; echo; echo '```'; tail -n 40 "$f"; echo '```'; echo
  done
} > "$REPORT"
echo
printf '%s\n' "${SUMMARY[@]}"
echo "report: $REPORT (logs in $LOGS)"
exit $FAILED
