#!/usr/bin/env bash
# GPU truth in one command (issue 11): on a bare machine with an NVIDIA GPU and a CUDA torch, build for the
# local arch, run the CUDA tests, compute-sanitizer on small named cases (scripts/gpu_cases.py, the repros of
# bugs 1 and 3 among them), the kernel microbenchmarks on the GPU grid and the end-to-end oracle benchmark at
# 7B shapes (random weights initialised on the GPU), eager and compiled; writes benchmarks/results/<gpu>-check.md
# and prints a one-screen summary. Every stage is timed and can be skipped by name.
#
#   bash scripts/gpu_check.sh                       # everything (target: <= 10 minutes on an H100 / H200)
#   bash scripts/gpu_check.sh --skip e2e,sanitizer
#   bash scripts/gpu_check.sh --deadline 540 --logs DIR   # stop starting / cut stages at 540 s; logs in DIR
#   bash scripts/gpu_check.sh --smoke               # CPU smoke mode (CI): same stages, CPU build, tiny grid
#
# Stages, in this order: build errors tests kernels e2e compiled sanitizer (the slowest last). A stage cut by
# --deadline counts as failed (exit 124 in its row). Exit status: the number of failed stages (0: all passed).
# Installs nothing from the network. First run (H200, 2026-12-04): build 50 s; see benchmarks/results/gpu-notes.md.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
SKIP=","
DEADLINE=0
LOGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --skip) SKIP=",$2,"; shift ;;
    --skip=*) SKIP=",${1#--skip=},"; ;;
    --deadline) DEADLINE=$2; shift ;;
    --logs) LOGS=$2; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build is importable from scripts/ too
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
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || { echo "gpu_check: --deadline takes whole seconds, got $DEADLINE" >&2; exit 2; }
RESULTS=benchmarks/results
LOGS=${LOGS:-$(mktemp -d -t vispec-gpu-check-XXXX)}
mkdir -p "$RESULTS" "$LOGS"
SUMMARY=()
FAILED=0

stage() {  # stage NAME COMMAND...: timed, logged, skippable
  local name=$1; shift
  if [[ "$SKIP" == *",$name,"* ]]; then
    SUMMARY+=("| $name | skipped | - |"); echo "== $name: skipped"; return
  fi
  local limit=()
  if [ "$DEADLINE" -gt 0 ]; then  # the stage gets what is left of the deadline; none is started with under 10 s
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
      SUMMARY+=("| $name | not run: deadline reached | - |"); FAILED=$((FAILED + 1)); echo "== $name: deadline reached"; return
    fi
    limit=(timeout --kill-after=5 "$left")
  fi
  echo "== $name: $*"
  local t0=$SECONDS
  "${limit[@]}" bash -c '"$@"' stage "$@" > "$LOGS/$name.log" 2>&1
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
  command -v ninja > /dev/null && command -v cmake > /dev/null || "$PY" -m pip install -q ninja cmake
  VISPEC_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace &&
    "$PY" -c "from vispec import ops; assert ops.cuda_built(), 'CUDA kernels missing'; print('CUDA kernels built for sm_$arch')"
}

errors() {  # an op's input check must come back as a Python RuntimeError on each device
  local dev r rc=0
  for dev in cpu $([ "$SMOKE" = 1 ] || echo cuda); do
    echo "-- $dev"
    "$PY" scripts/gpu_cases.py --device "$dev" --errors
    r=$?
    if [ "$r" -ge 128 ] && command -v cuda-gdb > /dev/null; then  # died of a signal (a segfault was seen on an H200)
      echo "-- exit $r: native backtrace (cuda-gdb)"
      cuda-gdb -q -batch -ex run -ex bt --args "$PY" scripts/gpu_cases.py --device "$dev" --errors 2>&1 | tail -n 60
    fi
    [ "$r" = 0 ] || rc=1
  done
  return $rc
}

tests() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m pytest -q -x tests/test_verify.py tests/test_tree_attention.py -k "cpu and (last_kept or nan or zero_uniform)"
  else
    # Workers (pytest-xdist, where installed) so that a test that kills its process fails alone, not the stage.
    local workers=()
    "$PY" -c "import xdist" 2> /dev/null && workers=(-n 4)
    "$PY" -m pytest -q "${workers[@]}" tests/test_verify.py tests/test_tree_attention.py tests/test_compact_kv.py \
      tests/test_opcheck.py -k "cuda" -p no:randomly
  fi
}

sanitizer() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" scripts/gpu_cases.py --device cpu
    return
  fi
  "$PY" scripts/gpu_cases.py --device cuda || return 1
  local tool rc=0 t0 filter
  for tool in memcheck racecheck synccheck initcheck; do
    # initcheck sees all kernels: with the filter, the writes of torch's (unchecked) kernels go untracked and every
    # later read of their outputs is reported uninitialised (seen on an H200: thousands of cudaMemcpy reports).
    filter=(--kernel-name kns=vispec)
    [ "$tool" = initcheck ] && filter=()
    echo "-- compute-sanitizer --tool $tool ${filter[*]}"
    t0=$SECONDS
    compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 10 --show-backtrace device "${filter[@]}" \
      "$PY" scripts/gpu_cases.py --device cuda || rc=1
    echo "-- $tool: $((SECONDS - t0)) s"
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

e2e() {  # eager: both 7B models, every oracle acceptance
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m vispec.bench.e2e --suite medium --quick --prompts 1 --models LLaVA-NeXT --acceptance 1.0 --device cpu \
      --out "$LOGS/e2e.md"
  else
    "$PY" -m vispec.bench.e2e --suite 7b
  fi
}

compiled() {  # the tree forward under torch.compile (CUDA graphs on a GPU) beside eager, on one model
  if [ "$SMOKE" = 1 ]; then
    "$PY" -m vispec.bench.e2e --suite medium --quick --prompts 1 --models LLaVA-NeXT --acceptance 1.0 --device cpu \
      --compile --out "$LOGS/compiled.md"
  else
    "$PY" -m vispec.bench.e2e --suite 7b --compile --models LLaVA-NeXT --acceptance 1.0 0.5 \
      --out "$RESULTS/e2e-7b-compiled-$LABEL.md"
  fi
}

export PY SMOKE LOGS RESULTS LABEL  # the stages run in their own bash (so that the deadline can cut them)
export -f build errors tests sanitizer kernels e2e compiled
# The slowest stage last: under a deadline the numbers that were never measured come first.
AFTER_BUILD=(errors tests kernels e2e compiled sanitizer)
stage build build
if [ "$FAILED" -gt 0 ]; then  # nothing after a failed build measures the kernels: say so instead of timing fallbacks
  for s in "${AFTER_BUILD[@]}"; do SUMMARY+=("| $s | not run: build failed | - |"); done
else
  for s in "${AFTER_BUILD[@]}"; do stage $s $s; done
fi

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
