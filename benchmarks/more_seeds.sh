#!/usr/bin/env bash
# More seeds for the design study (RESULTS.md): the paper block, the online block and RepOpt (its default
# `paper` scales) on the settings of `repvgg ablate --variants repvgg online repopt --seeds 2 --epochs 2
# --train-subset 10000` (seeds 0 and 1), for seeds given as arguments (default 2 3 4).
# Usage: [BLOCKS="repvgg online repopt"] benchmarks/more_seeds.sh [SEED ...]
# A finished run (its summary.json) is never run again, so the script continues where it stopped.
set -euo pipefail
r=${REPVGG:-.venv/bin/repvgg}
common="--model repvgg_a0 --data fashion-mnist --train-subset 10000 --batch-size 128 --epochs 2 --no-progress"
read -r -a blocks <<< "${BLOCKS:-repvgg online}"
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(2 3 4)
for seed in "${seeds[@]}"; do
  for block in "${blocks[@]}"; do
    [ -f runs/more-seeds/$block/seed$seed/summary.json ] || $r train $common --block $block --seed $seed \
        --log-interval 20 --output runs/more-seeds/$block/seed$seed
  done
done
