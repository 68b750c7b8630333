#!/usr/bin/env bash
# Explanations for Harm-C with the offline default (SmolLM2-135M, 3 Role-Reversal iterations):
# val first, then train in a seeded random order (so any finished part is a random sample). Two
# shards run side by side, one llama.cpp thread each. Resumable: run it again to continue.
#   bash bench/explain_harmeme.sh            # writes outputs/explanations/{val,train}.shard{0,1}.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/explanations}
DATA=${DHUMOR_DATA:-data/harmeme-c}
DHUMOR=${DHUMOR:-.venv/bin/dhumor}
mkdir -p "$OUT"
for split in val train; do
  for i in 0 1; do
    "$DHUMOR" explain "$DATA/$split.jsonl" --out "$OUT/$split.shard$i.jsonl" --shard "$i/2" --threads 1 \
      --order shuffle --seed 0 --batch-size 2 --quiet 2> "$OUT/$split.shard$i.log" &
  done
  wait
done
