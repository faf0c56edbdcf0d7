#!/usr/bin/env bash
# The paper in miniature (make study): train a tiny GPT-NeoX at a tuned learning rate and at ten times it,
# then LAWA, EMA and SWA over both trajectories, held-out loss of everything, and the curves.
# About four minutes on two cores. Usage: examples/study/run.sh [OUT] (default: study)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${CKPTAVG_BIN:-$here/../../.venv/bin}"
out="${1:-study}"
text="$here/genesis-kjv.txt"
steps=3000

for lr in 3e-3 3e-2; do
  run="$out/lr$lr"
  [ -f "$run/step$steps/model.safetensors" ] || "$bin/python" "$here/train.py" --text "$text" --lr "$lr" \
    --steps "$steps" --save-every 100 --out "$run"
  "$bin/ckptavg" lawa "$run" --steps 1000:$steps --k 5 --k-stepsize 200 --interval 200 --out "$out/lawa-lr$lr" -q
  "$bin/ckptavg" ema "$run" --steps 200:$steps --interval 200 --decay 0.9 --out "$out/ema-lr$lr" -q
  "$bin/ckptavg" swa "$run" --start 1500 --every 100 --steps 1600:$steps --interval 200 --out "$out/swa-lr$lr" -q
  "$bin/ckptavg" eval --run "$run" --steps 200:$steps:200 "$out/lawa-lr$lr"/step* "$out/ema-lr$lr"/step* \
    "$out/swa-lr$lr"/step* --data "$out/heldout.txt" --max-tokens 16384 --results "$out/results-lr$lr.json" \
    > "$out/table-lr$lr.tsv"
  "$bin/ckptavg" plot "$out/results-lr$lr.json" -o "$out/curves-lr$lr.png" --title "tiny GPT-NeoX, lr $lr"
done
