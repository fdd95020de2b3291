#!/usr/bin/env bash
# Quick start: the whole pipeline on a corpus present on every machine (Python's standard
# library sources), then a short long-context pretraining run of a tiny Llama.
#   1. stdlib sources -> JSONL                    (tools/make_stdlib_corpus.py)
#   2. JSONL -> SentencePiece BPE tokenizer       (tools/train_tokenizer.py)
#   3. JSONL -> Megatron .bin/.idx dataset        (tools/preprocess_data.py)
#   4. pretrain with packed documents, document-causal attention, checkpoints
#                                                 (tools/pretrain.py --config examples/quickstart.yaml)
# Finished stages are reused on a rerun (delete data/quickstart to start over); training resumes
# from its last checkpoint in runs/quickstart. Extra flags go to tools/pretrain.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/tools/bootstrap_venv.sh"
cd "$root"
py="$root/.venv/bin/python"
data=data/quickstart
mkdir -p "$data"

if [[ ! -f $data/stdlib.jsonl ]]; then
  "$py" tools/make_stdlib_corpus.py --output "$data/stdlib.jsonl"
fi
if [[ ! -f $data/tokenizer.model ]]; then
  "$py" tools/train_tokenizer.py --input "$data/stdlib.jsonl" --json-keys text \
    --vocab-size 2048 --input-sentence-size 300000 --output-prefix "$data/tokenizer"
fi
if [[ ! -f $data/stdlib_text_document.idx ]]; then
  "$py" tools/preprocess_data.py --input "$data/stdlib.jsonl" --json-keys text \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$data/tokenizer.model" \
    --append-eod --workers 2 --output-prefix "$data/stdlib"
fi
exec "$py" tools/pretrain.py --config examples/quickstart.yaml "$@"
