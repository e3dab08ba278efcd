#!/usr/bin/env bash
# Phased TTT's global pass on one H100 (issue 8), one device call: bench/global_pass_probe.py over the
# first 27/54/81 val documents for each layout, eager or with CUDA graphs, as one GPU alone and as
# rank 0 of 8 (its share of every step: about 4 pieces). One process per setting, logs in OUT.
#   source bench/device_prelude.sh && OUT=$OUT bench/global_pass_h100.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
SOURCES=${SOURCES:-../shared/data}
PY=${PY:-python3}
VAL="$SOURCES/fineweb/sp1024/fineweb_val_000000.bin"
mkdir -p "$OUT"
SECONDS=0
for world in 1 8; do
  for setting in rows packed packed_graphs; do
    layout=${setting%_graphs}
    graphs=0; [ "$setting" = packed_graphs ] && graphs=64
    log="$OUT/global_${setting}_world${world}.log"
    TTT_LAYOUT=$layout "$PY" bench/global_pass_probe.py --val "$VAL" --graphs $graphs --world $world > "$log" 2>&1 \
      || echo "global_pass_h100: $setting world $world failed (rc $?)"
    grep -h "^global_pass" "$log" | sed "s/^/$setting world:$world /"
  done
done
echo "global_pass_h100: done in ${SECONDS}s"
