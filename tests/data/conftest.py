"""Tiny real data for the data-pipeline tests, built once per session (no downloads).

Corpus: the first Python standard-library sources plus a few non-ASCII documents. Tokenizers:
a SentencePiece BPE model trained by our trainer and a byte-level BPE HuggingFace tokenizer
trained with the ``tokenizers`` library, both on that corpus.
"""

import pytest
from pipeline_helpers import UNICODE_DOCS, load_tool, write_jsonl

from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    # small files only: the tests tokenize this corpus many times
    docs = [t for t in stdlib_documents(max_docs=120) if len(t) < 20000][:40]
    return docs + UNICODE_DOCS


@pytest.fixture(scope="session")
def corpus_jsonl(data_dir, corpus_texts) -> str:
    return write_jsonl(data_dir / "corpus.jsonl",
                       [{"text": t, "id": i} for i, t in enumerate(corpus_texts)])


@pytest.fixture(scope="session")
def sp_model(data_dir, corpus_jsonl) -> str:
    from megatron_longctx.data.tokenization.sentencepiece_trainer import (
        SentencePieceTrainConfig,
        train_sentencepiece,
    )

    cfg = SentencePieceTrainConfig(inputs=[corpus_jsonl], output_prefix=str(data_dir / "spm"),
                                   vocab_size=400, num_threads=2)
    return train_sentencepiece(cfg)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(data_dir, corpus_texts) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts, trainer)
    directory = data_dir / "hf_tokenizer"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def preprocess():
    """``tools/preprocess_data.py``'s ``main`` in this process: ``preprocess(*flags)``."""
    tool = load_tool("preprocess_data")
    return lambda *args: tool.main([*map(str, args), "--no-progress"])
