#!/usr/bin/env bash
# Runs on the GPU machine (H100/H200, driver 580 = CUDA 13.0, cuBLAS and NCCL inside the
# Python packages, no Rust, no network) from binaries built elsewhere by
# scripts/gpu-bundle.sh:
#
#   1. here:            scripts/gpu-bundle.sh
#   2. device tool:     run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"],
#                           timeout_s=600)
#
# It sets up the loader path for cuBLAS(Lt) and NCCL, then runs:
#   - the GPU tests of tests/cuda_ops.rs (every op against the CPU op in the f32 and the
#     bf16 mode, golden parity in both);
#   - compute-sanitizer --tool memcheck over the op tests, and --tool racecheck over the
#     bf16 attention test (if compute-sanitizer exists and TUNELOOP_MEMCHECK is not 0);
#   - tuneloop parity --backend cuda --dtype f32 and --dtype bf16 on the golden cases;
#   - a quickstart fine-tune on CUDA alone and as world size 1 over the rendezvous and
#     NCCL, whose adapters must be identical;
#   - a full fine-tune in the bf16 mode against the same on the CPU backend;
#   - a bf16 LoRA and a bf16 full fine-tune stopped and resumed, whose files must be the
#     uninterrupted runs' bytes;
# and prints a table of what passed last. Logs go to $OUT (the device tool brings them
# back) or to gpu-logs/. The exit status is non-zero when anything failed. With
# TUNELOOP_DEADLINE (seconds since the epoch; scripts/gpu-all.sh sets it) no step runs
# past it: each step's time limit shrinks to what is left, and a step that finds none
# left is skipped ("skipped (out of time)", not a failure).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bundle=gpu-bundle
logs="${OUT:-gpu-logs}"
mkdir -p "$logs"
if [[ ! -x $bundle/tuneloop || ! -x $bundle/cuda_ops ]]; then
    echo "gpu-check: no $bundle/ here; build it with scripts/gpu-bundle.sh and carry it" >&2
    exit 2
fi

# ---- libraries: cudarc dlopens libcublasLt.so / libnccl.so by name ---------------------
mkdir -p /tmp/lib
find_lib() { find / -name "$1" -not -path '/proc/*' 2>/dev/null | head -1; }
nccl="$(find_lib 'libnccl.so.2*')"
[[ -n $nccl ]] && ln -sf "$nccl" /tmp/lib/libnccl.so
cublas="$(find_lib 'libcublas.so.13*')"
export LD_LIBRARY_PATH="/tmp/lib${cublas:+:$(dirname "$cublas")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# ---- the fixtures' path compiled into the test binary -----------------------------------
manifest="$(cat $bundle/manifest-dir)"
if [[ ! -e $manifest/tests/fixtures ]]; then
    mkdir -p "$(dirname "$manifest")"
    ln -sfn "$PWD" "$manifest"
fi

declare -a names results
record() { names+=("$1"); results+=("$2"); }
source scripts/gpu-deadline.sh
run_step() { # name, log, command...
    local name=$1 log=$2
    shift 2
    if out_of_time; then
        record "$name" "skipped (out of time)"
        return
    fi
    echo "=== $name"
    if "$@" >"$logs/$log" 2>&1; then
        record "$name" ok
    else
        local rc=$?
        if [[ $rc == 124 ]]; then
            record "$name" "FAIL (timed out, see $log)"
        else
            record "$name" "FAIL (rc $rc, see $log)"
        fi
    fi
    tail -n 25 "$logs/$log"
}

# Every command has a time limit, so that one that hangs (a kernel that never ends, a
# collective waiting for nobody) costs its own step, not the session's device time.
tl() { timeout "$(limit 150)" $bundle/tuneloop "$@"; }

run_step "cuda_ops tests (GPU, ignored ones)" cuda-ops.log \
    timeout "$(limit 240)" $bundle/cuda_ops --ignored --test-threads=1
run_step "cuda_ops tests (no-GPU ones)" cuda-ops-plain.log timeout "$(limit 60)" $bundle/cuda_ops --test-threads=1

if [[ ${TUNELOOP_MEMCHECK:-1} == 0 ]]; then
    record "compute-sanitizer memcheck (op tests)" "skipped (TUNELOOP_MEMCHECK=0)"
elif command -v compute-sanitizer >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/compute-sanitizer ]]; then
    cs="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    run_step "compute-sanitizer memcheck (op tests)" memcheck.log \
        timeout "$(limit 500)" "$cs" --tool memcheck --error-exitcode 1 $bundle/cuda_ops --ignored --test-threads=1 \
        --skip cuda_f32_matches_hf_goldens --skip cuda_bf16_matches_hf_goldens
    # shared-memory hazards of the tensor-core attention's cp.async/ldmatrix pipeline
    run_step "compute-sanitizer racecheck (attention bf16)" racecheck.log \
        timeout "$(limit 180)" "$cs" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
        $bundle/cuda_ops --ignored --test-threads=1 --exact attention_matches_the_cpu_bf16
else
    record "compute-sanitizer memcheck (op tests)" "skipped (not installed)"
fi

