#!/usr/bin/env bash
# The bench's reliability protocol (variance study, A/A, A/B, coverage), on a quiet host
# (2 cores): every step under `timeout`, everything written under results/reliability/.
# Prints the expected time first.
#
#   scripts/bench_reliability.sh            # run it (about 14 minutes; at most 20 expected)
#   scripts/bench_reliability.sh --dry-run  # print the commands and the expected times only
#
# (a) variance study: three runs of a 6-point subset (cpu, torch-cpu), each point's 6 trials in
#     3 worker processes, 2 each (--isolate workers --workers 3), a quiet gap apart;
#     `nbbn report variance` splits the variance of log(cpu/torch-cpu) over run > process >
#     trial > round and gives sigma_run, which the compares below pass as --run-sd.
# (b) A/A: two runs of the default sweep, GAP apart; nbbn compare between them
#     (expected: 0 faster, 0 slower).
# (c) A/B: the default sweep with cpu-slowed (cpu + 15% of each call's own time) beside cpu and
#     torch-cpu; nbbn compare of A/A run 1's cpu rows with it's cpu-slowed rows (--rename
#     cpu-slowed=cpu; expected: slower on >= 90% of points); the calibration check: the
#     cpu-slowed over cpu ratio in the same run (expected 1.15).
# (d) coverage: the share of points whose run-2 speed-up over PyTorch lies inside run 1's 95%
#     interval beside what correct intervals give (~83%), the share whose intervals agree
#     (target 95%), and the median half-width (nbbn report coverage).
# Every gap waits for a quiet host (1-minute load < QUIET, 0.5) for at most GAP_MAX (300 s)
# seconds, and at least GAP_MIN (30 s); protocol.log has the load before and after each step.
# (e) the --quick run's wall time (target <= 30 s); A/A run 1 is the fresh default sweep, its
#     estimate and wall time are in its run.json / protocol.log (target <= 3 minutes).
# (f) A/A and A/B in one run (round 6): a copy of this tree's nbbn/ loaded as cpu@copy
#     (--against) and cpu-slowed, timed beside cpu and torch-cpu in the same rounds; nbbn
#     compare --pair cpu@copy=cpu (A/A: expected 0 faster, 0 slower) and --pair cpu-slowed=cpu
#     (A/B: expected slower on >= 90%). A warm-up pass first compiles the copy's kernels (its
#     own Numba cache), so the timed run's budget is not spent compiling.
# STUDY=0 skips (a) and takes sigma_run from the committed $OUT/variance instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-results/reliability}
THREADS=${THREADS:-2}
GAP_MIN=${GAP_MIN:-30}
GAP_MAX=${GAP_MAX:-300}
QUIET=${QUIET:-0.5}
STUDY=${STUDY:-1}
COPY=${COPY:-/tmp/nbbn-ab-copy}
GAP="$PY -c 'import time; from nbbn.output import wait_for_quiet; time.sleep($GAP_MIN); q, l = wait_for_quiet($QUIET, $GAP_MAX, echo=print); print(\"quiet\" if q else \"NOT quiet\", l)'"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

SUBSET=(-s "NCHW:64,56,56" -s "NHWC:256,14,14" -s "NC:1024" -N 32)
STUDY_ARGS=(--backend cpu,torch-cpu --layout NCHW,NHWC,NC --op forward-train,inference
       --isolate workers --workers 3 --min-trials 6 --max-trials 6 --trial-time 0.1
       --max-time 10 --threads "$THREADS" --no-plots)

# step name | limit (s) | expected (s) | command
STEPS=()
step() { STEPS+=("$1|$2|$3|$4"); }
step "quiet" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
if [[ $STUDY == 1 ]]; then
  for r in 1 2 3; do
    step "study run $r" 240 90 "$PY -m nbbn bench ${STUDY_ARGS[*]} ${SUBSET[*]} --out $OUT/study-run$r"
    [[ $r -lt 3 ]] && step "gap" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
  done
  step "variance report" 120 10 "$PY -m nbbn report variance $OUT/study-run1 $OUT/study-run2 $OUT/study-run3 --out $OUT/variance"
