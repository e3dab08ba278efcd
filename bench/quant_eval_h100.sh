#!/usr/bin/env bash
# Quantizers and evaluation modes compared on ONE trained checkpoint (issues: quant/, evaluation).
#   CKPT=bench_out/record_proxy_180s_seed1337_model.pre.bin bench/quant_eval_h100.sh quant
#       int8+zlib, round-to-nearest int6, GPTQ int6, GPTQ int6 + LQER (brotli), all at the configured
#       clips (FIT_BUDGET=0: bytes as they come, over the cap or not): bytes and val_bpb gap
#   CKPT=... bench/quant_eval_h100.sh eval     GPTQ+LQER round trip, sliding windows (stride 64), phased TTT
#   CKPT=... bench/quant_eval_h100.sh lora     GPTQ+LQER round trip, LoRA TTT without global phases
#   CKPT=... bench/quant_eval_h100.sh share    phased TTT on one GPU's share of the public evaluation:
#       6,250 documents drawn from the val shard (bench/val_share.py), global passes after 104, 208 and
#       312 of them (a rank's share of the public 833/1,666/2,500), 4 pieces a global SGD step (a
#       rank's share of 32); its bpb counts repeats, only its time and tokens/s are for reporting
# The checkpoint's Hessians (<RUN_ID>_hessians.bin) must sit beside it. Val data as in record_h100.sh;
# PHASED_TTT_PREFIX_DOCS defaults to 0.05 (the public 2,500 of 50,000 documents, scaled to 1,621).
# Logs go to OUT, the re-quantized model bytes to BINS (default OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quant}
OUT=${OUT:-bench_out}
BENCH=${BENCH:-/tmp/bench}
PY=${PY:-python3}
BINS=${BINS:-$OUT}
: "${CKPT:?set CKPT to a <RUN_ID>_model.pre.bin}"
export DATA_PATH="${DATA_PATH:-$BENCH/datasets/bench_sp8192}" TOKENIZER_PATH="${TOKENIZER_PATH:-$BENCH/tokenizers/fineweb_8192_bpe.model}"
export PYTHONUNBUFFERED=1 PHASED_TTT_PREFIX_DOCS="${PHASED_TTT_PREFIX_DOCS:-0.05}"
# rq NAME --stages KNOB=VALUE...
rq() { local name=$1 flag=$2; shift 2; env "$@" "$PY" -m quant requantize "$CKPT" -o "$BINS/rq_$name.bin" "$flag" 2>&1 | tee "$OUT/rq_$name.log"; }
case "$MODE" in
  quant)  # one process (checkpoint, data and pre-quant score loaded once); the most wanted row first
    "$PY" -m quant requantize "$CKPT" -o "$BINS/rq_table" --score \
      --variant gptq6_lqer:QUANT_METHOD=gptq,LQER_ENABLED=1,FIT_BUDGET=0 \
      --variant gptq6:QUANT_METHOD=gptq,LQER_ENABLED=0,FIT_BUDGET=0 \
      --variant rtn6:QUANT_METHOD=rtn,LQER_ENABLED=0,FIT_BUDGET=0 \
      --variant int8:QUANT_METHOD=int8 2>&1 | tee "$OUT/rq_table.log" ;;
  eval) rq all_stages --stages EVAL_STRIDE=64 ;;
  lora) rq lora_ttt --stages EVAL_STRIDE=0 PHASED_TTT_NUM_PHASES=0 ;;
  share)
    "$PY" bench/val_share.py --data "$DATA_PATH" --out "$BENCH/datasets/val_share" | tee "$OUT/val_share.log"
    rq share_ttt --stages DATA_PATH="$BENCH/datasets/val_share" EVAL_STRIDE=0 PHASED_TTT_NUM_PHASES=3 \
      PHASED_TTT_PREFIX_DOCS=312 GLOBAL_TTT_BATCH_SEQS=4 ;;
  *) echo "usage: $0 quant|eval|lora|share" >&2; exit 2 ;;
esac
