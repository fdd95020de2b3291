#!/usr/bin/env bash
# LongRoPE's progressive extension of Llama-2-7B, 4k -> 128k -> 256k -> 2048k (seed 002,
# METHODS.md §4), as a sequence of Slurm jobs. Each step waits for the previous one
# (sbatch --wait); rerunning the script skips steps whose outputs exist, and the training and
# search steps resume from their own checkpoints / state.json after a preemption.
#   1. search 128k factors (s = 32) on the converted base        -> longrope/128k
#   2. fine-tune 400 steps at 128k with them                      -> runs/llama2_7b_longrope_128k
#   3. search 256k factors (s = 64) on the fine-tuned model       -> longrope/256k
#   4. fine-tune 600 steps at 256k                                -> runs/llama2_7b_longrope_256k
#   5. search 2048k factors (8x of 256k) on that model, no tuning -> longrope/2048k
#   6. readjust short_factor (and n-hat) at 4k for short inputs    -> longrope/2048k_short
# Search jobs: one node, TP=8 (7B, evaluated at up to 2048k tokens with CP across nodes:
# set SEARCH_NODES and CP accordingly). Data: held-out long documents for the objective.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-checkpoints/llama2-7b}
HELDOUT=${HELDOUT:-data/pg19_heldout_text_document}
SEARCH_NODES=${SEARCH_NODES:-1}
mkdir -p logs

search() {  # search OUT LOAD TARGET [extra flags]
  local out=$1 load=$2 target=$3; shift 3
  [[ -f $out/rope_parameters.json ]] && return
  # the search saves its state every iteration: resubmitting the same command resumes it
  sbatch --wait --nodes "$SEARCH_NODES" --job-name "longrope-$(basename "$out")" \
    examples/slurm/tool.sbatch longctx-longrope-search --load "$load" --data "$HELDOUT" \
    --target-length "$target" --tensor-model-parallel-size 8 \
    --context-parallel-size "$SEARCH_NODES" --out "$out" "$@"
}
finetune() {  # finetune RECIPE FACTORS [extra flags]
  local recipe=$1 factors=$2; shift 2
  sbatch --wait --nodes 4 examples/slurm/pretrain.sbatch --config "$recipe" \
    --longrope-long-factor "$factors/long_factor.json" \
    --longrope-short-factor "$factors/short_factor.json" "$@"
}

search longrope/128k "$BASE" 131072
finetune examples/llama2_7b_longrope_128k.yaml longrope/128k
search longrope/256k runs/llama2_7b_longrope_128k 262144 --original-max-position-embeddings 4096
finetune examples/llama2_7b_longrope_128k.yaml longrope/256k --seq-length 262144 \
  --max-position-embeddings 262144 --rope-factor 64 --train-iters 600 --global-batch-size 16 \
  --context-parallel-size 8 --pretrained-checkpoint runs/llama2_7b_longrope_128k \
  --save runs/llama2_7b_longrope_256k --load runs/llama2_7b_longrope_256k
search longrope/2048k runs/llama2_7b_longrope_256k 2097152 --original-max-position-embeddings 4096
search longrope/2048k_short runs/llama2_7b_longrope_256k 4096 --short \
  --rope-parameters longrope/2048k/rope_parameters.json
echo "final rope_parameters: longrope/2048k_short/rope_parameters.json"
