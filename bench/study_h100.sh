#!/usr/bin/env bash
# An ablation study on the device machine, resumable across calls (rows of finished runs are kept in
# WORK and skipped next time, as long as the machine is still the same one).
#   source bench/device_prelude.sh && STUDY_SECONDS=540 bench/study_h100.sh [studies/h100_stack.toml]
# Stops the study after STUDY_SECONDS (an interrupted run is redone on the next call), then packs
# results.jsonl, the report and every run's small files into $OUT/study.tar.gz; the report is
# rebuilt anywhere with `python -m golf study report STUDY --results results.jsonl --out DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${1:-studies/h100_stack.toml}
OUT=${OUT:-bench_out}
WORK=${WORK:-/tmp/study}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
mkdir -p "$OUT" "$WORK"
OUT=$(realpath "$OUT")
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
  python3 -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  tail -1 "$OUT/build_sp8192.log"
fi
# timeout signals the whole process group: the study runner and the run it has started
rc=0
timeout -s INT --kill-after=30 "${STUDY_SECONDS:-540}" python3 -m golf study run "$STUDY" --out "$WORK" 2>&1 \
  | tee -a "$OUT/study.console" || rc=$?
[ "$rc" = 0 ] || echo "study stopped (exit $rc): rerun this script to resume" | tee -a "$OUT/study.console"
python3 -m golf study report "$STUDY" --results "$WORK/results.jsonl" --out "$WORK/report" 2>&1 | tee -a "$OUT/study.console" || true
(cd "$WORK" && tar czf "$OUT/study.tar.gz" results.jsonl report $(ls logs/*.txt logs/*.json logs/*.out 2>/dev/null))
ls -l "$OUT/study.tar.gz"
