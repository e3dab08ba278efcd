#!/usr/bin/env bash
# ./run.sh        the main job: on a GPU box, train_gpt.py on every visible GPU with the defaults;
#                 with no GPU, a small real CPU run on the embedded sample (or on DATA_PATH).
# ./run.sh test   the test suite.
# Environment overrides pass through to the trainer (e.g. SEED=7 ./run.sh).
set -euo pipefail
cd "$(dirname "$0")"

network_up() {
  python3 -c "import socket; socket.create_connection(('pypi.org', 443), 3).close()" 2>/dev/null
}

# A Python with the pinned packages: the existing one where it already has a CUDA torch and no
# network is reachable (a GPU machine without internet), otherwise .venv, made on first use.
pick_python() {
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && ! network_up; then
    PY=python3
    return
  fi
  local stamp=.venv/.requirements.sha
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv with the pinned packages (requirements.txt)..."
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade -r requirements.txt
    echo "$want" > "$stamp"
  fi
  PY=.venv/bin/python
}

pick_python

if [ "${1:-}" = "test" ]; then
  shift
  exec "$PY" -m pytest -q tests "$@"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
  export DATA_PATH="${DATA_PATH:-./datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved}"
  export TOKENIZER_PATH="${TOKENIZER_PATH:-./tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model}"
  if ! compgen -G "$DATA_PATH/fineweb_train_*.bin" >/dev/null; then
    "$PY" -m data download caseops-sp8192 --train-shards "${TRAIN_SHARDS:-80}" --out .
  fi
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_gpt.py
fi

# CPU: the record stack scaled down (4 x 128, one extra pass over layers 1-2, a parallel last layer)
# on the SP1024 sample; trains for real in a few minutes on 2 cores.
export VOCAB_SIZE="${VOCAB_SIZE:-1024}" DATA_PATH="${DATA_PATH:-data/sample/datasets/fineweb10B_sp1024}"
export TOKENIZER_PATH="${TOKENIZER_PATH:-data/sample/tokenizers/fineweb_1024_bpe.model}"
export NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-4}" NUM_KV_HEADS="${NUM_KV_HEADS:-2}"
export NUM_LOOPS="${NUM_LOOPS:-1}" LOOP_START="${LOOP_START:-1}" LOOP_END="${LOOP_END:-2}" PARALLEL_START_LAYER="${PARALLEL_START_LAYER:-3}"
export XSA_LAST_N="${XSA_LAST_N:-4}" MIN_LR="${MIN_LR:-0}" EMA_DECAY="${EMA_DECAY:-0.97}" GPTQ_RESERVE_SECONDS="${GPTQ_RESERVE_SECONDS:-0}"
export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-256}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-4096}" GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-1}"
export ITERATIONS="${ITERATIONS:-150}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}" WARMUP_STEPS="${WARMUP_STEPS:-0}"
export WARMDOWN_FRAC="${WARMDOWN_FRAC:-0.5}" VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-50}" TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}"
export VAL_BATCH_TOKENS="${VAL_BATCH_TOKENS:-32768}" RUN_ID="${RUN_ID:-cpu_$(date +%Y%m%d_%H%M%S)}"
export TTT_EVAL_SEQ_LEN="${TTT_EVAL_SEQ_LEN:-256}" TTT_CHUNK_SIZE="${TTT_CHUNK_SIZE:-128}" TTT_LORA_RANK="${TTT_LORA_RANK:-8}" TTT_LORA_LR="${TTT_LORA_LR:-0.001}"
export PHASED_TTT_PREFIX_DOCS="${PHASED_TTT_PREFIX_DOCS:-0.2}" GPTQ_CALIBRATION_BATCHES="${GPTQ_CALIBRATION_BATCHES:-8}"
"$PY" train_gpt.py
"$PY" - "${LOG_DIR:-logs}/$RUN_ID.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
first = s["val_history"][0]
print(f"untrained val_bpb: {first['val_bpb']:.4f}")
for name, stage in s["stages"].items():
    print(f"{name + ':':22s}val_bpb {stage['val_bpb']:.4f} ({100 * (1 - stage['val_bpb'] / first['val_bpb']):.1f}% lower)")
print(f"artifact: {s['bytes']['total']} bytes ({s['bytes']['label']}), {s['steps']} steps")
print(f"log: {sys.argv[1][:-5]}.txt  summary: {sys.argv[1]}")
PYEOF
