#!/usr/bin/env bash
# The GPU benchmarks in one command that fits a lent machine's 10-minute limit: each sweep runs in its
# own process under its own time limit and tees one JSON line per measurement, so a sweep cut short keeps
# what it finished. `python benchmarks/_gpu_collect.py` merges the logs (copied to results/gpu_runs/).
# Usage: bash benchmarks/gpu_sweep.sh OUT_DIR
set -u
out=${1:?usage: gpu_sweep.sh OUT_DIR}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv >"$out/gpu.txt"
run() {  # run LIMIT LOG ARGS...
    local limit=$1 log=$2; shift 2
    echo "== $* (limit ${limit}s)"
    timeout "$limit" python3 "$@" 2>&1 | tee "$out/$log" | grep -v '^{' | tail -3
}
run 240 em_iteration_run1.jsonl benchmarks/em_iteration.py --only n --out "$out/em_n.json"
run 90 replicates_run1.jsonl benchmarks/replicates.py --out "$out/replicates.json"
run 90 em_iteration_run2.jsonl benchmarks/em_iteration.py --only K --no-check --out /tmp/em_K.json
run 120 em_iteration_run3.jsonl benchmarks/em_iteration.py --only D --no-check --out /tmp/em_D.json