cases=(tests/fixtures/hf-goldens/*/)
run_step "parity cuda f32 (tol 1e-4)" parity-f32.log \
    tl parity --backend cuda --dtype f32 --tol 1e-4 --case "${cases[@]}"
run_step "parity cuda bf16 (tol 2e-2)" parity-bf16.log \
    tl parity --backend cuda --dtype bf16 --tol 2e-2 --case "${cases[@]}"

# ---- data parallel over NCCL: world size 1 through the rendezvous and NCCL must give the
# plain run's adapter (issue: scale out). The tiny quickstart model, CUDA f32.
dp="$logs/dp"
mkdir -p "$dp"
dp_args=(finetune -c configs/quickstart.yaml --model.path="$dp/base" --step_scheduler.max_steps=20
    --step_scheduler.ckpt_every_steps=10 --backend=cuda --model.dtype=f32)
dp_check() {
    tl init-model --tokenizer configs/quickstart/tokenizer --out "$dp/base" --embed-std 0.08 &&
        tl "${dp_args[@]}" --output_dir="$dp/plain" &&
        RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 TUNELOOP_DIST_TIMEOUT=60 \
            tl "${dp_args[@]}" --output_dir="$dp/nccl" &&
        cmp "$dp/plain/adapter/adapter_model.safetensors" "$dp/nccl/adapter/adapter_model.safetensors" &&
        echo "world-size-1 NCCL adapter == single-process adapter (byte for byte)"
}
run_step "NCCL world size 1 == single process" dp-nccl.log dp_check

# ---- the activation arena (a step's buffers laid out once, reused every step) against
# every buffer from the pool: the same bf16 fine-tune, the same bytes
arena_args=(finetune -c configs/quickstart.yaml --model.path="$dp/base" --step_scheduler.max_steps=10
    --backend=cuda --model.dtype=bf16)
arena_check() {
    tl "${arena_args[@]}" --output_dir="$dp/arena" 2>&1 | grep -E "activation arena|^backend" &&
        TUNELOOP_ARENA=off tl "${arena_args[@]}" --output_dir="$dp/pool" &&
        cmp "$dp/arena/adapter/adapter_model.safetensors" "$dp/pool/adapter/adapter_model.safetensors" &&
        echo "bf16 adapter with the activation arena == without it (byte for byte)"
}
run_step "activation arena == pool (bf16 bytes)" arena.log arena_check

# ---- full fine-tuning in the bf16 mode (f32 master weights, bf16 copies, every weight's
# gradient) against the CPU backend: 6 steps at a full fine-tune's learning rate, the
# losses within 1e-3 (5.8e-5 apart on the CUDA emulator)
full_args=(finetune -c configs/quickstart.yaml --model.path="$dp/base" --step_scheduler.max_steps=6
    --peft.full=true --optimizer.lr=2e-5)
full_check() {
    tl "${full_args[@]}" --backend=cuda --model.dtype=bf16 --output_dir="$dp/full-cuda" &&
        tl "${full_args[@]}" --backend=cpu --output_dir="$dp/full-cpu" &&
        python3 - "$dp/full-cuda/metrics.jsonl" "$dp/full-cpu/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    return [m["loss"] for m in map(json.loads, open(path)) if m.get("loss") is not None]
got, want = losses(sys.argv[1]), losses(sys.argv[2])
worst = max((abs(g - w) / abs(w) for g, w in zip(got, want)), default=float("inf"))
print(f"full fine-tuning, CUDA bf16 vs CPU: losses {got} vs {want}, at most {worst:.2e} apart")
sys.exit(0 if len(got) == len(want) == 6 and worst < 1e-3 else 1)
PY
}
run_step "full fine-tuning bf16 vs CPU (losses 1e-3)" full-bf16.log full_check
# ---- never losing work: a run stopped after 2 steps and resumed ends with the bytes of
# the uninterrupted run above (every sum in a fixed order: cuBLASLt on one stream, the
# kernels without atomics), for the bf16 LoRA fine-tune and the bf16 full fine-tune
resume_check() { # name, the uninterrupted run, the file to compare, the run's arguments...
    local name=$1 out="$dp/resumed-$1" want=$2 file=$3
    shift 3
    tl finetune -c configs/quickstart.yaml --stop-after-steps 2 "$@" --output_dir="$out" &&
        tl finetune -c configs/quickstart.yaml --resume "$@" --output_dir="$out" &&
        cmp "$out/$file" "$want/$file" &&
        echo "$name: stopped after 2 steps and resumed == uninterrupted (byte for byte)"
}
resume_both() {
    resume_check lora-bf16 "$dp/arena" adapter/adapter_model.safetensors "${arena_args[@]:3}" &&
        resume_check full-bf16 "$dp/full-cuda" model/model.safetensors "${full_args[@]:3}" \
            --backend=cuda --model.dtype=bf16
}
run_step "resumed == uninterrupted (bf16 LoRA, full)" resume.log resume_both
rm -rf "$dp/base" "$dp/plain/checkpoints" "$dp/nccl/checkpoints" "$dp/full-cuda" "$dp/full-cpu" "$dp/arena" "$dp/pool" \
    "$dp/resumed-lora-bf16" "$dp/resumed-full-bf16"

echo
echo "gpu-check on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), bundle $(cat $bundle/commit 2>/dev/null)"
printf '%-45s %s\n' "step" "result"
failed=0
for i in "${!names[@]}"; do
    printf '%-45s %s\n' "${names[$i]}" "${results[$i]}"
    [[ ${results[$i]} == FAIL* ]] && failed=1
done
for f in "$logs"/*.log; do grep -h "^parity: " "$f" 2>/dev/null | sed "s|^|$(basename "$f"): |"; done
exit $failed
