#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: everything the CUDA backend could not check
# without one. Writes logs and reports under $OUT (default ./gpu_verify_out):
#
#   summary.txt          one line per step with its exit status and duration
#   env.log              nvidia-smi, numba's device detection, versions
#   gpu_present.log      fails the run if numba sees no GPU (every GPU test would be skipped)
#   pytest_gpu.log/.xml  NBBN_TEST_GPU=1 pytest -m "gpu or not gpu": the whole suite, CUDA tests
#                        on the real GPU
#   ptxcheck.json        every kernel compiled to PTX (cc 8.0 and 9.0; float32, float64, float16,
#                        bfloat16)
#   sanitizer_memcheck.log, sanitizer_racecheck.log, sanitizer_synccheck.log
#                        compute-sanitizer over the CUDA tests (small shapes; skipped, with the
#                        reason, when compute-sanitizer is not installed)
#   bench/, bench.log    the harness on issue #11's shape set: every cuda kernel version vs
#                        torch-cuda vs a device-to-device copy, timed round-robin in one loop
#                        (CUDA events behind a blocking kernel), float32 and float64:
#                        bench/summary.md, bench.csv, ratios.csv, run.json, plots
#
# Every step runs even if an earlier one failed; the script exits 1 if any step failed.
# Usage:  OUT=/some/dir scripts/gpu_verify.sh      (PYTHON=... to choose the interpreter;
#         BENCH_DTYPES=float32 BENCH_ARGS="--max-time 0.5" to shorten the benchmark step)
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_verify_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# step NAME CMD...: run CMD with stdout+stderr to $OUT/NAME.log, record its status, never abort.
step() {
    local name=$1
    shift
    local t0=$SECONDS rc
    echo "== $name: $*" | tee -a "$SUMMARY"
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    echo "   $name: exit $rc after $((SECONDS - t0)) s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
}

step env bash -c "nvidia-smi; $PY -c 'import platform, numba, numba_cuda; \
print(platform.platform(), numba.__version__, numba_cuda.__version__); \
from numba import cuda; cuda.detect()'; $PY -c 'import torch; print(torch.__version__, \
torch.cuda.is_available())'"

# Fails (and flags the run) when numba sees no GPU: the GPU tests would then all be skipped.
step gpu_present env -u NUMBA_ENABLE_CUDASIM "$PY" -c "import sys; from numba import cuda; \
ok = cuda.is_available(); print('numba.cuda.is_available():', ok); sys.exit(0 if ok else 1)"

step pytest_gpu env NBBN_TEST_GPU=1 "$PY" -m pytest -m "gpu or not gpu" \
    -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"

step ptxcheck bash -c "env -u NUMBA_ENABLE_CUDASIM '$PY' -m nbbn.cuda.ptxcheck > '$OUT/ptxcheck.json'"

SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [ -n "$SANITIZER" ] || { [ -x "$candidate" ] && SANITIZER="$candidate"; }
done
# Small shapes only: the sanitizer slows kernels 10-100x. The selection covers every kernel,
# both variants (v1 merge kernel, v2 ticket), every layout and dtype, block sizes 32 and 256.
SAN_TESTS=(tests/test_cuda.py -q -p no:cacheprovider -m "gpu or not gpu"
           -k "not medium and not torch and not plans and not availab")
for tool in memcheck racecheck synccheck; do
    if [ -n "$SANITIZER" ]; then
        step "sanitizer_$tool" env NBBN_TEST_GPU=1 "$SANITIZER" --tool "$tool" \
            --error-exitcode 99 --print-limit 50 "$PY" -m pytest "${SAN_TESTS[@]}"
    else
        echo "== sanitizer_$tool: skipped: compute-sanitizer not found (PATH, /usr/local/cuda/bin)" \
            | tee -a "$SUMMARY"
    fi
done

# BENCH_DTYPES (default float32,float64) and BENCH_ARGS (more options, e.g. "--max-time 0.5",
# or "--resume" to finish an interrupted sweep in the same OUT) shape the run.
step bench "$PY" -m nbbn.cli bench --sweep cuda-targets --backend cuda,torch-cuda --variant all \
    --dtype "${BENCH_DTYPES:-float32,float64}" --out "$OUT/bench" ${BENCH_ARGS:-}

echo "== done: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED')" \
    | tee -a "$SUMMARY"
exit "$FAILED"
