#!/usr/bin/env bash
# LongRecipe for Llama-3-8B, 8k -> 128k (seed 001, METHODS.md §3), as a sequence of Slurm jobs
# on one node of 8 x 80 GB. Each step waits for the previous one (sbatch --wait); rerunning the
# script skips steps whose outputs exist, and training resumes from its checkpoints.
#   1. impactful tokens: the base vs an extended model of it (EXTENDED: e.g. a short PoSE run,
#      examples/llama3_8b_pose_128k.yaml, or any 128k extension of the same base), on long
#      held-out documents                                      -> impactful/llama3_8b
#   2. sample selection: sentences holding anchor tokens, 38.4k-token samples with LongRecipe
#      positions spanning 128k                                  -> data/llama3_longrecipe_*
#   3. extension, 104 steps at 38.4k, lr 5e-5 (stage 1 of examples/llama3_8b_longrecipe_128k.yaml)
#      and replay, 87 steps of general 8k data, lr 5e-6 (stage 2) -> runs/llama3_8b_longrecipe
#   4. merge: 0.5 extension + 0.5 replay                        -> runs/llama3_8b_longrecipe/merged
#   5. evaluation: perplexity by length and passkey up to 128k on the merged model
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-checkpoints/llama3-8b}  # tools/convert_hf_to_mcore.py output (with tokenizer/)
EXTENDED=${EXTENDED:-runs/llama3_8b_pose}
LONG_DATA=${LONG_DATA:-data/long_text_document}  # long documents to select from
HELDOUT=${HELDOUT:-data/pg19_heldout_text_document}
RUN=runs/llama3_8b_longrecipe
mkdir -p logs impactful data

tool() { sbatch --wait --nodes 1 --job-name "$1" examples/slurm/tool.sbatch "$@"; }

[[ -f impactful/llama3_8b/anchor_tokens.json ]] || tool longctx-analyze-impactful-tokens \
  --base "$BASE" --extended "$EXTENDED" --data "$HELDOUT" --seq-length 32768 \
  --num-documents 20 --tensor-model-parallel-size 8 --out impactful/llama3_8b
[[ -f data/llama3_longrecipe_text_document.idx ]] || sbatch --wait --nodes 1 \
  --ntasks-per-node 1 --gpus-per-node 0 examples/slurm/tool.sbatch longctx-select-long-samples \
  --data "$LONG_DATA" --anchors impactful/llama3_8b/anchor_tokens.json \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$BASE/tokenizer" \
  --target-length 128000 --seq-length 38400 --keep-other 0.3 \
  --output-prefix data/llama3_longrecipe_text_document
# both stages; a requeued job skips the finished stage and resumes the other
sbatch --wait --nodes 1 examples/slurm/pretrain.sbatch \
  --config examples/llama3_8b_longrecipe_128k.yaml
[[ -f $RUN/merged/latest_checkpointed_iteration.txt ]] || sbatch --wait --nodes 1 \
  --ntasks-per-node 1 --gpus-per-node 0 examples/slurm/tool.sbatch longctx-merge-checkpoints \
  --load "$RUN/stage_1" "$RUN/stage_2" --weights 0.5 0.5 --tensor-model-parallel-size 8 \
  --save "$RUN/merged"
tool longctx-eval-perplexity --load "$RUN/merged" --data "$HELDOUT" \
  --lengths 8192,32768,65536,131072 --tensor-model-parallel-size 8 --out "$RUN/eval/perplexity"
tool longctx-eval-passkey --load "$RUN/merged" --lengths 8192,32768,65536,131072 \
  --tensor-model-parallel-size 8 --out "$RUN/eval/passkey"
echo "merged model: $RUN/merged (convert back: tools/convert_mcore_to_hf.py --load $RUN/merged)"
