#!/usr/bin/env bash
# One device call: bench/ttt_probe.py compiled (TTT_COMPILE's regions, with Dynamo's recompile log), then
# eager, on the same documents, each under its own time cap. Logs in OUT.
#   source bench/device_prelude.sh && OUT=$OUT bench/ttt_probe_h100.sh          # synthetic LENGTHS
#   VAL=1 COMPILED_CAP=340 EAGER_CAP=150 ... bench/ttt_probe_h100.sh             # the real val stream
#   VAL=1 MICRO=32768,131072 REPLICATE=2 EAGER_CAP=0 ... bench/ttt_probe_h100.sh # settings, a larger val
# VAL=1 builds the SP8192 benchmark set from SOURCES first (as bench/record_h100.sh does) and scores
# its val documents (REPLICATE copies of them); MICRO scores them once per TTT_MICRO_BATCH_TOKENS value
# in one process; PROFILE=LENxDOCS,... adds, per entry, one phase of DOCS documents LEN tokens long:
# its ms/step, kernel time against wall time, launches per step, kernels and host operators
# (PROFILE=4096x1,2048x64: a long document's chain of 2-row steps, then full steps);
# GRAPHS=0,64 scores (and profiles) once without and once with TTT_CUDA_GRAPHS=64, in one process;
# QUERIES=0,1 likewise with TTT_LAST_LAYER_QUERIES off and on; KERNELS=0,1 with the kernels switch
# (GOLF_KERNELS) off and on;
# EAGER_CAP=0 leaves out the eager run; PROBE_ARGS adds flags to the compiled run (e.g. --no-cudnn-sdpa).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PY=${PY:-python3}
BENCH=${BENCH:-/tmp/bench}
SOURCES=${SOURCES:-../shared/data}
LENGTHS=${LENGTHS:-2600x64,900x64,300x64}
PROFILE=${PROFILE:-}
mkdir -p "$OUT"
DOCS=(--lengths "$LENGTHS" --replicate "${REPLICATE:-1}" ${MICRO:+--micro-tokens "$MICRO"} ${GRAPHS:+--graphs "$GRAPHS"}
      ${QUERIES:+--queries "$QUERIES"} ${KERNELS:+--kernels "$KERNELS"})
if [ "${VAL:-0}" = 1 ]; then
  if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_val_000000.bin" ]; then
    "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
  fi
  DOCS=(--val "$BENCH/datasets/bench_sp8192/fineweb_val_[0-9]*.bin" "${DOCS[@]:2}")
fi
TORCH_LOGS=recompiles timeout -k 5 "${COMPILED_CAP:-380}" "$PY" bench/ttt_probe.py --compile 1 ${PROBE_ARGS:-} "${DOCS[@]}" \
  --profile "$PROFILE" > "$OUT/ttt_probe_compiled.log" 2>&1
grep -v "^V1\|^\s*- \|User stack\|return fn\|, [0-9]" "$OUT/ttt_probe_compiled.log" | tail -40
[ "${EAGER_CAP:-150}" = 0 ] && exit 0
timeout -k 5 "${EAGER_CAP:-150}" "$PY" bench/ttt_probe.py --compile 0 "${DOCS[@]}" --profile "$PROFILE" 2>&1 \
  | tee "$OUT/ttt_probe_eager.log"
