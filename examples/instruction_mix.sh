#!/usr/bin/env bash
# Continual pretraining on general, domain and instruction data at 7:2:1: one preprocess per
# source, then one weighted --data-path blend (Megatron-LM's "WEIGHT PREFIX" pairs).
#
# Instruction records are chat JSONL, {"messages": [{"role": "user", "content": ...},
# {"role": "assistant", "content": ...}, ...]} or {"prompt": ..., "response": ...}; they are
# rendered with the tokenizer's own chat template (--chat-template auto, exactly as
# transformers' apply_chat_template renders them); --mask-prompt-loss keeps the system/user
# turns and role markers out of the loss (a mask beside the dataset, applied by training).
#
#   GENERAL='corpus/web/*.jsonl.zst' DOMAIN='corpus/code/*.jsonl.zst' \
#   INSTRUCT='corpus/sft/*.jsonl' TOKENIZER=tok/llama2 \
#       bash examples/instruction_mix.sh --config examples/llama2_7b_harpe_128k.yaml
# Arguments go to longctx-pretrain; add --dry-run to check the blend and the recipe only.
set -euo pipefail

GENERAL="${GENERAL:-corpus/general/*.jsonl.zst}"
DOMAIN="${DOMAIN:-corpus/domain/*.jsonl.zst}"
INSTRUCT="${INSTRUCT:-corpus/instruct/*.jsonl}"
TOKENIZER="${TOKENIZER:-tok/llama2}"   # a local HuggingFace tokenizer directory with a template
OUT="${OUT:-data/mix}"
WORKERS="${WORKERS:-8}"
WEIGHTS="${WEIGHTS:-7 2 1}"             # general, domain, instruction

tokenizer=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
preprocess() { longctx-preprocess-data "${tokenizer[@]}" --append-eod --workers "$WORKERS" "$@"; }

mkdir -p "$OUT"
[[ -f "$OUT/general_text_document.idx" ]] || preprocess --input "$GENERAL" --output-prefix "$OUT/general"
[[ -f "$OUT/domain_text_document.idx" ]] || preprocess --input "$DOMAIN" --output-prefix "$OUT/domain"
[[ -f "$OUT/instruct_messages_document.idx" ]] || preprocess --input "$INSTRUCT" \
    --json-keys messages --chat-template auto --mask-prompt-loss --output-prefix "$OUT/instruct"

read -r w_general w_domain w_instruct <<< "$WEIGHTS"
exec longctx-pretrain "${tokenizer[@]}" --data-path \
    "$w_general" "$OUT/general_text_document" \
    "$w_domain" "$OUT/domain_text_document" \
    "$w_instruct" "$OUT/instruct_messages_document" "$@"
