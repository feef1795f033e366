#!/usr/bin/env bash
# RepOpt with searched scales (RESULTS.md): a 1-epoch online "hyper-search" run, then RepOpt with its scales on
# the ablation's settings and seeds (runs/ablate-online holds the unit-scale RepOpt runs of the same settings).
set -euo pipefail
r=${REPVGG:-.venv/bin/repvgg}
common="--model repvgg_a0 --data fashion-mnist --train-subset 10000 --batch-size 128 --no-progress --log-interval 20"
[ -f runs/repopt-search/model_train.safetensors ] || $r train $common --block online --epochs 1 --seed 0 --output runs/repopt-search
for seed in 0 1; do
  [ -f runs/repopt-searched/seed$seed/summary.json ] || $r train $common --block repopt --epochs 2 --seed $seed \
      --repopt-scales runs/repopt-search/model_train.safetensors --output runs/repopt-searched/seed$seed
done
