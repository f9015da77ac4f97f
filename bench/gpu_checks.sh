#!/usr/bin/env bash
# All GPU performance checks in one go, within 8 minutes, JSON under ${OUT:-bench-out}:
#   dp_overhead          llama-1b and llama-8b, batch 8 x seq 512 (none / hooks / ghost / bk)
#   generate_throughput  llama-1b and llama-8b, batch 64, 128 new tokens (hf vs fast)
# Each check has its own time limit (sum 480 s), so one slow check cannot eat the others;
# a check that fails or runs out leaves its log (and no JSON) and the script goes on.
#
#   bash bench/gpu_checks.sh                      # on the GPU machine
#   GPU_CHECKS_SMOKE=1 bash bench/gpu_checks.sh   # CPU smoke run: tiny shape, small sizes
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then
  DEV=cpu; SHAPES="tiny"; DP_SIZE="--batch 2 --seq 32 --steps 2 --warmup 1 --threads 1"
  GEN_SIZE="--batches 4 --new-tokens 16 --prompt-len 16 --threads 1"
else
  DEV=cuda; SHAPES="llama-1b llama-8b"; DP_SIZE="--batch 8 --seq 512 --steps 5 --warmup 2"
  GEN_SIZE="--batches 64 --new-tokens 128 --prompt-len 64"
fi

declare -A LIMIT=([dp-llama-1b]=100 [dp-llama-8b]=170 [gen-llama-1b]=90 [gen-llama-8b]=120
                  [dp-tiny]=120 [gen-tiny]=60)
status=0
check() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  echo "== $name (limit ${LIMIT[$name]} s)"
  timeout --kill-after=10 "${LIMIT[$name]}" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

if [ "$DEV" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1; fi
for shape in $SHAPES; do
  # shellcheck disable=SC2086
  check "dp-$shape" "$PY" bench/dp_overhead.py --device "$DEV" --shape "$shape" $DP_SIZE --json "$OUT/dp-$shape.json"
done
for shape in $SHAPES; do
  # shellcheck disable=SC2086
  check "gen-$shape" "$PY" bench/generate_throughput.py --device "$DEV" --shape "$shape" $GEN_SIZE --json "$OUT/gen-$shape.json"
done
echo "total ${SECONDS} s; results in $OUT"
exit $status
