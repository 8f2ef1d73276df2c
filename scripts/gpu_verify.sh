#!/usr/bin/env bash
# One command for the first GPU window (≤ 8 minutes wall on an H200): what the CUDA backend
# could not check without a GPU. Every step runs under its own `timeout`; the whole log and every
# report go under $OUT (default ./gpu-out):
#
#   verify.log            everything below, as it ran
#   summary.txt           one line per step: PASS / FAIL (exit status) / SKIP (reason), seconds
#   env.log               nvidia-smi, versions, numba's device detection
#   pytest_gpu.log/.xml   (a) NBBN_TEST_GPU=1 pytest -m 'not slow' tests/test_cuda*.py (PTX
#                         check excluded: CI runs it)
#   sanitize_<tool>.log   (b) compute-sanitizer memcheck, racecheck, synccheck over
#                         scripts/gpu_sanitize.py (multi-block shapes reaching every reduction
#                         path); SKIP with the reason when compute-sanitizer is absent
#   bench/gpu_bench.csv   (c) scripts/gpu_bench.py: ResNet-50 and NC shapes, float32, float16,
#                         bfloat16, nbbn v1 and v2 vs PyTorch CUDA and a device copy (CUDA
#                         events, each point checked before it is timed)
#
# Runs with the system python3 (numba, numba-cuda, torch, cupy, pandas, click, pytest,
# pytest-benchmark); the tree is not installed: PYTHONPATH is the repo root. Compiled kernels
# are shared between the steps through Numba's disk cache under $OUT (NBBN_CUDA_CACHE=1).
#
# Usage: scripts/gpu_verify.sh [--dry-run] [--steps env,tests,sanitize,bench]
#        OUT=dir PYTHON=python3 BENCH_BUDGET=0.25 (seconds of timing per bench point)
set -u
cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
OUT="${OUT:-$REPO/gpu-out}"
PY="${PYTHON:-python3}"
DRY=0
STEPS="env,tests,sanitize,bench"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) STEPS="$2"; shift ;;
        --steps=*) STEPS="${1#--steps=}" ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Time budget of each step in seconds (the `timeout` it runs under, plus KILL_AFTER if it
# ignores SIGTERM). Sum of budgets and kill-afters ≤ 480.
# BUDGET_SCALE (integer, default 1) multiplies every budget: a rehearsal under the CUDA simulator
# runs the same steps one block at a time, far slower than a GPU, on a host of unknown speed.
S="${BUDGET_SCALE:-1}"
B_ENV=$((20 * S)) B_TESTS=$((160 * S)) B_DRIVER=$((20 * S)) B_SAN=$((40 * S)) B_BENCH=$((110 * S))
KILL_AFTER=5
declare -a PLAN=()
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
want env && PLAN+=("env $B_ENV")
want tests && PLAN+=("pytest_gpu $B_TESTS")
if want sanitize; then
    PLAN+=("sanitize_driver $B_DRIVER")
    for tool in memcheck racecheck synccheck; do PLAN+=("sanitize_$tool $B_SAN"); done
fi
want bench && PLAN+=("bench $B_BENCH")
TOTAL=0
for p in "${PLAN[@]}"; do TOTAL=$((TOTAL + ${p##* } + KILL_AFTER)); done

if [ "$DRY" -eq 1 ]; then
    echo "plan (OUT=$OUT, python=$PY):"
    for p in "${PLAN[@]}"; do printf '  %-20s timeout %4d s\n' "${p% *}" "${p##* }"; done
    echo "total budget: $TOTAL s with ${KILL_AFTER} s kill-after per step" \
        "($((TOTAL / 60)) min $((TOTAL % 60)) s; limit 480 s)"
    [ "$TOTAL" -le 480 ] || { echo "over budget" >&2; exit 1; }
    exit 0
fi

mkdir -p "$OUT"
exec > >(tee -a "$OUT/verify.log") 2>&1
# NBBN_VERIFY_SIMULATOR=1 keeps the simulator: the test suite rehearses the script's logic.
[ "${NBBN_VERIFY_SIMULATOR:-0}" = 1 ] || unset NUMBA_ENABLE_CUDASIM
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export NBBN_CUDA_CACHE=1 NUMBA_CACHE_DIR="$OUT/numba-cache"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# step NAME BUDGET CMD...: CMD under `timeout BUDGET`, output to $OUT/NAME.log.
step() {
    local name=$1 budget=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (timeout ${budget}s): $*"
    timeout --kill-after="$KILL_AFTER" "$budget" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local dt=$((SECONDS - t0)) verdict=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="FAIL (timed out)"; FAILED=1
    elif [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; FAILED=1; fi
    printf '%-20s %-18s %4ss  %s\n' "$name" "$verdict" "$dt" "$OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
}
skip() { printf '%-20s %-18s %4ss  %s\n' "$1" "SKIP" 0 "$2" | tee -a "$SUMMARY"; }

if want env; then
    step env "$B_ENV" bash -c "nvidia-smi; '$PY' -c 'import platform, numba, numba_cuda, torch; \
print(platform.platform(), \"numba\", numba.__version__, \"numba-cuda\", numba_cuda.__version__, \
\"torch\", torch.__version__, torch.cuda.is_available()); from numba import cuda; \
import sys; sys.exit(0 if cuda.detect() else 1)'"
fi

if want tests; then
    # -o addopts=...: the device's python has no pytest-xdist, and pyproject's addopts say -n auto.
    step pytest_gpu "$B_TESTS" env NBBN_TEST_GPU=1 "$PY" -m pytest -o addopts="--strict-markers" \
        -m "not slow" -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
        $(ls tests/test_cuda*.py | grep -v test_cuda_ptx.py)
fi

if want sanitize; then
    # The driver alone first: if its results are off, the sanitizer's verdicts are moot.
    step sanitize_driver "$B_DRIVER" "$PY" scripts/gpu_sanitize.py ${SANITIZE_ARGS:-}
    SANITIZER="$(command -v compute-sanitizer || true)"
    for c in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
        [ -n "$SANITIZER" ] || { [ -x "$c" ] && SANITIZER="$c"; }
    done
    for tool in memcheck racecheck synccheck; do
        if [ -n "$SANITIZER" ]; then
            step "sanitize_$tool" "$B_SAN" "$SANITIZER" --tool "$tool" --error-exitcode 99 \
                --print-limit 50 "$PY" scripts/gpu_sanitize.py ${SANITIZE_ARGS:-}
        else
            skip "sanitize_$tool" "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        fi
    done
fi

if want bench; then
    step bench "$B_BENCH" "$PY" scripts/gpu_bench.py --out "$OUT/bench" \
        --budget "${BENCH_BUDGET:-0.25}"
fi

echo "== summary ($OUT/summary.txt):"
cat "$SUMMARY"
echo "$(grep -c ' PASS ' "$SUMMARY") passed, $(grep -c ' FAIL' "$SUMMARY") failed, \
$(grep -c ' SKIP ' "$SUMMARY") skipped"
exit "$FAILED"
