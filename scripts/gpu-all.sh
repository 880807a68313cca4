#!/usr/bin/env bash
# Everything a short GPU session needs in ONE device call of under ten minutes, after
# scripts/gpu-bundle.sh here:
#
#   run(command="bash scripts/gpu-all.sh", carry=["gpu-bundle"], timeout_s=600)
#
# Correctness first (scripts/gpu-check.sh without memcheck unless TUNELOOP_MEMCHECK=1:
# the GPU op tests in both modes, parity in f32 and bf16, NCCL world size 1), then the
# benchmarks (scripts/gpu-bench.sh with TUNELOOP_BENCH_QUICK=1: the 1B anchor shape and
# the 8B seq-4096 anchor shape, every kernel against its floor at the 1B and 8B shapes,
# the same on wgmma, then the 1B shape with LoRA dropout).
# Logs go to $OUT; both scripts' tables are printed, the check's last. The exit status is
# non-zero when either failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-gpu-logs}"
mkdir -p "$OUT"
# Deadlines (scripts/gpu-deadline.sh), in seconds from the start: the check may take the
# first TUNELOOP_CHECK_S (a step that hangs on the GPU is cut there), the benchmarks what
# is left of TUNELOOP_ALL_S, under the device tool's 600-second limit.
start=$(date +%s)
TUNELOOP_DEADLINE=$((start + ${TUNELOOP_CHECK_S:-270})) TUNELOOP_MEMCHECK="${TUNELOOP_MEMCHECK:-0}" \
    bash scripts/gpu-check.sh >"$OUT/gpu-check.out" 2>&1
check=$?
TUNELOOP_DEADLINE=$((start + ${TUNELOOP_ALL_S:-570})) TUNELOOP_BENCH_QUICK=1 \
    bash scripts/gpu-bench.sh >"$OUT/gpu-bench.out" 2>&1
bench=$?
echo "=== gpu-bench (exit $bench): the tables"
grep -h -E '^\||^[a-z/0-9.-]+ on cuda' "$OUT/gpu-bench.out" | head -250
echo "=== gpu-check (exit $check)"
tail -n 20 "$OUT/gpu-check.out"
[[ $bench == 0 && $check == 0 ]]
