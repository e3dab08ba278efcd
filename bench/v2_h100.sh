#!/usr/bin/env bash
# Issue 9's numbers for the research trainer (train_gpt_v2.py) on one H100, in one device call of at
# most ~560 s: the MoE layer benchmark, then five one-rank-share proxy runs (SPEC.md section 9).
#
#   source bench/device_prelude.sh && OUT=$OUT bench/v2_h100.sh      # on the device (run's command)
#   BUDGET=30 TOTAL=500 ... bench/v2_h100.sh                          # shorter training / call budget
#   SKIP="v2_dense record_dense moe_bench" ... bench/v2_h100.sh        # leave out steps already measured
#
# In order:
#   1. the SP8192 benchmark set, built from SOURCES unless present (as bench/record_h100.sh does)
#   2. python3 bench/moe_bench.py (defaults: 8 experts top-2, expert hidden 2048, vs the dense MLP
#      of equal active parameters, hidden 4096; eager and compiled), capped at MOE_BENCH_TIMEOUT s
#   3. five training runs, torchrun on one GPU, proxy settings (98,304 tokens/step, no accumulation but in v2_24gb,
#      COMPILE_MODE=blocks, no sliding-window / TTT stages, GPTQ with 4 calibration batches, no
#      budget fitter), MAX_WALLCLOCK_SECONDS=BUDGET (40): looping starts at 35% of it, so about
#      115 steps unlooped and 150 looped for the dense model, enough for a stable ms/step per phase.
#        v2_dense     train_gpt_v2.py, defaults (the dense record configuration)   35,945,671 params
#        v2_moe8x2    MOE_EXPERTS=8 MOE_TOP_K=2 MOE_EXPERT_MULT=2 on all 11 layers (learned router,
#                     dropless): 105,196,743 total, 35,990,727 active per token (dense + the routers)
#        v2_som64x4   MOE_ROUTER=som MOE_EXPERTS=64 MOE_TOP_K=4 MOE_EXPERT_MULT=1 on all 11 layers:
#                     13,237,458 trainable, 369,098,752 frozen (23,068,672 of them active per token)
#        v2_24gb      the README's one-24-GB-GPU configuration: 16,384 tokens per micro-step
#                     (GRAD_ACCUM_STEPS=6), VAL_BATCH_TOKENS=65536, CUDA_MEMORY_FRACTION=0.3 (~24 GB of 80)
#        record_dense train_gpt.py with v2_dense's settings (ms/step parity of the two trainers)
#      Expert widths: each MoE layer runs top_k x expert hidden = 2 x 1024 = 4 x 512 = 2048 hidden
#      units per token, the dense MLP's 4 x 512, so all three v2 runs have equal active MLP FLOPs and
#      their ms/step compare directly (moe_bench measures the layer alone at 2 x 2048 vs 4096).
#      Memory (saved-for-backward bytes of the looped model measured eagerly on CPU, bf16, as the
#      difference to the dense model at 98,304 tokens): 8x2 at this width +8 GiB, SOM +2 GiB plus
#      1.1 GiB of per-call bf16 casts of the frozen experts (they need no gradient or optimizer
#      state), against the dense run's 40 GiB peak on the H100: both well inside 80 GB. At the
#      record's own expert width (MLP_MULT 4, 2048 per expert) the 8x2 model has 197.5M parameters
#      (59.1M active) and +27 GiB, about 70 GB in all: not comfortable; the SOM model 1.48B frozen
#      parameters (5.5 GiB of fp32 buffers) and 4x the dense MLP's FLOPs.
#      Every run logs, per phase, `phase:<name> steps:N step_avg:X ms`, the peak memory, the final
#      in-training val_bpb (VAL_LOSS_EVERY=0 still validates once at the end) and, for the expert
#      runs, `model_info` (total / active / frozen parameters) and one `experts` line per layer just
#      before that validation (a run cut during it keeps them): Gini, entropy (/log E), dead experts
#      and tokens per expert, over all training steps after compile priming.
#   4. $OUT/v2_summary.txt: one line per run (steps, ms/step per phase, peak memory, val_bpb, model
#      info, per-layer expert metrics on the lines below it), ratios, and moe_bench's result lines.
#
# What comes back (at most 8 files from $OUT): $OUT/v2_h100.tar.gz (every console, each run's .txt
# and .json, the build and moe_bench logs, the summary) and $OUT/v2_summary.txt. Consoles are tee'd
# live into $OUT/<name>.console and moved into the staging folder (and the tarball re-packed) when a
# step ends, so a call killed by its time limit still returns the running step's console as a loose
# file next to the tarball of everything finished before it. Big run files (checkpoints, Hessians)
# stay in RUNS (/tmp/runs). The script keeps its own deadline: each step gets a `timeout` that ends
# it TOTAL (555) s after the script started at the latest, keeping RUN_RESERVE s for each important
# run still to come; a run whose share is under BUDGET + 30 s is skipped (noted in the summary).
# Expected wall time: build ~10 s, moe_bench ~40-90 s, v2_dense ~150 s (cold compile ~65 s +
# 40 s training + final val, GPTQ export), v2_moe8x2 and v2_som64x4 ~120-140 s each (new block
# graphs, attention kernels cached), record_dense ~85 s (warm cache): about 540 s, so record_dense,
# last, may be cut short or skipped when compiles run long.
# The runs end with rc 1 and `error: quant.artifact.ArtifactTooLarge` in the summary when the GPTQ
# artifact is over 16 MB (FIT_BUDGET=0; the MoE models always are): expected, everything measured
# is logged before the export.
# Any knob set in the environment (e.g. WARMUP_STEPS, TRAIN_BATCH_TOKENS, NUM_LAYERS) passes through
# to the trainers; DATA_PATH + TOKENIZER_PATH set skip the build (a CPU smoke test uses that).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
OUT=${OUT:-bench_out}
RUNS=${RUNS:-/tmp/runs}
SOURCES=${SOURCES:-../shared/data}
BENCH=${BENCH:-/tmp/bench}
PY=${PY:-python3}
SEED=${SEED:-1337}
BUDGET=${BUDGET:-40}
TOTAL=${TOTAL:-555}                  # the script's own deadline, seconds after it started
FINISH_RESERVE=${FINISH_RESERVE:-8}  # kept for the summary and the final tarball
RUN_RESERVE=${RUN_RESERVE:-100}      # kept for each of v2_dense / v2_moe8x2 / v2_som64x4 still to come
RUN_CAP=${RUN_CAP:-260}              # most seconds one training run may take
MIN_RUN=${MIN_RUN:-$((${BUDGET%.*} + 30))}
MOE_BENCH_TIMEOUT=${MOE_BENCH_TIMEOUT:-120}
MOE8_EXPERT_MULT=${MOE8_EXPERT_MULT:-2}
SOM_EXPERT_MULT=${SOM_EXPERT_MULT:-1}
STAGE=${STAGE:-/tmp/v2_h100_stage}
TAR="$OUT/v2_h100.tar.gz"
SUMMARY="$OUT/v2_summary.txt"
RUN_NAMES=(v2_dense v2_moe8x2 v2_som64x4 v2_24gb record_dense)
mkdir -p "$OUT" "$RUNS"
rm -rf "$STAGE"
mkdir -p "$STAGE"
: > "$STAGE/status.tsv"

