#!/usr/bin/env bash
# The bundled default, end to end on any machine (no GPU, no download): builds
# tuneloop, creates a tiny random-initialised base model with the quickstart tokenizer
# (once), and fine-tunes a LoRA adapter on the bundled agent feedback log with
# configs/quickstart.yaml. Extra arguments go to `tuneloop finetune` (recipe overrides,
# --resume, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
bin=target/release/tuneloop
base=target/quickstart/base-model
# deterministic and quick: made anew each run, so it always matches these settings
"$bin" init-model --preset tiny --tokenizer configs/quickstart/tokenizer --out "$base" --seed 0 --embed-std 0.08 >/dev/null
# A fresh run each time unless resuming: the previous run's outputs make way.
if [[ " $* " != *" --resume "* ]]; then
    rm -rf runs/quickstart
fi
"$bin" finetune -c configs/quickstart.yaml "$@"
