#!/usr/bin/env bash
# RepOpt with the paper's constant branch scales (the default) on the design study's settings and seeds
# (RESULTS.md; `repvgg ablate --variants repvgg online repopt --seeds 2 --epochs 2 --train-subset 10000` ran
# the unit-scale RepOpt of the same settings).
set -euo pipefail
r=${REPVGG:-.venv/bin/repvgg}
common="--model repvgg_a0 --data fashion-mnist --train-subset 10000 --batch-size 128 --no-progress --log-interval 20"
for seed in 0 1; do
  [ -f runs/repopt-paper/seed$seed/summary.json ] || $r train $common --block repopt --repopt-scales paper \
      --epochs 2 --seed $seed --output runs/repopt-paper/seed$seed
done