fi
step "A/A run 1" 300 150 "$PY -m nbbn bench --threads $THREADS --no-plots --out $OUT/aa-run1"
step "gap" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
step "A/A run 2" 300 150 "$PY -m nbbn bench --threads $THREADS --no-plots --out $OUT/aa-run2"
step "A/A compare" 60 5 "$PY -m nbbn compare $OUT/aa-run1 $OUT/aa-run2 --metric baseline --run-sd \$RUN_SD --csv $OUT/aa-compare.csv"
step "gap" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
step "A/B run" 300 150 "$PY -m nbbn bench --backend cpu,cpu-slowed,torch-cpu --threads $THREADS --no-plots --out $OUT/ab-run"
step "A/B compare" 60 5 "$PY -m nbbn compare $OUT/aa-run1 $OUT/ab-run --rename cpu-slowed=cpu --metric baseline --run-sd \$RUN_SD --csv $OUT/ab-compare.csv"
step "A/B calibration" 30 2 "$PY scripts/ab_calibration.py $OUT/ab-run"
step "in-run copy" 30 2 "diff -rq -x __pycache__ nbbn $COPY/nbbn || { rm -rf $COPY && mkdir -p $COPY && cp -r nbbn $COPY/ && find $COPY -name __pycache__ -prune -exec rm -rf {} +; }"
step "in-run warm-up" 600 150 "$PY -m nbbn bench --against copy=$COPY --backend cpu,cpu@copy,cpu-slowed --isolate none --min-trials 1 --max-trials 1 --min-rounds 1 --trial-time 0 --max-time 0 --warmup 0 --no-plots --out /tmp/nbbn-inrun-warm-up"
step "gap" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
step "in-run A/A+A/B" 300 175 "$PY -m nbbn bench --against copy=$COPY --backend cpu,cpu@copy,cpu-slowed,torch-cpu --threads $THREADS --no-plots --out $OUT/inrun"
step "in-run A/A" 60 5 "$PY -m nbbn compare $OUT/inrun --pair cpu@copy=cpu --csv $OUT/inrun-aa.csv"
step "in-run A/B" 60 5 "$PY -m nbbn compare $OUT/inrun --pair cpu-slowed=cpu --csv $OUT/inrun-ab.csv"
step "gap" $((GAP_MAX + GAP_MIN + 10)) "$GAP_MIN" "$GAP"
step "quick timing" 90 30 "time $PY -m nbbn bench --quick --threads $THREADS --no-plots --out $OUT/quick"
step "coverage" 60 5 "$PY -m nbbn report coverage $OUT/aa-run1 $OUT/aa-run2 --csv $OUT/coverage.csv"

total=0; worst=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r _ lim exp _ <<<"$s"; total=$((total + exp)); worst=$((worst + lim))
done
echo "bench_reliability: ${#STEPS[@]} steps, expected about $((total / 60)) min $((total % 60)) s" \
     "(each step capped by timeout; all caps together $((worst / 60)) min) -> $OUT/"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name lim exp cmd <<<"$s"
  printf '  %-16s ~%4s s (timeout %4s s)  %s\n' "$name" "$exp" "$lim" "$cmd"
done
[[ $DRY == 1 ]] && exit 0

mkdir -p "$OUT"
LOG="$OUT/protocol.log"
{ date -u; uptime; } >"$LOG"
RUN_SD=0.049
if [[ $STUDY == 0 && -f $OUT/variance/variance-summary.csv ]]; then
  RUN_SD=$($PY -c "import pandas as pd; from nbbn.bench.variance import run_sd; print(f'{run_sd(pd.read_csv(\"$OUT/variance/variance-summary.csv\")):.4f}')")
fi
for s in "${STEPS[@]}"; do
  IFS='|' read -r name lim exp cmd <<<"$s"
  cmd=${cmd//\$RUN_SD/$RUN_SD}
  echo "== $name: $cmd" | tee -a "$LOG"
  start=$(date +%s)
  if ! timeout "$lim" bash -c "$cmd" 2>&1 | tee -a "$LOG"; then
    echo "== $name: FAILED or timed out (exit ${PIPESTATUS[0]})" | tee -a "$LOG"
  fi
  echo "== $name: $(( $(date +%s) - start )) s; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
  if [[ $name == "variance report" && -f $OUT/variance/variance-summary.csv ]]; then
    RUN_SD=$($PY -c "import pandas as pd; from nbbn.bench.variance import run_sd; print(f'{run_sd(pd.read_csv(\"$OUT/variance/variance-summary.csv\")):.4f}')")
    echo "== run_sd from the study: $RUN_SD" | tee -a "$LOG"
  fi
done
{ date -u; uptime; } >>"$LOG"
echo "done: $OUT/ (protocol.log, variance/, aa-*, ab-*, inrun*, coverage.csv)"
