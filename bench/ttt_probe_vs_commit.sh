#!/usr/bin/env bash
# TTT speed of an older commit against this tree on the same GPU (machines of one kind differ by a few
# percent, so a change worth that much needs both on one machine): bench/ttt_probe.py compiled, first
# phase of the SP8192 val shard, once from a copy of the older code, then from this tree.
#   here:   mkdir -p .carry/old && git archive COMMIT -- golf train_gpt.py bench data kernels quant | tar -x -C .carry/old
#   device: source bench/device_prelude.sh && OUT=$OUT bench/ttt_probe_vs_commit.sh      (carry .carry)
# OLD (default .carry/old) is the older code; PROBE_ARGS adds flags to both runs (e.g. --graphs 64),
# NEW_ARGS to this tree's only (e.g. --queries 1). Each run is capped at CAP seconds (compile included).
# Logs: OUT/old.log, OUT/new.log; the `ttt_probe done` lines compare scoring seconds and bpb.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
OLD=${OLD:-.carry/old}
PY=${PY:-python3}
BENCH=${BENCH:-/tmp/bench}
SOURCES=${SOURCES:-../shared/data}
CAP=${CAP:-255}
mkdir -p "$OUT"
if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_val_000000.bin" ]; then
  "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
fi
VAL="$BENCH/datasets/bench_sp8192/fineweb_val_[0-9]*.bin"
(cd "$OLD" && timeout -k 5 "$CAP" "$PY" bench/ttt_probe.py --compile 1 --val "$VAL" ${PROBE_ARGS:-} > "$OUT/old.log" 2>&1)
timeout -k 5 "$CAP" "$PY" bench/ttt_probe.py --compile 1 --val "$VAL" ${PROBE_ARGS:-} ${NEW_ARGS:-} > "$OUT/new.log" 2>&1
grep -H "compile_warmup\|ttt_probe done" "$OUT/old.log" "$OUT/new.log"
