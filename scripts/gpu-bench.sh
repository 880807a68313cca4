#!/usr/bin/env bash
# Runs on the GPU machine after scripts/gpu-bundle.sh, like scripts/gpu-check.sh (which
# checks correctness first; scripts/gpu-all.sh runs both in one call): `tuneloop bench`
# on the shapes of DESIGN.md's anchor table, then `tuneloop bench --kernels` (each kernel
# against its floor) at the 1B and 8B shapes, and the 1B shape also with `--lora-apart`,
# for what the LoRA fold gains, and with `--lora-dropout 0.05`, as markdown tables into
# $OUT (or gpu-logs/). Copy the numbers into BENCHMARKS.md.
# The kernels and the 1B step also run with the attention on wgmma (TUNELOOP_WGMMA=1).
# TUNELOOP_BENCH_QUICK=1 leaves out the 1B step without the LoRA fold, the 8B seq-2048
# shape and the full fine-tuning step of Qwen2.5-0.5B (scripts/gpu-all.sh). The anchor
# shapes run first; under TUNELOOP_DEADLINE (scripts/gpu-deadline.sh) a run's time limit
# shrinks to what is left, and a run that finds none left is skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bundle=gpu-bundle
logs="${OUT:-gpu-logs}"
mkdir -p "$logs" /tmp/lib
[[ -x $bundle/tuneloop ]] || { echo "gpu-bench: no $bundle/; run scripts/gpu-bundle.sh and carry it" >&2; exit 2; }
find_lib() { find / -name "$1" -not -path '/proc/*' 2>/dev/null | head -1; }
cublas="$(find_lib 'libcublas.so.13*')"
export LD_LIBRARY_PATH="/tmp/lib${cublas:+:$(dirname "$cublas")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

source scripts/gpu-deadline.sh
failed=0
bench() { # log name, time limit, args...
    local log=$1 secs=$2
    shift 2
    echo "=== tuneloop bench $*"
    if out_of_time; then
        echo "skipped (out of time)" | tee "$logs/$log"
        return
    fi
    timeout "$(limit "$secs")" $bundle/tuneloop bench --backend cuda --dtype bf16 --lora-r 16 "$@" 2>&1 |
        tee "$logs/$log" || failed=1
}
# the anchor shapes first, so that a later run that hangs cannot take their time
bench bench-1b.log 170 --preset llama3.2-1b --seq 2048 --batch 4 --warmup 2 --steps 5
bench bench-8b-4096.log 170 --preset llama3.1-8b --seq 4096 --batch 2 --warmup 1 --steps 3
bench kernels-1b.log 40 --kernels --preset llama3.2-1b --seq 2048 --batch 4 --steps 5
bench kernels-8b.log 60 --kernels --preset llama3.1-8b --seq 4096 --batch 2 --steps 3
# the attention on wgmma (attn_*_wgmma_*, TUNELOOP_WGMMA=1) against the mma.sync runs above
TUNELOOP_WGMMA=1 bench bench-1b-wgmma.log 60 --preset llama3.2-1b --seq 2048 --batch 4 --warmup 1 --steps 3 --no-profile
TUNELOOP_WGMMA=1 bench kernels-1b-wgmma.log 40 --kernels --preset llama3.2-1b --seq 2048 --batch 4 --steps 5
TUNELOOP_WGMMA=1 bench kernels-8b-wgmma.log 60 --kernels --preset llama3.1-8b --seq 4096 --batch 2 --steps 3
if [[ ${TUNELOOP_BENCH_QUICK:-0} == 0 ]]; then
    # the same without the LoRA fold: what folding the LoRA paths into the frozen GEMMs gains
    bench bench-1b-apart.log 60 --preset llama3.2-1b --seq 2048 --batch 4 --warmup 1 --steps 3 --no-profile --lora-apart
    bench bench-8b-2048.log 150 --preset llama3.1-8b --seq 2048 --batch 2 --warmup 1 --steps 3
    # full fine-tuning of a small model: f32 masters, bf16 copies, every weight's gradient
    bench bench-0.5b-full.log 90 --preset qwen2.5-0.5b --full --seq 2048 --batch 4 --warmup 1 --steps 3
fi
# with PEFT's common lora_dropout: the mask applied inside the LoRA products (last: the
# one a slow session leaves out)
bench bench-1b-dropout.log 60 --preset llama3.2-1b --seq 2048 --batch 4 --warmup 1 --steps 3 --no-profile --lora-dropout 0.05
exit $failed
