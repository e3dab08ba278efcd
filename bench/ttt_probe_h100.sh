#!/usr/bin/env bash
# One device call: bench/ttt_probe.py eager, then compiled (TTT_COMPILE's regions) with Dynamo's recompile
# log, on the same synthetic documents; each under its own time cap. Logs in OUT.
#   source bench/device_prelude.sh && OUT=$OUT bench/ttt_probe_h100.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PY=${PY:-python3}
LENGTHS=${LENGTHS:-2600x64,900x64,300x64}
mkdir -p "$OUT"
timeout -k 5 "${EAGER_CAP:-150}" "$PY" bench/ttt_probe.py --compile 0 --lengths "$LENGTHS" --profile-len "${PROFILE_LEN:-1000}" 2>&1 | tee "$OUT/ttt_probe_eager.log"
TORCH_LOGS=recompiles timeout -k 5 "${COMPILED_CAP:-380}" "$PY" bench/ttt_probe.py --compile 1 --lengths "$LENGTHS" --profile-len "${PROFILE_LEN:-1000}" \
  > "$OUT/ttt_probe_compiled.log" 2>&1
grep -v "^V1\|^\s*- \|User stack\|return fn" "$OUT/ttt_probe_compiled.log" | tail -40
