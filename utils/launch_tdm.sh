#!/usr/bin/env bash
# Shared launcher behind wanx/train/train_wanx_1.3b.sh and cogvideox/train/train_tdm.sh: they set
# CONFIG, ACCELERATE_CONFIG and OUTPUT_DIR for their model and exec this file with the user's
# key=value overrides. Variables (environment):
#   MODEL_PATH, PROMPT_STORE (required); NUM_GPUS (this node's GPUs, default 8); OUTPUT_DIR;
#   ACCELERATE_CONFIG (empty: plain DDP with --multi_gpu); MAIN_PORT (29500);
#   NUM_MACHINES (1), MACHINE_RANK (0), MAIN_IP (127.0.0.1) for multi-node runs;
#   MIXED_PRECISION (bf16; used with plain DDP); PYTHON (the interpreter that has accelerate).
# Relative paths: MODEL_PATH, PROMPT_STORE and OUTPUT_DIR are taken from the directory the script is
# started in; CONFIG and ACCELERATE_CONFIG from there if they exist there, else from the repository
# (the model scripts' defaults). The launch itself runs from the repository.
set -euo pipefail
CALLER="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${CONFIG:?set CONFIG to the run's YAML (the model's launch script does)}"
: "${MODEL_PATH:?set MODEL_PATH to the local diffusers model folder}"
: "${PROMPT_STORE:?set PROMPT_STORE to a folder written by utils/process_prompts.py}"
: "${OUTPUT_DIR:?set OUTPUT_DIR}"
from_caller() { case "$1" in /* | "") printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER" "$1" ;; esac; }
from_caller_or_repo() {
  case "$1" in
    /* | "") printf '%s' "$1" ;;
    *) if [[ -e "$CALLER/$1" ]]; then printf '%s/%s' "$CALLER" "$1"; else printf '%s/%s' "$ROOT" "$1"; fi ;;
  esac
}
MODEL_PATH="$(from_caller "$MODEL_PATH")"
PROMPT_STORE="$(from_caller "$PROMPT_STORE")"
OUTPUT_DIR="$(from_caller "$OUTPUT_DIR")"
CONFIG="$(from_caller_or_repo "$CONFIG")"
ACCELERATE_CONFIG="$(from_caller_or_repo "${ACCELERATE_CONFIG-}")"
cd "$ROOT"
NUM_GPUS="${NUM_GPUS:-8}"
MAIN_PORT="${MAIN_PORT:-29500}"
NUM_MACHINES="${NUM_MACHINES:-1}"
MACHINE_RANK="${MACHINE_RANK:-0}"
MAIN_IP="${MAIN_IP:-127.0.0.1}"
MIXED_PRECISION="${MIXED_PRECISION:-bf16}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes "$((NUM_GPUS * NUM_MACHINES))" --num_machines "$NUM_MACHINES"
        --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT")
if [[ -n "$ACCELERATE_CONFIG" ]]; then
  LAUNCH+=(--config_file "$ACCELERATE_CONFIG")
elif [[ "$NUM_GPUS" -gt 1 || "$NUM_MACHINES" -gt 1 ]]; then
  LAUNCH+=(--multi_gpu --mixed_precision "$MIXED_PRECISION")
fi
exec "${LAUNCH[@]}" -m videoblade.train --config "$CONFIG" \
  model.path="$MODEL_PATH" train.prompt_store="$PROMPT_STORE" train.output_dir="$OUTPUT_DIR" "$@"
