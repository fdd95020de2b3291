#!/usr/bin/env bash
# Quick start: the whole long-context job on data present on every machine, in one command.
#   1. data   Python's standard-library sources, one long document per package (every 10th
#             held out for evaluation), plus synthetic retrieval documents; a SentencePiece
#             tokenizer; Megatron .bin/.idx datasets
#   2. base   a tiny Llama pretrained at 256 tokens, original RoPE (examples/quickstart.yaml)
#   3. extend 8x to 2048 tokens from the base, same data and token budget for every run:
#             control (more training at 256, original RoPE), ABF, PI, YaRN, HARPE, and PoSE
#             (YaRN trained on 256-token windows whose positions span 2048)
#   4. eval   perplexity by context length on the held-out packages, passkey retrieval
#   5. report runs/quickstart/report.md: tables, plots and a reading of the numbers
# A rerun reuses every finished step (delete data/quickstart or runs/quickstart to redo).
# --smoke: the same job with a few steps and a small evaluation (~2 minutes), into
# data/quickstart_smoke and runs/quickstart_smoke. Other arguments go to every training run.
# QUICKSTART_OUT=DIR puts data/ and runs/ under DIR instead of the repository.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
smoke=0
if [[ ${1:-} == --smoke ]]; then smoke=1; shift; fi
"$root/tools/bootstrap_venv.sh"
cd "$root"
py="$root/.venv/bin/python"
out="${QUICKSTART_OUT:-.}"
export PYTHONWARNINGS=ignore  # library deprecation notices would drown the progress lines

if ((smoke)); then
  data=$out/data/quickstart_smoke runs=$out/runs/quickstart_smoke
  max_docs=(--max-docs 40) retrieval_docs=300
  base_iters=6 extend_iters=3 warmup=(--lr-warmup-iters 2) eval_docs=1 trials=2
  ppl_lengths=256,2048 pk_lengths=256,2048 depths=0.5
else
  data=$out/data/quickstart runs=$out/runs/quickstart
  max_docs=() retrieval_docs=3000
  base_iters=120 extend_iters=40 warmup=() eval_docs=4 trials=10
  ppl_lengths=256,512,1024,2048 pk_lengths=256,512,1024,2048 depths=0,0.5,1
fi
mkdir -p "$data" "$runs"
step() { printf '\n=== %s\n' "$*"; }

step "1/5 data ($data)"
if [[ ! -f $data/heldout.jsonl ]]; then
  "$py" tools/make_stdlib_corpus.py --by-package "${max_docs[@]}" --output "$data/stdlib.jsonl" \
    --holdout-every 10 --holdout-output "$data/heldout.jsonl"
fi
if [[ ! -f $data/retrieval.jsonl ]]; then
  # filler sentences are ~42 tokens: documents of ~60 to ~2000 tokens
  "$py" tools/make_retrieval_corpus.py --output "$data/retrieval.jsonl" \
    --count "$retrieval_docs" --max-filler 48
fi
if [[ ! -f $data/tokenizer.model ]]; then
  "$py" tools/train_tokenizer.py --input "$data/stdlib.jsonl" --json-keys text \
    --vocab-size 2048 --input-sentence-size 300000 --output-prefix "$data/tokenizer"
fi
for name in stdlib retrieval heldout; do
  if [[ ! -f $data/${name}_text_document.idx ]]; then
    "$py" tools/preprocess_data.py --input "$data/$name.jsonl" --json-keys text \
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$data/tokenizer.model" \
      --append-eod --workers 2 --output-prefix "$data/$name"
  fi
done

finished() { [[ $(cat "$1/exit_reason" 2>/dev/null) == finished ]]; }
train() {  # train RUN FLAGS...: one run of the recipe, skipped once finished
  local run=$1; shift
  if finished "$runs/$run"; then echo "$run: finished earlier"; return; fi
  "$py" tools/pretrain.py --config examples/quickstart.yaml \
    --data-path 0.9 "$data/stdlib_text_document" 0.1 "$data/retrieval_text_document" \
    --tokenizer-model "$data/tokenizer.model" --save "$runs/$run" --load "$runs/$run" "$@"
}

step "2/5 base model at 256 tokens"
train base --train-iters "$base_iters" "${warmup[@]}" "$@"

step "3/5 extend 8x: 256 -> 2048 tokens (control, ABF, PI, YaRN, HARPE, PoSE)"
# every run: the base's weights, a fresh optimizer, 8192 tokens per step, the same steps
from_base=(--pretrained-checkpoint "$runs/base" --train-iters "$extend_iters" --lr 1e-3
           --min-lr 1e-4 --lr-warmup-iters 2 --eval-interval 1000)
long=(--seq-length 2048 --micro-batch-size 1 --global-batch-size 4
      --max-position-embeddings 2048)
train control "${from_base[@]}" "$@"
train abf "${from_base[@]}" "${long[@]}" --rotary-base 500000 "$@"
train pi "${from_base[@]}" "${long[@]}" --rope-type linear --rope-factor 8 "$@"
train yarn "${from_base[@]}" "${long[@]}" --rope-type yarn --rope-factor 8 \
  --original-max-position-embeddings 256 "$@"
# HARPE: one base per KV group, peak/valley-complementary, spanning [original, ABF base]
train harpe "${from_base[@]}" "${long[@]}" --rope-type harpe --harpe-scheme peak_valley \
  --harpe-base-min 10000 --harpe-base-max 500000 --harpe-stride 10000 "$@"
# PoSE: YaRN's RoPE, trained at 256 tokens (single-document windows) with position ids
# spread over 2048: the data method, at the cost of the control run
train pose "${from_base[@]}" --rope-type yarn --rope-factor 8 \
  --original-max-position-embeddings 256 --max-position-embeddings 2048 \
  --position-transform pose --target-length 2048 "$@"

runs_list=("$runs/base" "$runs/control" "$runs/abf" "$runs/pi" "$runs/yarn" "$runs/harpe"
           "$runs/pose")
current() {  # current RESULTS: evaluated after every run last finished
  local run
  for run in "${runs_list[@]}"; do [[ $1 -nt $run/exit_reason ]] || return 1; done
}
step "4/5 evaluate: perplexity by length, passkey"
if ! current "$runs/eval/perplexity/results.json"; then
  "$py" tools/eval_perplexity.py --load "${runs_list[@]}" \
    --data "$data/heldout_text_document" --lengths "$ppl_lengths" \
    --num-documents "$eval_docs" --out "$runs/eval/perplexity"
fi
if ! current "$runs/eval/passkey/results.json"; then
  "$py" tools/eval_passkey.py --load "${runs_list[@]}" --lengths "$pk_lengths" \
    --depths "$depths" --trials "$trials" --out "$runs/eval/passkey"
fi

step "5/5 report"
"$py" tools/extension_report.py --perplexity "$runs/eval/perplexity" \
  --passkey "$runs/eval/passkey" --base base --control control --train-length 256 \
  --title "Quick start: a tiny Llama extended from 256 to 2048 tokens" \
  --preamble "Made by \`examples/quickstart.sh\`$( ((smoke)) && echo ' --smoke')\
 on $(nproc) CPU cores: a 1.3M-parameter Llama pretrained for $base_iters steps at 256\
 tokens, then $extend_iters steps (8192 tokens each) per run from it." \
  --out "$runs/report.md"