# ---------------------------------------------------------------------------- packing
write_summary() {
  "$PY" - "$STAGE" "$SUMMARY" "$SECONDS" "${RUN_NAMES[@]}" <<'PYEOF' || echo "summary failed" > "$SUMMARY"
import re, sys
from pathlib import Path
stage, dest, wall, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
status = {}
for row in (stage / "status.tsv").read_text().splitlines():
    name, rc, secs, note = (row.split("\t") + ["", "", ""])[:4]
    status[name] = (rc, secs, note)

def text(name):
    for p in (stage / f"{name}.console", dest.parent / f"{name}.console"):
        if p.exists():
            return p.read_text(errors="replace")
    return ""

def last(pattern, s, group=1):
    found = re.findall(pattern, s, re.M)
    return found[-1] if found else None

gpu = (stage / "gpu.txt").read_text().strip() if (stage / "gpu.txt").exists() else ""
out, phases = [f"v2_h100 wall:{wall}s (script), gpu: {gpu or '-'}, runs: {' '.join(names)}"], {}
for name in names:
    s = text(name)
    rc, secs, note = status.get(name, ("", "", "not started"))
    if not s:
        out.append(f"{name}: rc:{rc or '-'} {note or 'no console'}")
        continue
    ph = dict((m[0], (int(m[1]), float(m[2]))) for m in
              re.findall(r"^phase:(\w+) steps:(\d+) step_avg:([\d.]+)ms", s, re.M))
    phases[name] = ph
    steps = last(r"^step:(\d+)/\d+ (?:train_loss|val_loss)", s)
    if not ph:  # killed before the end: the last cumulative step_avg at least
        avg = last(r"^step:\d+/\d+ train_loss:\S+ train_time:\d+ms step_avg:([\d.]+)ms", s)
        ph_txt = f"no phase lines (cumulative step_avg:{avg}ms)" if avg else "no phase lines"
    else:
        ph_txt = " ".join(f"{k}:{n}@{v:.2f}ms" for k, (n, v) in ph.items())
    peak = re.search(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB", s, re.M)
    rss = last(r"^peak memory \(cpu max rss\): (\d+) MiB", s)
    val = last(r"^step:\d+/\d+ val_loss:\S+ val_bpb:([\d.]+)", s)
    ema = last(r"^final_ema val_loss:\S+ val_bpb:([\d.]+)", s)
    quant = last(r"^final_quant_roundtrip val_loss:\S+ val_bpb:([\d.]+)", s)
    compile_s = last(r"compile_time:([\d.]+s)", s)
    graphs = last(r"compile_phases: graphs:(\d+)", s)
    params = last(r"^model_params:(\d+)", s)
    fields = [f"{name}: rc:{rc or '-'} wall:{secs or '-'}s{(' ' + note) if note else ''}",
              f"steps:{steps}", ph_txt,
              f"peak_alloc:{peak[1]}MiB reserved:{peak[2]}MiB" if peak else f"peak:{rss}MiB(cpu_rss)" if rss else "peak:-",
              f"val_bpb:{val} ema:{ema} quant:{quant}", f"compile:{compile_s} graphs:{graphs}",
              f"model_params:{params}"]
    info = last(r"^model_info (.*)$", s)
    if info:
        fields.append(f"model_info {info}")
    failed = s.rfind("run failed:")  # golf.dist.run_main: the traceback's exception line
    if failed >= 0:
        err = next((l for l in s[failed:].splitlines()[1:] if l.strip() and not l.startswith((" ", "\t", "Traceback"))), None)
        if err:
            fields.append(f"error: {err[:200]}")
    out.append(" ".join(fields))
    exp = re.findall(r"^experts step:(\d+) layer:(\S+) gini:([\d.]+) entropy:([\d.]+) dead:(\d+) "
                     r"max_mean_load:([\d.]+).*tokens:([\d,]+)", s, re.M)
    if exp:
        step = exp[-1][0]
        rows = [e for e in exp if e[0] == step]
        ginis, ents, used = [], [], []
        for _, layer, g, h, dead, mml, tokens in rows:
            E = len(tokens.split(","))
            ginis.append(float(g)); ents.append(float(h)); used.append((E - int(dead)) / E)
            out.append(f"  experts {name} step:{step} {layer} gini:{g} entropy:{h} used:{E - int(dead)}/{E}"
                       f" ({(E - int(dead)) / E:.3f}) max_mean_load:{mml}")
        out.append(f"  experts {name} mean over {len(rows)} layers: gini:{sum(ginis) / len(rows):.4f} "
                   f"entropy:{sum(ents) / len(rows):.4f} used_frac:{sum(used) / len(rows):.3f} "
                   f"(min {min(used):.3f})")

def ratio(a, b):
    pa, pb = phases.get(a, {}), phases.get(b, {})
    parts = [f"{k}:{pa[k][1] / pb[k][1]:.3f}x" for k in pa if k in pb]
    if parts:
        out.append(f"ratio ms/step {a} / {b}: " + " ".join(parts))
ratio("v2_dense", "record_dense")
ratio("v2_moe8x2", "v2_dense")
ratio("v2_som64x4", "v2_dense")
bench = stage / "moe_bench.log"
if not bench.exists():
    bench = dest.parent / "moe_bench.log"
if bench.exists():
    rc, secs, note = status.get("moe_bench", ("", "", ""))
    out.append(f"moe_bench: rc:{rc or '-'} wall:{secs or '-'}s {note}".rstrip())
    keep = re.compile(r"^(tokens:|grouped_mm|check |  \[|mode |eager |compiled |\[eager\]|\[compiled\]|no CUDA)")
    out += ["  " + l for l in bench.read_text(errors="replace").splitlines() if keep.match(l)]
dest.write_text("\n".join(out) + "\n")
PYEOF
  cp "$SUMMARY" "$STAGE/" 2>/dev/null || true
}

pack() {  # summary, then the staging folder as one tarball (replaced atomically)
  write_summary
  tar -czf "$TAR.tmp" -C "$STAGE" . && mv -f "$TAR.tmp" "$TAR"
}

stash() {  # move finished loose files from $OUT into the staging folder
  local f
  for f in "$@"; do
    if [ -f "$OUT/$f" ]; then mv -f "$OUT/$f" "$STAGE/"; fi
  done
}

finish() {
  local rc=$?
  trap - EXIT
  stash build_sp8192.log moe_bench.log "${RUN_NAMES[@]/%/.console}"
  pack || true
  echo "v2_h100: done in ${SECONDS}s; $SUMMARY and $TAR"
  cat "$SUMMARY" 2>/dev/null || true
  exit $rc
}
trap finish EXIT

left() { echo $(( TOTAL - FINISH_RESERVE - SECONDS )); }

# ---------------------------------------------------------------------------- 1. data
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } > "$STAGE/gpu.txt"
if [ -z "${DATA_PATH:-}" ]; then
  if [ ! -f "$BENCH/datasets/bench_sp8192/fineweb_train_000000.bin" ]; then
    t0=$SECONDS
    "$PY" -m data benchmark-set --vocab 8192 --sources "$SOURCES" --out "$BENCH" > "$OUT/build_sp8192.log" 2>&1
    tail -1 "$OUT/build_sp8192.log"
    printf 'build\t0\t%s\t\n' $((SECONDS - t0)) >> "$STAGE/status.tsv"
    stash build_sp8192.log
  fi
  DATA_PATH="$BENCH/datasets/bench_sp8192"
  TOKENIZER_PATH="$BENCH/tokenizers/fineweb_8192_bpe.model"
