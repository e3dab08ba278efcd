#!/usr/bin/env bash
# ms/step of the record stack's proxy, variant against variant on one GPU in one call (issue 6):
#   source bench/device_prelude.sh && VARIANTS="base@.carry/base;now;cd:TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1" \
#     OUT=$OUT RUNS=/tmp/runs bench/step_ab.sh
# A variant is NAME[@REV][:ENV=VALUE ...]. @REV trains with another checkout's code: REV is a folder
# holding one, or a commit (a git worktree; the device machine's copy of .git may predate your commits,
# so there `git archive REV --prefix=NAME/ | tar -x -C .carry` and carry it). The settings apply to that
# variant's run only. Each variant trains bench/record_h100.sh proxy for BUDGET seconds (default 55,
# looping from ENABLE_LOOPING_AT=0.42: ~240 unlooped and ~220 looped steps on an H100) and is stopped
# at the training's end: its ms/step per phase are computed here from the log lines the trainer's own
# phase summary uses (`looping_enabled`, `stopping_early`), without the final validation and export
# (so PROFILE_STEPS tables reach the console only, not the run's summary).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-bench_out}")
RUNS=$(realpath -m "${RUNS:-$OUT}")
SOURCES=$(realpath -m "${SOURCES:-../shared/data}")  # absolute: a variant at another commit runs in its own worktree
BUDGET=${BUDGET:-55}
export ENABLE_LOOPING_AT=${ENABLE_LOOPING_AT:-0.42}
mkdir -p "$OUT" "$RUNS"
IFS=';' read -ra variants <<< "${VARIANTS:?VARIANTS=NAME[@REV][:ENV=VALUE ...];...}"
for variant in "${variants[@]}"; do
  head=${variant%%:*} settings=""
  [ "$head" != "$variant" ] && settings=${variant#*:}
  name=${head%%@*} dir=.
  if [ "$name" != "$head" ]; then
    dir=${head#*@}  # a folder holding another checkout, or a commit
    if [ ! -d "$dir" ]; then
      dir=/tmp/step_ab_${head#*@}
      [ -d "$dir" ] || git worktree add -q --detach "$dir" "${head#*@}"
    fi
  fi
  console="$OUT/ab_$name.console" pidfile="$RUNS/ab_$name.pid"
  rm -f "$pidfile"
  # the run gets its own process group, stopped once training has ended (the record's evaluation and
  # export would take longer than the training itself)
  env $settings RUN_ID="ab_$name" BUDGET="$BUDGET" OUT="$OUT" RUNS="$RUNS" SOURCES="$SOURCES" \
    setsid bash -c 'echo $$ > "$0"; cd "$1" && exec bench/record_h100.sh proxy' "$pidfile" "$dir" > "$console" 2>&1 &
  until [ -s "$pidfile" ]; do sleep 0.2; done
  pgid=$(cat "$pidfile")
  until grep -q "^stopping_early" "$console" || ! kill -0 "$pgid" 2>/dev/null; do sleep 2; done
  kill -- -"$pgid" 2>/dev/null || true
  wait || true
  awk -v name="$name" -v settings="$settings" '
    /compile_time:/ { match($0, /compile_time:[0-9.]+s/); compile = substr($0, RSTART + 13, RLENGTH - 13) }
    /^looping_enabled/ { split($2, a, ":"); loop_step = a[2]; split($3, b, ":"); loop_ms = b[2] + 0 }
    /^stopping_early/ { split($3, a, ":"); end_ms = a[2] + 0; split($4, b, "[:/]"); steps = b[2] }
    END {
      if (!steps || !loop_step) { printf "ab %-12s failed (see ab_%s.console)\n", name, name; exit }
      printf "ab %-12s unlooped %7.2f ms/step (%d steps)  looped %7.2f ms/step (%d steps)  compile %s  %s\n",
        name, loop_ms / loop_step, loop_step, (end_ms - loop_ms) / (steps - loop_step), steps - loop_step, compile, settings
    }' "$console" | tee -a "$OUT/step_ab.txt"
done
