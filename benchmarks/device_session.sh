#!/usr/bin/env bash
# Every accelerator figure of benchmarks/RESULTS.md in one prepared run on a lent GPU machine (~9 minutes on an H200),
# plus the default demo's wall time on two pinned CPU cores of the same machine, run beside the GPU work.
#
#   bash benchmarks/device_session.sh OUTDIR [WHEELS_DIR]
#
# WHEELS_DIR: wheels of the Python packages the machine lacks (lm_eval and its requirements), installed with
# --no-deps into /tmp/site first. Writes into OUTDIR (at most 8 files): demo.log, demo_results.json, lm_eval.log,
# lm_eval.json, device_check.log, device_check.json, more.log (fit-alpha and generation at the 1B shape).
# Each stage has its own time limit so that one slow stage cannot eat the others' time.
set -u
out=${1:?usage: device_session.sh OUTDIR [WHEELS_DIR]}
wheels=${2:-}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$root
else
  export PYTHONPATH=$root
fi
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ncpu=$(nproc)
pin() {  # pin CPUS CMD...: run CMD on the listed cores (inherited by its threads and children)
  local cpus=$1; shift
  python3 -c 'import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")}); os.execvp(sys.argv[2], sys.argv[2:])' "$cpus" "$@"
}
timer=""; [ -x /usr/bin/time ] && timer="/usr/bin/time -v"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The demo on two pinned cores (CPU JAX): the issue's "within 5 minutes on 2 cores".
(
  start=$(date +%s)
  pin 0,1 env JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= timeout 540 \
    $timer python3 scripts/transfer.py --demo --out /tmp/demo_run > "$out/demo.log" 2>&1
  echo "demo exit $? wall $(( $(date +%s) - start )) s" >> "$out/demo.log"
  cp /tmp/demo_run/results.json "$out/demo_results.json" 2>/dev/null
) &
demo=$!

gpu_cores=$(seq -s, 2 $((ncpu - 1)))
run() {  # run LIMIT LOG CMD...: one GPU stage on the cores the demo does not use
  local limit=$1 log=$2; shift 2
  echo "== $* (limit ${limit}s)" >> "$log"
  pin "$gpu_cores" timeout "$limit" "$@" >> "$log" 2>&1
  echo "== exit $?" >> "$log"
}
# lm-eval on a 1B model: both backends share the GPU, so jax must not preallocate most of its memory.
run 180 "$out/lm_eval.log" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/lm_eval_bench.py --shape 1b \
  --dtype bfloat16 --device cuda --batch-size 32 --max-length 2048 --docs 500 --ppl-docs 16 --ppl-words 4000 \
  --gen-docs 64 --gen-toks 32 --repeats 2 --json "$out/lm_eval.json"
run 240 "$out/device_check.log" python3 benchmarks/device_check.py --out "$out/device_check.json"
run 60 "$out/more.log" python3 benchmarks/fit_alpha_bench.py --preset 1b --batch 1 --seq 2048 --dtype bfloat16
run 50 "$out/more.log" python3 benchmarks/generate_bench.py --shape 1b --dtype bfloat16 --batch 1 32 \
  --prompt-len 128 --new 256
wait "$demo"
tail -3 "$out/demo.log"
