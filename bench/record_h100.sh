#!/usr/bin/env bash
# The record stack (train_gpt.py defaults) on the SP8192 benchmark set, one GPU (SPEC.md section 9).
#   bench/record_h100.sh proxy [SEED]  98,304 tokens/step, no accumulation (one rank's share), 180 s
#   bench/record_h100.sh full          786,432 tokens/step, accumulation 8 (the exact 8-GPU math), 150 s
#   BUDGET=150 bench/record_h100.sh proxy  another training budget (seconds) for the proxy (or full)
#   bench/record_h100.sh smoke         proxy settings for 30 s: does everything compile and run
#   PROFILE_STEPS=20 bench/record_h100.sh smoke   plus a kernel table of 20 steps per phase (golf/profile.py)
# Builds the SP8192 benchmark set first from SOURCES (a copy of ../shared/data), unless it exists.
# Reference (public best script, same H100, same data): full 800 ms/step before looping, 1,200
# after, 42,765 MiB; proxy 105.6 / 155.0 ms/step, 42,177 MiB, 158-292 s compile, val_bpb 1.4197
# (in-training final val) after 180 s.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-proxy}
SEED=${2:-1337}
OUT=${OUT:-bench_out}
# RUNS gets the run's files (log, summary, checkpoints, Hessians: hundreds of MB); OUT the console
# and copies of the log and summary. On the device machine: RUNS=/tmp/runs, OUT=$OUT (what comes back).
RUNS=${RUNS:-$OUT}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
PY=${PY:-python3}
mkdir -p "$OUT" "$RUNS"
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
  "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  tail -1 "$OUT/build_sp8192.log"
fi
export DATA_PATH="$BENCH/datasets/bench_sp8192" TOKENIZER_PATH="$BENCH/tokenizers/fineweb_8192_bpe.model"
export LOG_DIR="$RUNS" VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=100 PYTHONUNBUFFERED=1 SEED GPTQ_RESERVE_SECONDS=0
# Training numbers only, unless STAGES=1: the sliding-window and TTT stages need their own call
# (bench/quant_eval_h100.sh runs them on the checkpoint this leaves in RUNS).
if [ "${STAGES:-0}" != 1 ]; then export EVAL_STRIDE=0 TTT_ENABLED=0; fi
set -o pipefail
run() {
  local rc=0
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py 2>&1 | tee "$OUT/$RUN_ID.console" || rc=$?
  if [ "$RUNS" != "$OUT" ]; then cp "$RUNS/$RUN_ID.txt" "$RUNS/$RUN_ID.json" "$OUT"/ 2>/dev/null || true; fi
  return $rc
}
case "$MODE" in
  proxy) RUN_ID=${RUN_ID:-record_proxy_180s_seed$SEED} MAX_WALLCLOCK_SECONDS=${BUDGET:-180} TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 run ;;
  full)  RUN_ID=${RUN_ID:-record_full_150s} MAX_WALLCLOCK_SECONDS=${BUDGET:-150} TRAIN_BATCH_TOKENS=786432 GRAD_ACCUM_STEPS=8 run ;;
  smoke) RUN_ID=${RUN_ID:-record_smoke} MAX_WALLCLOCK_SECONDS=30 TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 \
         TRAIN_LOG_EVERY=10 run ;;
  *) echo "usage: $0 proxy [SEED] | full | smoke" >&2; exit 2 ;;
esac
