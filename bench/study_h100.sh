#!/usr/bin/env bash
# An ablation study on the device machine, spread over several calls: each call runs some batches
# of (variants, seeds) and packs what it has; rows of earlier calls come in through RESULTS_IN.
#   source bench/device_prelude.sh && STUDY_SECONDS=540 RESULTS_IN=.carry/study/results.jsonl \
#     bench/study_h100.sh studies/h100_stack.toml "baseline,embed8,no_lqer,lzma:1337,42" "gate32:1337"
# A batch is VARIANTS:SEEDS (comma-separated; either side empty: all). Post-training variants need
# their baseline's checkpoint, so they go in the same call as that baseline. After STUDY_SECONDS the
# study stops (an interrupted run is redone next time); results.jsonl, the report and every run's
# small files go to $OUT/study.tar.gz. Rebuild the report anywhere from the rows:
#   python -m golf study report STUDY --results results.jsonl --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${1:-studies/h100_stack.toml}
shift || true
OUT=${OUT:-bench_out}
WORK=${WORK:-/tmp/study}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
mkdir -p "$OUT" "$WORK"
OUT=$(realpath "$OUT")
deadline=$((SECONDS + ${STUDY_SECONDS:-540}))
if [ -n "${RESULTS_IN:-}" ] && [ -f "$RESULTS_IN" ] && [ ! -f "$WORK/results.jsonl" ]; then
  cp "$RESULTS_IN" "$WORK/results.jsonl"
fi
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
  python3 -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  tail -1 "$OUT/build_sp8192.log"
fi
[ $# -gt 0 ] || set -- ":"
for batch in "$@"; do
  variants=${batch%%:*} seeds=${batch#*:}
  left=$((deadline - SECONDS))
  [ "$left" -gt 30 ] || { echo "no time left for batch $batch" | tee -a "$OUT/study.console"; continue; }
  args=(--out "$WORK")
  [ -z "$variants" ] || args+=(--only "$variants")
  [ -z "$seeds" ] || args+=(--seeds "$seeds")
  # timeout signals the whole process group: the study runner and the run it has started
  rc=0
  timeout -s INT --kill-after=30 "$left" python3 -m golf study run "$STUDY" "${args[@]}" 2>&1 \
    | tee -a "$OUT/study.console" || rc=$?
  [ "$rc" = 0 ] || echo "batch $batch stopped (exit $rc): run it again to resume" | tee -a "$OUT/study.console"
done
python3 -m golf study report "$STUDY" --results "$WORK/results.jsonl" --out "$WORK/report" 2>&1 \
  | tee -a "$OUT/study.console" || true
(cd "$WORK" && tar czf "$OUT/study.tar.gz" results.jsonl report $(ls logs/*.txt logs/*.json logs/*.out 2>/dev/null))
ls -l "$OUT/study.tar.gz"
