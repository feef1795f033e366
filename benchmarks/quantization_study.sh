#!/usr/bin/env bash
# INT8 evidence (RESULTS.md): RepVGG-A0 and QARepVGG-A0 trained with the same schedule on Fashion-MNIST, then
# evaluated in float32 and in INT8 (PTQ with per-channel and per-tensor weights, and QAT).
# Usage: [QAT=0] benchmarks/quantization_study.sh [RUN_PREFIX]   (default runs/quant: RUN_PREFIX-<block>-a0-3ep)
# QAT=0 skips the quantization-aware fine-tuning.
set -euo pipefail
prefix=${1:-runs/quant}
repvgg=${REPVGG:-.venv/bin/repvgg}
for block in repvgg qarepvgg; do
    run="$prefix-$block-a0-3ep"
    if [ ! -f "$run/model_train.safetensors" ]; then
        "$repvgg" train --model repvgg_a0 --block "$block" --data fashion-mnist --epochs 3 --train-subset 30000 \
            --batch-size 128 --label-smoothing 0.1 --warmup-epochs 0.5 --seed 0 --strides 1 2 2 2 2 \
            --channels-last --output "$run" --no-progress
    fi
    echo "== $block: float32"
    "$repvgg" eval "$run/model_deploy.safetensors" --data fashion-mnist
    for weights in per-channel per-tensor; do
        "$repvgg" quantize "$run/model_deploy.safetensors" "$run/int8-$weights.safetensors" --calib 512 \
            --weights "$weights" --no-progress
        echo "== $block: INT8 PTQ, $weights weights"
        "$repvgg" eval "$run/int8-$weights.safetensors" --data fashion-mnist
    done
    if [ "${QAT:-1}" = 1 ]; then
        "$repvgg" quantize "$run/model_train.safetensors" "$run/int8-qat.safetensors" --qat-epochs 1 \
            --qat-subset 10000 --no-progress
        echo "== $block: INT8 QAT (1 epoch on 10,000 images), per-channel weights"
        "$repvgg" eval "$run/int8-qat.safetensors" --data fashion-mnist
    fi
done
