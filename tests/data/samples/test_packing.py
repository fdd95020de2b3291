"""Packed long-context samples, blends and length upsampling on indexed datasets written by
megatron-core's own builder."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_longctx.data.samples import packing
from megatron_longctx.data.samples.blended_dataset import (
    BlendedDataset,
    build_blended_dataset,
    parse_upsample,
)
from megatron_longctx.data.samples.long_context_dataset import PackedDataset, SampleOptions

EOD = 1


def write_dataset(prefix: str, docs: list[np.ndarray]) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int32)), [len(doc)])
    builder.finalize(prefix + ".idx")


def make_docs(lengths, start_token=2):
    """Each document is a run of one distinct token id (its index + 2), ending in EOD."""
    return [np.concatenate([np.full(n - 1, i + start_token), [EOD]]) for i, n in enumerate(lengths)]


def test_sample_index_covers_stream_exactly():
    lengths = np.array([5, 1, 7, 3, 10])
    index = packing.sample_index(lengths, 4, 6)
    stream = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    order = np.arange(5)
    for i in range(6):
        pieces = packing.sample_documents(order, lengths, index, i, 4)
        got = np.concatenate([np.full(n, d) for d, _, n in pieces])
        np.testing.assert_array_equal(got, stream[i * 4:i * 4 + 5])
    with pytest.raises(ValueError, match="cannot fill"):
        packing.sample_index(lengths, 4, 7)


def test_split_documents():
    assert packing.split_documents(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert packing.split_documents(10, "1") == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(ValueError, match="comma-separated numbers"):
        packing.split_documents(10, "a,b")


def test_128k_samples_with_short_and_long_documents(tmp_path):
    s = 131072
    rng = np.random.default_rng(0)
    lengths = [300_000, 17, 5000, 131073, 2, 90_000] + rng.integers(2, 40_000, 30).tolist()
    docs = make_docs(lengths)
    prefix = str(tmp_path / "long")
    write_dataset(prefix, docs)
    options = SampleOptions(s, eod=EOD, reset_position_ids=True, eod_mask_loss=True)
    ds = PackedDataset(prefix, (0, len(docs)), 6, options, seed=3)
    stream = np.concatenate([docs[d] for d in ds.order])
    doc_id = np.concatenate([np.full(len(docs[d]), d) for d in ds.order])
    for i in range(6):
        sample = ds[i]
        window = stream[i * s:i * s + s + 1]
        ids = doc_id[i * s:i * s + s + 1]
        np.testing.assert_array_equal(sample["tokens"].numpy(), window[:-1])
        np.testing.assert_array_equal(sample["labels"].numpy(), window[1:])
        starts = [0] + (np.nonzero(ids[1:-1] != ids[:-2])[0] + 1).tolist()
        assert sample["doc_starts"] == starts
        # positions restart at every document start
        expected_pos = np.concatenate([np.arange(b - a) for a, b in zip(starts, starts[1:] + [s])])
        np.testing.assert_array_equal(sample["position_ids"].numpy(), expected_pos)
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), (window[:-1] != EOD))
        assert sample["tokens"].shape == (s,)
    # some sample lies inside the 300k document (no boundary), some packs several documents
    counts = [len(ds[i]["doc_starts"]) for i in range(6)]
    assert min(counts) == 1 and max(counts) > 2


def test_sample_index_is_cached_and_reused(tmp_path):
    prefix = str(tmp_path / "c")
    write_dataset(prefix, make_docs([50] * 40))
    options = SampleOptions(64, eod=EOD)
    first = PackedDataset(prefix, (0, 40), 20, options, seed=1)
    cached = list(tmp_path.glob("c_samples_*"))
    assert len(cached) == 1
    mtime = (cached[0] / "index.npy").stat().st_mtime_ns
    second = PackedDataset(prefix, (0, 40), 20, options, seed=1)
    assert (cached[0] / "index.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.index, second.index)
    PackedDataset(prefix, (0, 40), 20, options, seed=2)  # another seed, another index
    assert len(list(tmp_path.glob("c_samples_*"))) == 2


def test_cached_sample_index_is_memory_mapped_with_the_same_samples(tmp_path):
    """Every rank maps the cached index instead of loading it whole; its samples are those of
    the index built in memory."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "m")
    write_dataset(prefix, make_docs([30, 70, 200, 15] * 10))
    options = SampleOptions(64, eod=EOD, reset_position_ids=True)
    PackedDataset(prefix, (0, 40), 20, options, seed=4)  # builds the cache
    cached = PackedDataset(prefix, (0, 40), 20, options, seed=4)  # maps it
    built = PackedDataset(None, (0, 40), 20, options, seed=4, indexed=IndexedDataset(prefix))
    for name in ("order", "index", "ordered_lengths"):
        mapped, fresh = getattr(cached, name), getattr(built, name)
        assert isinstance(mapped, np.memmap) and mapped.mode == "r", name
        assert not isinstance(fresh, np.memmap)
        np.testing.assert_array_equal(mapped, fresh)
    for i in range(20):
        a, b = cached[i], built[i]
        assert a["doc_starts"] == b["doc_starts"]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key], b[key]), (i, key)


