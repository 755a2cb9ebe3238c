#!/usr/bin/env bash
# TDM + ASA distillation of Wan2.1-T2V-1.3B (SPEC section 2) on NUM_GPUS GPUs of this node.
#
#   MODEL_PATH=/models/Wan2.1-T2V-1.3B-Diffusers PROMPT_STORE=runs/prompts-wan NUM_GPUS=8 \
#     bash wanx/train/train_wanx_1.3b.sh [key=value overrides...]
#
# Build the prompt store once (the model's own text encoder; default prompt list):
#   python utils/process_prompts.py --model $MODEL_PATH --out $PROMPT_STORE
# ACCELERATE_CONFIG defaults to DeepSpeed ZeRO-3 + CPU offload (ds_config.json); for plain DDP
# use ACCELERATE_CONFIG= (empty) and it launches with --multi_gpu.
# Multi-node (N nodes x NUM_GPUS): on every node run this script with the same MAIN_IP / MAIN_PORT,
# NUM_MACHINES=N and its own MACHINE_RANK (0 on the node at MAIN_IP); NUM_GPUS counts this node's GPUs.
# Every node needs the model folder, the prompt store and a shared OUTPUT_DIR (checkpoints are
# written by all ranks into one folder and renamed by rank 0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${MODEL_PATH:?set MODEL_PATH to the local Wan2.1-T2V-1.3B diffusers folder}"
export CONFIG="${CONFIG:-wanx/configs/tdm_asa.yaml}"
export ACCELERATE_CONFIG="${ACCELERATE_CONFIG-wanx/train/config.yaml}"
export OUTPUT_DIR="${OUTPUT_DIR:-runs/wan-1.3b-tdm-asa}"
exec bash "$ROOT/utils/launch_tdm.sh" "$@"
