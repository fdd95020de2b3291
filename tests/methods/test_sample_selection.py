"""tools/select_long_samples.py on real stdlib text: exactly the anchor-bearing sentences (here
the anchors are the digits) are kept, plus the requested fraction of the others; samples carry
recorded LongRecipe positions that training reads back unchanged."""

import json
import re

import numpy as np
import pytest

from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents
from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
from megatron_longctx.data.formats.side_data import SideData
from megatron_longctx.data.preprocessing.shards import resolve_prefixes
from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.document_windows import RecordedSamples
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, open_indexed
from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.methods.select_samples_tool import main as select

SEQ, TARGET = 128, 512
DIGITS = [ord(c) for c in "0123456789"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    texts = [t[:6000] for t in stdlib_documents(max_docs=30)]
    prefix = str(root / "stdlib_text_document")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for text in texts:
            writer.add_document(ByteTokenizer().tokenize(text))
        writer.finalize()
    anchors = root / "anchor_tokens.json"
    anchors.write_text(json.dumps({"counts": {str(d): 5 for d in DIGITS}, "anchors": []}))
    return root, prefix, str(anchors), texts


def _run(root, prefix, anchors, name, *extra):
    out = str(root / name)
    summary = select(["--data", prefix, "--anchors", anchors, "--tokenizer-type",
                      "ByteTokenizer", "--target-length", str(TARGET), "--seq-length", str(SEQ),
                      "--output-prefix", out, *extra])
    return out, summary


def _sentences(text: str) -> list[str]:
    """Independent split: a sentence ends after any of . ! ? newline (bytes: ASCII here)."""
    return [s for s in re.split(r"(?<=[.!?\n])", text) if s]


def test_keeps_exactly_the_anchor_sentences(corpus):
    root, prefix, anchors, texts = corpus
    out, summary = _run(root, prefix, anchors, "anchors_only")
    expected, anchor_sentences, sentences = [], 0, 0
    for text in texts:
        parts = _sentences(text)
        sentences += len(parts)
        kept = "".join(s for s in parts if re.search(r"[0-9]", s)).encode()
        anchor_sentences += sum(bool(re.search(r"[0-9]", s)) for s in parts)
        ids = np.frombuffer(kept, np.uint8).astype(np.int64)
        expected += [ids[i:i + SEQ + 1] for i in range(0, len(ids) - SEQ, SEQ + 1)]
    assert summary["sentences"] == sentences and summary["anchor_sentences"] == anchor_sentences
    assert summary["other_sentences_kept"] == 0
    indexed = open_indexed(out)
    got = [indexed.get(i).astype(np.int64) for i in range(len(indexed.sequence_lengths))]
    assert len(got) == len(expected) == summary["samples"] > 10
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # recorded positions: LongRecipe over the kept sentences, reaching the target
    positions = SideData(out, "position_ids", np.asarray(indexed.sequence_lengths))
    for i, tokens in enumerate(got):
        pos = positions.get(i).astype(np.int64)[:SEQ]
        steps = np.diff(pos)
        assert pos[0] == 0 and (steps >= 1).all()
        jumps = np.flatnonzero(steps > 1) + 1
        assert all(chr(tokens[j - 1]) in ".!?\n" for j in jumps)
        if any(chr(t) in ".!?\n" for t in tokens[:SEQ - 1]):  # at least two segments
            assert pos[-1] == TARGET - 1
        else:
            assert np.array_equal(pos, np.arange(SEQ))


def test_keep_other_fraction_and_training_reads_the_recorded_positions(corpus):
    root, prefix, anchors, _ = corpus
    out, summary = _run(root, prefix, anchors, "half_others", "--keep-other", "0.5",
                        "--seed", "7")
    others = summary["sentences"] - summary["anchor_sentences"]
    share = summary["other_sentences_kept"] / others
    assert abs(share - 0.5) <= 4 * (0.25 / others) ** 0.5, (share, others)
    dataset = build_blended_dataset([out], "100,0,0", 50, SampleOptions(SEQ, eod=257), 1)
    assert isinstance(dataset, RecordedSamples)
    indexed = open_indexed(out)
    side = SideData(out, "position_ids", np.asarray(indexed.sequence_lengths))
    for i in range(len(dataset)):
        sample, doc = dataset[i], i % len(indexed.sequence_lengths)
        assert np.array_equal(sample["position_ids"].numpy(), side.get(doc)[:SEQ])
        assert np.array_equal(sample["tokens"].numpy(), indexed.get(doc)[:SEQ])
        assert sample["doc_starts"] == [0]
    # the side data is not a dataset of its own in a directory listing
    found = resolve_prefixes([str(root)])
    assert prefix in found and out in found
    assert not [p for p in found if "side_" in p] and (root / "half_others.side_position_ids.idx"
                                                        ).exists()


def test_recorded_samples_refuse_another_length_or_a_second_transform(corpus):
    root, prefix, anchors, _ = corpus
    out, _ = _run(root, prefix, anchors, "refusals")
    with pytest.raises(ValueError, match=r"refusals: .* of 128 tokens .* --seq-length is 64"):
        build_blended_dataset([out], "100,0,0", 5, SampleOptions(64, eod=257), 1)
    from megatron_longctx.methods.position_transform import PositionTransform

    options = SampleOptions(SEQ, eod=257, position_transform=PositionTransform("pose", TARGET, 1))
    with pytest.raises(ValueError, match="recorded position ids; drop --position-transform"):
        build_blended_dataset([out], "100,0,0", 5, options, 1)
    with pytest.raises(ValueError, match=r"refusals.idx exists"):
        _run(root, prefix, anchors, "refusals")


def test_bad_anchor_file_is_refused(corpus, tmp_path):
    root, prefix, _, _ = corpus
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"counts": {"999": 3}}))
    with pytest.raises(ValueError, match=r"bad.json: token id 999 is outside the vocabulary"):
        _run(root, prefix, str(bad), "bad_anchors")
    assert not (root / "bad_anchors.idx").exists()
