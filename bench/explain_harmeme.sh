#!/usr/bin/env bash
# Explanations for Harm-C with the offline default (SmolLM2-135M on llama.cpp, answers of 8 memes
# decoded together, 3 Role-Reversal iterations): all of val, then a seeded random sample of train
# (--order shuffle: any finished prefix is a random sample). One process uses every core.
# Resumable: run it again to continue; rows that failed because the backend was down are redone.
#   DHUMOR_DATA=/path/to/harmeme-c TRAIN_LIMIT=1000 nice -n 10 bash bench/explain_harmeme.sh
#   -> outputs/explanations/{val,train}.jsonl (explanations of dataset memes: kept out of the repository);
#   then: python bench/explain_stats.py outputs/explanations/{val,train}.jsonl  -> bench/results/explain_stats.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/explanations}
DATA=${DHUMOR_DATA:-data/harmeme-c}
DHUMOR=${DHUMOR:-dhumor}
TRAIN_LIMIT=${TRAIN_LIMIT:-1000}
mkdir -p "$OUT"
run() {  # split, extra args; exit 3 (some memes failed, recorded in their rows) is not an error here
  "$DHUMOR" explain "$DATA/$1.jsonl" --out "$OUT/$1.jsonl" --order shuffle --seed 0 --quiet "${@:2}" \
    2>> "$OUT/$1.log" || [ $? -eq 3 ]
}
run val
run train --limit "$TRAIN_LIMIT"
# One file for training with the reasoning stream (configs/ablations/with-explanations.yaml reads it):
# val's rows feed the reported split, train's the training split; ids never collide across splits.
cat "$OUT/val.jsonl" "$OUT/train.jsonl" > "$OUT/harmeme.jsonl.tmp" && mv "$OUT/harmeme.jsonl.tmp" "$OUT/harmeme.jsonl"
