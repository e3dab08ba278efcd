#!/usr/bin/env bash
# LoRA TTT speed on one H100 (issue 8): TTT_COMPILE=1 against eager TTT on the same checkpoint, one
# device call of at most ~570 s.
#   source bench/device_prelude.sh && OUT=$OUT RUNS=/tmp/runs bench/ttt_h100.sh
# 1. A short training run (train_gpt.py, proxy batch, BUDGET s, CKPT_COMPILE: 0, eager, by default,
#    so no training compile eats the call) leaves a checkpoint + Hessians in RUNS; its final stage is
#    LoRA TTT with TTT_COMPILE=1 (no global phases, no sliding window): `final_ttt ... tokens_per_s`.
# 2. The same TTT, eager, on the same checkpoint through `python -m quant requantize --stages`, until
#    TOTAL s after the start: it may be cut; its `ttt_progress ... tokens:N elapsed:S` lines (every 8
#    batches, longest documents first) compare with the compiled run's at the same batch.
# EAGER=0 leaves out step 2; PHASED_TTT_NUM_PHASES (default 0 here), PHASED_TTT_PREFIX_DOCS and
# EVAL_STRIDE (default 0) pass through to the trainer, as do TTT_PRIME and TTT_CUDA_GRAPHS (both on
# by default: EAGER=0 times the final TTT's warm-up after a prime, scoring with graphs; TTT_PRIME=0
# TTT_CUDA_GRAPHS=0 times neither). Consoles go to OUT. The speed does not depend on how well the
# checkpoint is trained.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
OUT=${OUT:-bench_out}
RUNS=${RUNS:-$OUT}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
PY=${PY:-python3}
BUDGET=${BUDGET:-45}
TOTAL=${TOTAL:-560}
EAGER=${EAGER:-1}
mkdir -p "$OUT" "$RUNS"
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
  "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  tail -1 "$OUT/build_sp8192.log"
fi
export DATA_PATH="$BENCH/datasets/bench_sp8192" TOKENIZER_PATH="$BENCH/tokenizers/fineweb_8192_bpe.model"
export PYTHONUNBUFFERED=1 LOG_DIR="$RUNS" VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 GPTQ_RESERVE_SECONDS=0
export EVAL_STRIDE=${EVAL_STRIDE:-0} PHASED_TTT_NUM_PHASES=${PHASED_TTT_NUM_PHASES:-0} FIT_BUDGET=0 GPTQ_CALIBRATION_BATCHES=4
RUN_ID=ttt_ckpt
rc=0
RUN_ID=$RUN_ID MAX_WALLCLOCK_SECONDS=$BUDGET TRAIN_BATCH_TOKENS=98304 GRAD_ACCUM_STEPS=1 \
  COMPILE=${CKPT_COMPILE:-0} TTT_ENABLED=1 TTT_COMPILE=1 \
  timeout -k 5 $((TOTAL - (EAGER == 1 ? 60 : 5) - SECONDS)) "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py \
  2>&1 | tee "$OUT/ttt_compiled.console" || rc=$?
echo "ttt_h100: compiled run rc:$rc at ${SECONDS}s"
left=$((TOTAL - SECONDS))
if [ "$EAGER" = 1 ] && [ -f "$RUNS/${RUN_ID}_model.pre.bin" ] && [ "$left" -gt 30 ]; then
  TTT_COMPILE=0 timeout -k 5 "$left" "$PY" -m quant requantize "$RUNS/${RUN_ID}_model.pre.bin" \
    -o "$RUNS/rq_eager.bin" --stages 2>&1 | tee "$OUT/ttt_eager.console" || echo "ttt_h100: eager rc:$? at ${SECONDS}s"
fi
grep -h "ttt_progress\|final_ttt\|^ttt:\|final_quant_roundtrip \|compile" "$OUT"/ttt_*.console > "$OUT/ttt_summary.txt" || true
echo "ttt_h100: done in ${SECONDS}s"
