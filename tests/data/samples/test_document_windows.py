"""--position-transform in the sample builder: single-document windows of real stdlib text whose
position ids follow PoSE/LongRecipe, deterministic per (seed, sample index), blended and
weighted like packed sources, with --pack-short packing the short documents untransformed."""

import numpy as np
import pytest

from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents
from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.document_windows import DocumentWindows, WindowsAndPacked
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, open_indexed
from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.methods.position_transform import (
    PositionTransform,
    sentence_end_table,
)

SEQ, TARGET, SEED = 256, 1024, 3


@pytest.fixture(scope="module")
def stdlib_prefix(tmp_path_factory):
    """Byte-tokenized stdlib sources: a mix of documents longer and shorter than a window."""
    tok = ByteTokenizer()
    prefix = str(tmp_path_factory.mktemp("windows") / "stdlib_text_document")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for i, text in enumerate(stdlib_documents(max_docs=60)):
            ids = tok.tokenize(text[:3000] if i % 2 else text[:200])  # short and long ones
            writer.add_document(ids + [tok.eod])
        writer.finalize()
    return prefix


def _options(kind, pack_short=False):
    ends = sentence_end_table(ByteTokenizer()) if kind == "longrecipe" else None
    return SampleOptions(SEQ, eod=ByteTokenizer.eod, pack_short=pack_short,
                         position_transform=PositionTransform(kind, TARGET, SEED, ends))


def test_sentence_end_table_decodes_each_token():
    table = sentence_end_table(ByteTokenizer())
    assert table.shape == (ByteTokenizer.vocab_size,)
    assert {i for i in range(128) if table[i]} == {ord(c) for c in ".!?\n"}