fi
TOKENIZER_PATH=${TOKENIZER_PATH:-$BENCH/tokenizers/fineweb_8192_bpe.model}

# ---------------------------------------------------------------------------- 2. MoE layer benchmark
if [[ " ${SKIP:-} " == *" moe_bench "* ]]; then
  printf 'moe_bench\t-\t0\tskipped (SKIP)\n' >> "$STAGE/status.tsv"
else
  t0=$SECONDS
  cap=$(( MOE_BENCH_TIMEOUT < $(left) ? MOE_BENCH_TIMEOUT : $(left) ))
  rc=0
  timeout -k 5 "$cap" "$PY" bench/moe_bench.py 2>&1 | tee "$OUT/moe_bench.log" || rc=$?
  printf 'moe_bench\t%s\t%s\t%s\n' "$rc" $((SECONDS - t0)) "$([ "$rc" = 124 ] && echo "timeout ${cap}s")" >> "$STAGE/status.tsv"
  stash moe_bench.log
  pack
fi

# ---------------------------------------------------------------------------- 3. training runs
PROXY=(
  DATA_PATH="$DATA_PATH" TOKENIZER_PATH="$TOKENIZER_PATH" LOG_DIR="$RUNS" SEED="$SEED" PYTHONUNBUFFERED=1
  TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-98304}" GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-1}"
  COMPILE_MODE="${COMPILE_MODE:-blocks}" VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-0}" EVAL_STRIDE="${EVAL_STRIDE:-0}"
  TTT_ENABLED="${TTT_ENABLED:-0}" GPTQ_RESERVE_SECONDS="${GPTQ_RESERVE_SECONDS:-0}" FIT_BUDGET="${FIT_BUDGET:-0}"
  GPTQ_CALIBRATION_BATCHES="${GPTQ_CALIBRATION_BATCHES:-4}" TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-50}"
  MAX_WALLCLOCK_SECONDS="$BUDGET" WARMUP_STEPS="${WARMUP_STEPS:-10}"
)

