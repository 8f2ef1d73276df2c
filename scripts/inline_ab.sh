#!/usr/bin/env bash
# A/B of the CPU kernels' helper inlining (nbbn/cpu/kernels.py): the same tree with the helpers
# back under Numba's inline="always" (A, round 3's kernels) against HEAD's plain @njit helpers
# (B), each timed by the default `nbbn bench` sweep (paired against PyTorch in the same rounds),
# then `nbbn compare A B --metric baseline`: does nbbn's speed-up over PyTorch change?
#
#   scripts/inline_ab.sh B_RUN_DIR OUT_DIR   # B_RUN_DIR: a default sweep of HEAD (A/A run 1)
set -euo pipefail
cd "$(dirname "$0")/.."
B=$(realpath "${1:?B run dir}"); mkdir -p "${2:?out dir}"; OUT=$(realpath "$2"); PY=${PY:-python}
WT=$(mktemp -d /tmp/nbbn-inline-XXXX)
git worktree add --detach "$WT" HEAD >/dev/null
trap 'git worktree remove --force "$WT"' EXIT
# A: every helper decorator back to inline="always" (the kernels themselves are made by twin()).
sed -i 's/^@njit$/@njit(inline="always")/; s/^@njit(fastmath=_FM)$/@njit(fastmath=_FM, inline="always")/' \
    "$WT/nbbn/cpu/kernels.py"
n=$(grep -c 'inline="always"' "$WT/nbbn/cpu/kernels.py"); echo "A: $n helpers inline=\"always\""
mkdir -p "$OUT"
{ echo "A: HEAD $(git rev-parse --short HEAD) with $n helpers inline=\"always\"; B: $B"; date -u; uptime; } > "$OUT/protocol.log"
(cd "$WT" && $PY -m nbbn bench --threads 2 --no-plots --out "$OUT/run-inline") 2>&1 | tee -a "$OUT/protocol.log"
{ date -u; uptime; } >> "$OUT/protocol.log"
$PY -m nbbn compare "$OUT/run-inline" "$B" --metric baseline --csv "$OUT/compare.csv" 2>&1 | tee -a "$OUT/protocol.log"
