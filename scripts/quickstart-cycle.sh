#!/usr/bin/env bash
# The bundled agent's lifecycle, two cycles: day 1's feedback trains v1 (promoted), day
# 2's feedback arrives and trains v2, the gate compares v2 with v1, and a rollback
# restores v1 in production. Runs on any machine (CPU backend, no download).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
bin=target/release/tuneloop
base=target/quickstart/base-model
# deterministic and quick: made anew each run, so it always matches these settings
"$bin" init-model --preset tiny --tokenizer configs/quickstart/tokenizer --out "$base" --seed 0 --embed-std 0.08 >/dev/null
rm -rf runs/registry runs/loop runs/inbox
mkdir -p runs/inbox/order-help

echo "== day 1: the agent's first feedback log arrives"
cp configs/quickstart/feedback.jsonl runs/inbox/order-help/day1.jsonl
"$bin" loop -c configs/quickstart/loop.yaml

echo "== again, with no new feedback: nothing to do"
"$bin" loop -c configs/quickstart/loop.yaml

echo "== day 2: more feedback arrives"
cp configs/quickstart/feedback-day2.jsonl runs/inbox/order-help/day2.jsonl
"$bin" loop -c configs/quickstart/loop.yaml

"$bin" registry list --root runs/registry order-help
echo "== roll production back to the version before"
"$bin" registry rollback --root runs/registry order-help --why "quickstart: showing a rollback"
"$bin" registry list --root runs/registry order-help
"$bin" registry history --root runs/registry order-help
