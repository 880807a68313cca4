#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on the GPU machine, which has no Rust toolchain:
# the release `tuneloop` binary and the `cuda_ops` test executable, both with the kernels
# compiled by the pinned CUDA 13.0 nvcc, stripped, in gpu-bundle/ (git-ignored).
#
#   scripts/gpu-bundle.sh          # then, with the device tool (see scripts/gpu-check.sh):
#   run(command="bash scripts/gpu-check.sh", carry=["gpu-bundle"], timeout_s=600)
#
# The device tool sends the checkout the session started in: run this there (or copy
# gpu-bundle/ into that checkout) so that `carry` finds it. CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/nvcc-env.sh
export TUNELOOP_REQUIRE_KERNELS=1
target="${CARGO_TARGET_DIR:-target}"

cargo build --release
# the test executables, as cargo reports them
tests_json="$(cargo test --release --no-run --message-format=json 2>/dev/null)"
cuda_ops="$(printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "cuda_ops" \
            and m.get("executable"):
        print(m["executable"])
')"
[[ -x "$cuda_ops" ]] || { echo "gpu-bundle: no cuda_ops test executable found" >&2; exit 1; }

rm -rf gpu-bundle
mkdir -p gpu-bundle
cp "$target/release/tuneloop" gpu-bundle/tuneloop
cp "$cuda_ops" gpu-bundle/cuda_ops
strip --strip-debug gpu-bundle/tuneloop gpu-bundle/cuda_ops
# The tests find their fixtures through the crate directory compiled into them;
# gpu-check.sh links that path to the checkout it runs in.
pwd >gpu-bundle/manifest-dir
git rev-parse HEAD >gpu-bundle/commit 2>/dev/null || true
du -sh gpu-bundle/*
echo "gpu-bundle: ready; carry it with: carry=[\"gpu-bundle\"]"
