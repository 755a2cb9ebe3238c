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
cd "$ROOT"
: "${MODEL_PATH:?set MODEL_PATH to the local Wan2.1-T2V-1.3B diffusers folder}"
: "${PROMPT_STORE:?set PROMPT_STORE to a folder written by utils/process_prompts.py}"
NUM_GPUS="${NUM_GPUS:-8}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/wan-1.3b-tdm-asa}"
CONFIG="${CONFIG:-wanx/configs/tdm_asa.yaml}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG-wanx/train/config.yaml}"
MAIN_PORT="${MAIN_PORT:-29500}"

NUM_MACHINES="${NUM_MACHINES:-1}"
MACHINE_RANK="${MACHINE_RANK:-0}"
MAIN_IP="${MAIN_IP:-127.0.0.1}"

LAUNCH=(accelerate launch --num_processes "$((NUM_GPUS * NUM_MACHINES))" --num_machines "$NUM_MACHINES"
        --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT")
if [[ -n "$ACCELERATE_CONFIG" ]]; then
  LAUNCH+=(--config_file "$ACCELERATE_CONFIG")
elif [[ "$NUM_GPUS" -gt 1 ]]; then
  LAUNCH+=(--multi_gpu --mixed_precision bf16)
fi
exec "${LAUNCH[@]}" -m videoblade.train --config "$CONFIG" \
  model.path="$MODEL_PATH" train.prompt_store="$PROMPT_STORE" train.output_dir="$OUTPUT_DIR" "$@"