# train NAME IMPORTANT_RUNS_AFTER SCRIPT [KNOB=VALUE ...]
train() {
  local name=$1 later=$2 script=$3 rc=0 t0=$SECONDS cap
  shift 3
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "== $name: skipped (SKIP)"
    printf '%s\t-\t0\tskipped (SKIP)\n' "$name" >> "$STAGE/status.tsv"
    return 0
  fi
  cap=$(( $(left) - later * RUN_RESERVE ))
  cap=$(( cap < RUN_CAP ? cap : RUN_CAP ))
  if [ "$cap" -lt "$MIN_RUN" ]; then
    echo "== $name: skipped, ${cap}s left for it (< MIN_RUN=${MIN_RUN}s)"
    printf '%s\t-\t0\tskipped (%ss left < %ss)\n' "$name" "$cap" "$MIN_RUN" >> "$STAGE/status.tsv"
    return 0
  fi
  echo "== $name: $script $* (timeout ${cap}s, t=${SECONDS}s)"
  rm -f "$RUNS/$name.txt" "$RUNS/$name.json"  # no stale files from an earlier call on this machine
  env "${PROXY[@]}" RUN_ID="$name" "$@" timeout -k 5 "$cap" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$script" 2>&1 | tee "$OUT/$name.console" || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$([ "$rc" = 124 ] && echo "timeout ${cap}s")" >> "$STAGE/status.tsv"
  cp "$RUNS/$name.txt" "$RUNS/$name.json" "$STAGE"/ 2>/dev/null || true
  stash "$name.console"
  pack
}

train v2_dense 2 train_gpt_v2.py
train v2_moe8x2 1 train_gpt_v2.py MOE_EXPERTS=8 MOE_TOP_K=2 MOE_EXPERT_MULT="$MOE8_EXPERT_MULT"
train v2_som64x4 0 train_gpt_v2.py MOE_ROUTER=som MOE_EXPERTS=64 MOE_TOP_K=4 MOE_EXPERT_MULT="$SOM_EXPERT_MULT"
# README's one-24-GB-GPU configuration (16,384 tokens per micro-step) under an allocator cap of 0.3 x 80 GB
train v2_24gb 0 train_gpt_v2.py CUDA_MEMORY_FRACTION=0.3 GRAD_ACCUM_STEPS=6 VAL_BATCH_TOKENS=65536
train record_dense 0 train_gpt.py
# 4. the summary and the tarball: finish() on exit