@pytest.mark.parametrize("kind", ["pose", "longrecipe"])
def test_windows_are_single_documents_with_transformed_positions(stdlib_prefix, kind):
    indexed = open_indexed(stdlib_prefix)
    lengths = np.asarray(indexed.sequence_lengths)
    options = _options(kind)
    docs = np.arange(len(lengths))
    windows = DocumentWindows("stdlib", indexed, docs, 200, options)
    assert windows.num_windows == int(((lengths - 1) // SEQ).sum())
    sources = {tuple(indexed.get(int(d))) for d in docs if lengths[d] > SEQ}
    table = sentence_end_table(ByteTokenizer())
    reached = 0
    for i in range(len(windows)):
        sample = windows[i]
        tokens = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
        # the window is a contiguous piece of one long document
        assert any(_contains(doc, tokens) for doc in sources)
        positions = sample["position_ids"].numpy()
        steps = np.diff(positions)
        assert positions[0] == 0 and (steps >= 1).all() and positions[-1] < TARGET
        assert sample["doc_starts"] == [0]
        if kind == "longrecipe":
            ends = table[sample["tokens"].numpy()]
            jumps = np.flatnonzero(steps > 1) + 1
            assert all(ends[j - 1] for j in jumps)  # gaps only right after sentence ends
            assert (steps - 1).sum() == positions[-1] + 1 - SEQ
            reached += positions[-1] >= 0.9 * TARGET
        else:
            assert len(np.flatnonzero(steps > 1)) <= 1  # two chunks
        again = windows[i]["position_ids"]
        assert np.array_equal(again.numpy(), positions)  # deterministic
    if kind == "longrecipe":
        assert reached == len(windows)  # code has sentence ends throughout
    # a window seen again (next epoch) gets fresh positions
    w = windows.num_windows
    assert np.array_equal(windows[0]["tokens"], windows[w]["tokens"])
    assert not np.array_equal(windows[0]["position_ids"], windows[w]["position_ids"])


def _contains(doc, piece) -> bool:
    doc = np.asarray(doc)
    starts = np.flatnonzero(doc[:len(doc) - len(piece) + 1] == piece[0])
    return any(np.array_equal(doc[s:s + len(piece)], piece) for s in starts)


def test_pack_short_interleaves_untransformed_packed_samples(stdlib_prefix):
    options = _options("pose", pack_short=True)
    dataset = build_blended_dataset([stdlib_prefix], "100,0,0", 300, options, SEED)
    assert isinstance(dataset, WindowsAndPacked)
    windows, per_epoch = dataset.cycle
    indexed = open_indexed(stdlib_prefix)
    lengths = np.asarray(indexed.sequence_lengths)
    assert per_epoch == (int(lengths[lengths <= SEQ].sum()) - 1) // SEQ > 0
    short = {tuple(indexed.get(int(d))) for d in np.flatnonzero(lengths <= SEQ)}
    for i in range(windows + per_epoch):
        sample = dataset[i]
        if i < windows:
            assert sample["doc_starts"] == [0]
            continue
        # packed short documents: plain positions, every document start marked
        assert np.array_equal(sample["position_ids"].numpy(), np.arange(SEQ))
        starts, tokens = sample["doc_starts"], sample["tokens"].numpy()
        for a, b in zip(starts[1:], starts[2:]):  # the documents cut by neither sample edge
            assert tuple(tokens[a:b]) in short
    without = build_blended_dataset([stdlib_prefix], "100,0,0", 300, _options("pose"), SEED)
    assert isinstance(without, DocumentWindows) and without.num_windows == windows


def test_unweighted_sources_are_weighted_by_their_windows(stdlib_prefix, tmp_path):
    """Megatron-LM's unweighted list weights by samples per epoch: under the transform, the
    windows (not the packed token count)."""
    from megatron_longctx.data.samples.blended_dataset import BlendedDataset

    options = _options("pose")
    dataset = build_blended_dataset([stdlib_prefix, stdlib_prefix], "100,0,0", 100, options,
                                    SEED)
    assert isinstance(dataset, BlendedDataset)
    assert dataset.weights == [0.5, 0.5]


def test_no_long_document_is_a_clear_error(tmp_path):
    prefix = str(tmp_path / "short_text_document")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(20):
            writer.add_document(list(range(50)))
        writer.finalize()
    with pytest.raises(ValueError, match=r"short_text_document: no document has the 257 tokens"):
        build_blended_dataset([prefix], "100,0,0", 10, _options("pose"), SEED)


def test_run_flags_build_transformed_windows(stdlib_prefix):
    """``--position-transform longrecipe --target-length`` through the run's config."""
    from megatron_longctx.config import RunConfig
    from megatron_longctx.training.run import build_datasets

    cfg = RunConfig()
    cfg.data.data_path, cfg.data.split = [stdlib_prefix], "100,0,0"
    cfg.data.position_transform, cfg.data.target_length = "longrecipe", TARGET
    cfg.training.seq_length, cfg.training.train_iters = SEQ, 2
    cfg.validate(1)
    train, _, _ = build_datasets(cfg)
    assert isinstance(train, DocumentWindows)
    assert max(int(train[i]["position_ids"].max()) for i in range(20)) == TARGET - 1


@pytest.mark.parametrize("change,message", [
    (dict(position_transform="yarn"), "--position-transform 'yarn': expected one of"),
    (dict(position_transform="pose"), "needs --target-length >= --seq-length 256"),
    (dict(position_transform="pose", target_length=100), "got 100"),
    (dict(pack_short=True), "--pack-short and --target-length go with"),
    (dict(position_transform="pose", target_length=2048, data_path=["stdlib"]),
     "--data-path stdlib is a token stream"),
])
def test_bad_transform_flags_are_refused(stdlib_prefix, change, message):
    from megatron_longctx.config import RunConfig

    cfg = RunConfig()
    cfg.data.data_path = [stdlib_prefix]
    cfg.training.seq_length, cfg.training.train_iters = SEQ, 2
    for key, value in change.items():
        setattr(cfg.data, key, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate(1)
