#!/usr/bin/env bash
# FlexAttention kernel options on one H100 (issues 5 and 6), one device call:
#   source bench/device_prelude.sh && OUT=$OUT RUNS=/tmp/runs bench/flex_h100.sh
# 1. bench/flex_tune.py on the first 48 rows of the SP8192 train stream (TUNE=prefixes of grid names,
#    default all; TUNE=none skips it): the kernels alone, each option set checked against torch's.
# 2. For each FLEX_KERNEL_OPTIONS value in FLEX_RUNS (space-separated; default "tuned torch"), the
#    record stack at full batch (bench/record_h100.sh full, BUDGET s, default 60) on the same machine,
#    so the ms/step of both phases compare inside one call. A value "best" takes step 1's winner.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
RUNS=${RUNS:-$OUT}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
PY=${PY:-python3}
TUNE=${TUNE:-}
mkdir -p "$OUT" "$RUNS"
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
  "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  tail -1 "$OUT/build_sp8192.log"
fi
best=tuned
if [ "$TUNE" != none ]; then
  "$PY" bench/flex_tune.py --shard "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" --only "$TUNE" \
    --json "$OUT/flex_tune.json" 2>&1 | grep -v Warning | tee "$OUT/flex_tune.log"
  best=$(sed -n 's/^flex_tune best as FLEX_KERNEL_OPTIONS: //p' "$OUT/flex_tune.log")
fi
for flex in ${FLEX_RUNS:-tuned torch}; do
  [ "$flex" = best ] && flex=$best
  tag=$(echo "$flex" | tr -c 'A-Za-z0-9\n' '_' | cut -c1-60)
  FLEX_KERNEL_OPTIONS=$flex RUN_ID=full_flex_$tag BUDGET=${BUDGET:-60} WARMUP_STEPS=${WARMUP_STEPS:-3} \
    OUT=$OUT RUNS=$RUNS BENCH=$BENCH bench/record_h100.sh full > /dev/null 2>&1 || echo "run $flex failed"
  grep -h "attention: flex\|^phase:\|^compile_time\|^peak memory" "$RUNS/full_flex_$tag.txt" | tail -8 || true
done
