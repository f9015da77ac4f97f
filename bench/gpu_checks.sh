#!/usr/bin/env bash
# Issue #17's device checks, in priority order, each with its own limit, all within a total
# budget the script keeps (it stops itself before the caller's limit):
#   1. gen-1b  generate_throughput  llama-1b, batch 64, 64 + 128 new tokens: hf vs fast,
#                                   fixed length and EOS mode (refills timed), one process
#   2. dp-1b   dp_overhead          llama-1b, batch 8 x seq 512 (none / hooks / ghost / bk)
#   3. dp-8b   dp_overhead          llama-8b, batch 8 x seq 512
#   4. gen-8b  generate_throughput  llama-8b, batch 64, fixed length: hf vs fast
# Each step's JSON is copied to $OUT as soon as the step ends (generate_throughput rewrites
# its JSON after every result, so a step cut short still returns what it measured);
# $OUT/checks.log has versions, the GPU and the tail of every step's log. At most 7 files
# reach $OUT (the device tool returns no more than 8): checks.log, 4 JSON, and the full
# logs of failed steps while room is left.
#
# Missing Python packages (the CUDA image has torch and transformers, not opacus) come
# from wheels in .whl/, installed into a scratch dir (no network needed, the image is left
# as it is). Fill .whl/ here first and carry it:
#   bash bench/fetch_wheels.sh                              # here: opacus, opt_einsum, peft
#   run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=570)
#   GPU_CHECKS_BUDGET=400 bash bench/gpu_checks.sh          # less device time left
#   GPU_CHECKS_SMOKE=1 bash bench/gpu_checks.sh             # CPU dry run, tiny shapes
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/checks.log"
: >"$LOG"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
MAX_FILES=7
RESERVE=15  # seconds kept for copying results and the summary

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then
  DEV=cpu; BUDGET=${GPU_CHECKS_BUDGET:-420}
  SHAPE_1B=tiny; SHAPE_8B=tiny
  DP_SIZE="--batch 2 --seq 32 --steps 2 --warmup 1 --threads 1"
  GEN_SIZE="--batches 4 --new-tokens 16 --prompt-len 16 --threads 1"
  EOS_MEANS="0,6"
else
  DEV=cuda; BUDGET=${GPU_CHECKS_BUDGET:-540}
  SHAPE_1B=llama-1b; SHAPE_8B=llama-8b
  DP_SIZE="--batch 8 --seq 512 --steps 5 --warmup 2"
  GEN_SIZE="--batches 64 --new-tokens 128 --prompt-len 64"
  EOS_MEANS="0,32"  # calibrated on prompts: random-init rows run longer (JSON: mean_new_tokens)
fi

log() { echo "$*" | tee -a "$LOG"; }
files=1  # checks.log
put() {  # copy a file to $OUT while fewer than MAX_FILES are there
  [ -s "$1" ] || return 0
  if [ "$files" -lt "$MAX_FILES" ]; then cp "$1" "$OUT/"; files=$((files + 1));
  else log "not copied (file limit): $(basename "$1")"; fi
}

# Wheels first: install only what does not import.
missing=()
for mod in opacus opt_einsum peft; do "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod"); done
if [ ${#missing[@]} -gt 0 ]; then
  wheels=()
  for mod in "${missing[@]}"; do
    w=$(ls .whl/"$mod"-*.whl 2>/dev/null | head -n 1)
    if [ -n "$w" ]; then wheels+=("$w"); else log "missing: $mod, and no .whl/$mod-*.whl"; fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "${wheels[@]}" >>"$LOG" 2>&1 \
      && log "installed: ${wheels[*]}" || log "wheel install failed (see above)"
  fi
fi
"$PY" - 2>&1 <<'EOF' | tee -a "$LOG"
import importlib
for name in ("torch", "transformers", "peft", "opacus"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # report, the steps that need it will fail on their own
        print(f"{name} unavailable: {type(exc).__name__}: {exc}")
import torch
print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0))
EOF
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

status=0
step() {  # name, max seconds, min seconds worth starting with, command...
  local name=$1 max=$2 min=$3; shift 3
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  if [ "$left" -lt "$min" ]; then log "== $name: skipped, ${left} s left (needs ${min})"; status=1; return; fi
  local limit=$(( left < max ? left : max )) start=$SECONDS
  log "== $name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$WORK/$name.log" >>"$LOG"
  log "== $name: rc=$rc in $((SECONDS - start)) s$([ $rc -ge 124 ] && echo ' (timed out)')"
  put "$WORK/$name.json"
  if [ $rc -ne 0 ]; then status=1; put "$WORK/$name.log"; fi
}

# shellcheck disable=SC2086
step gen-1b 240 120 "$PY" bench/generate_throughput.py --device "$DEV" --shape "$SHAPE_1B" $GEN_SIZE \
  --eos-mean "$EOS_MEANS" --prompts-per-slot 2 --json "$WORK/gen-1b.json"
# shellcheck disable=SC2086
step dp-1b 120 60 "$PY" bench/dp_overhead.py --device "$DEV" --shape "$SHAPE_1B" $DP_SIZE --json "$WORK/dp-1b.json"
# shellcheck disable=SC2086
step dp-8b 180 90 "$PY" bench/dp_overhead.py --device "$DEV" --shape "$SHAPE_8B" $DP_SIZE --json "$WORK/dp-8b.json"
# shellcheck disable=SC2086
step gen-8b 240 120 "$PY" bench/generate_throughput.py --device "$DEV" --shape "$SHAPE_8B" $GEN_SIZE \
  --json "$WORK/gen-8b.json"
log "total $((SECONDS - START)) s of a ${BUDGET} s budget; rc=$status; results in $OUT"
rm -rf "$WORK"
exit $status
