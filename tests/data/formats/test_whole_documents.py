"""Training reads a sentence-split dataset (several sequences per document) as whole
documents: the samples of a --split-sentences preprocess equal those of the same documents
written one sequence each."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from pipeline_helpers import write_jsonl

from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, open_indexed

SENTENCES = ["The cat sat on the mat.", "Dr. Smith arrived at 5 p.m. sharp!",
             "Is this the end?", "No, it is not.", "Prices rose by 3.5% in May.",
             "She said: \"Go home.\"", "Then it rained.\nA new line starts here."]


def write_dataset(prefix: str, docs: list[np.ndarray]) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int32)), [len(doc)])
    builder.finalize(prefix + ".idx")


def concatenated_documents(prefix: str) -> list[np.ndarray]:
    """Each document's sentences' tokens joined, read sequence by sequence by megatron-core."""
    data = IndexedDataset(prefix)
    bounds = data.document_indices
    return [np.concatenate([data[s] for s in range(bounds[d], bounds[d + 1])])
            for d in range(len(bounds) - 1)]


def same_samples(a, b, count: int) -> None:
    for i in range(count):
        x, y = a[i], b[i]
        assert x["doc_starts"] == y["doc_starts"]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(x[key], y[key]), (i, key)


def test_sequences_of_a_document_read_as_one(tmp_path):
    prefix = str(tmp_path / "sentences")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.arange(10, dtype=torch.int32), [4, 6])  # two "sentences"
    builder.add_document(torch.arange(20, 25, dtype=torch.int32), [5])
    builder.add_document(torch.arange(30, 37, dtype=torch.int32), [1, 2, 4])
    builder.finalize(prefix + ".idx")
    data = open_indexed(prefix)
    assert data.sequence_lengths.tolist() == [10, 5, 7]
    assert data.get(0).tolist() == list(range(10))
    assert data.get(0, offset=3, length=5).tolist() == list(range(3, 8))  # across sentences
    assert data.get(2, offset=2).tolist() == list(range(32, 37))
    with pytest.raises(IndexError):
        data.get(1, offset=3, length=3)  # would run into the next document
    reference = str(tmp_path / "whole")
    write_dataset(reference, [np.arange(10), np.arange(20, 25), np.arange(30, 37)])
    options = SampleOptions(6, eod=1, reset_position_ids=True)
    same_samples(build_blended_dataset([prefix], "1", 3, options, 0),
                 build_blended_dataset([reference], "1", 3, options, 0), 3)


@pytest.fixture(scope="module")
def prose_jsonl(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(SENTENCES, size=int(rng.integers(2, 9))))
             for _ in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("prose") / "prose.jsonl",
                       [{"text": t} for t in texts])


def test_split_sentences_with_newlines_kept_trains_as_the_unsplit_corpus(tmp_path, preprocess,
                                                                         prose_jsonl):
    """Byte tokens and --keep-newlines: the sentences joined are the text, so the sentence
    dataset's samples are those of the plain preprocess."""
    common = ["--input", prose_jsonl, "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    assert preprocess(*common, "--output-prefix", tmp_path / "s", "--split-sentences",
                      "--keep-newlines") == 0
    assert preprocess(*common, "--output-prefix", tmp_path / "d") == 0
    split, whole = str(tmp_path / "s_text_sentence"), str(tmp_path / "d_text_document")
    info = IndexedDataset(split)
    assert len(info.sequence_lengths) > 2 * (len(info.document_indices) - 1)  # really split
    options = SampleOptions(48, eod=257, eod_mask_loss=True, reset_position_ids=True)
    same_samples(build_blended_dataset([split], "1", 30, options, 5),
                 build_blended_dataset([whole], "1", 30, options, 5), 30)


def test_split_sentences_trains_as_its_sentences_joined(tmp_path, preprocess, prose_jsonl,
                                                        sp_model):
    """Without --keep-newlines the splitter drops the whitespace between sentences (as
    Megatron-LM's does), and SentencePiece tokenizes each sentence alone: a document is its
    sentences' tokens joined, in the samples as in a dataset written that way."""
    assert preprocess("--input", prose_jsonl, "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", sp_model, "--append-eod", "--split-sentences",
                      "--output-prefix", tmp_path / "s") == 0
    split = str(tmp_path / "s_text_sentence")
    reference = str(tmp_path / "joined")
    write_dataset(reference, concatenated_documents(split))
    options = SampleOptions(48, eod=2, reset_position_ids=True)
    same_samples(build_blended_dataset([split], "1", 30, options, 5),
                 build_blended_dataset([reference], "1", 30, options, 5), 30)