def test_blend_proportions_within_2_percent(tmp_path):
    options = SampleOptions(32, eod=EOD)
    sources = []
    for name, n in (("a", 300), ("b", 200), ("c", 100)):
        prefix = str(tmp_path / name)
        write_dataset(prefix, make_docs([40] * n, start_token=2 + 1000 * len(sources)))
        sources.append(prefix)
    data_path = ["0.7", sources[0], "0.2", sources[1], "0.1", sources[2]]
    blend = build_blended_dataset(data_path, "1", 10_000, options, seed=0)
    assert isinstance(blend, BlendedDataset) and len(blend) == 10_000
    share = np.bincount(blend.dataset_index, minlength=3) / 10_000
    np.testing.assert_allclose(share, [0.7, 0.2, 0.1], atol=0.02)
    # samples really come from their source (token ids are source-specific)
    for i in range(0, 10_000, 997):
        token = int(blend[i]["tokens"][0])
        if token != EOD:
            assert (token - 2) // 1000 == blend.dataset_index[i]


def test_length_upsampling_shifts_lengths_but_keeps_source_shares(tmp_path):
    rng = np.random.default_rng(0)
    options = SampleOptions(256, eod=EOD)
    prefixes = []
    for name in ("x", "y"):
        lengths = np.where(rng.random(2000) < 0.8, rng.integers(10, 100, 2000),
                           rng.integers(400, 2000, 2000))
        prefix = str(tmp_path / name)
        write_dataset(prefix, make_docs(lengths.tolist()))
        prefixes.append(prefix)
    path = ["0.6", prefixes[0], "0.4", prefixes[1]]
    plain = build_blended_dataset(path, "1", 2000, options, seed=0)
    upsampled = build_blended_dataset(path, "1", 2000, options, seed=0,
                                    length_upsample=["256:0.1"])

    def long_token_share(ds):
        # fraction of training tokens that sit in documents of >= 256 tokens
        total = long = 0
        for sub in ds.datasets:
            ordered = sub.ordered_lengths
            total += ordered.sum()
            long += ordered[ordered >= 256].sum()
        return long / total

    assert long_token_share(upsampled) > long_token_share(plain) + 0.1
    for ds in (plain, upsampled):
        share = np.bincount(ds.dataset_index, minlength=2) / len(ds)
        np.testing.assert_allclose(share, [0.6, 0.4], atol=0.01)
    # short documents are kept with probability 0.1 per epoch: few distinct ones ever appear
    sub = upsampled.datasets[0]
    short = (sub.lengths < 256).sum()
    seen_short = len(set(sub.order[sub.lengths[sub.order] < 256].tolist()))
    assert seen_short < 0.35 * short


def test_bad_upsample_specs():
    with pytest.raises(ValueError, match="THRESHOLD:KEEP_PROBABILITY"):
        parse_upsample(["4096"], 1)
    with pytest.raises(ValueError, match="1 or 2"):
        parse_upsample(["4096:0.1"] * 3, 2)
    assert parse_upsample(["4096:0.1", "none"], 2) == [(4096, 0.1), None]


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"nope.idx does not exist.*Preprocessing writes"):
        build_blended_dataset([str(tmp_path / "nope")], "1", 10, SampleOptions(8, eod=EOD), 0)
