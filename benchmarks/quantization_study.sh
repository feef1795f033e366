#!/usr/bin/env bash
# INT8 evidence (RESULTS.md): RepVGG-A0 and QARepVGG-A0 trained with the same schedule on Fashion-MNIST, then
# evaluated in float32 and in INT8 (PTQ with per-channel and per-tensor weights, and QAT with BatchNorm put
# back after every conv).
# Usage: [QAT=0] [EPOCHS=3] [BLOCKS="repvgg qarepvgg"] benchmarks/quantization_study.sh [RUN_PREFIX]
#   e.g. EPOCHS="1 3" BLOCKS=repvgg benchmarks/quantization_study.sh
# RUN_PREFIX (default runs/quant) names the runs RUN_PREFIX-<block>-a0-<epochs>ep, and a run already there is
# not trained again; EPOCHS and BLOCKS are lists (training lengths, block designs); QAT=0 skips the
# quantization-aware fine-tuning.
set -euo pipefail
prefix=${1:-runs/quant}
repvgg=${REPVGG:-.venv/bin/repvgg}
for block in ${BLOCKS:-repvgg qarepvgg}; do
    for epochs in ${EPOCHS:-3}; do
        run="$prefix-$block-a0-${epochs}ep"
        if [ ! -f "$run/model_deploy.safetensors" ]; then
            "$repvgg" train --model repvgg_a0 --block "$block" --data fashion-mnist --epochs "$epochs" \
                --train-subset 30000 --batch-size 128 --label-smoothing 0.1 --warmup-epochs 0.5 --seed 0 \
                --strides 1 2 2 2 2 --channels-last --output "$run" --no-progress
        fi
        echo "== $block, $epochs epochs: float32"
        "$repvgg" eval "$run/model_deploy.safetensors" --data fashion-mnist
        for weights in per-channel per-tensor; do
            "$repvgg" quantize "$run/model_deploy.safetensors" "$run/int8-$weights.safetensors" --calib 512 \
                --weights "$weights" --no-progress
            echo "== $block, $epochs epochs: INT8 PTQ, $weights weights"
            "$repvgg" eval "$run/int8-$weights.safetensors" --data fashion-mnist
        done
        if [ "${QAT:-1}" = 1 ]; then
            "$repvgg" quantize "$run/model_deploy.safetensors" "$run/int8-qat.safetensors" --qat-epochs 1 \
                --qat-subset 10000 --no-progress
            echo "== $block, $epochs epochs: INT8 QAT with BatchNorm (1 epoch on 10,000 images)"
            "$repvgg" eval "$run/int8-qat.safetensors" --data fashion-mnist
        fi
    done
done
