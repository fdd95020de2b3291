"""The streaming writer is byte-identical to megatron-core's builder, readable by its
IndexedDataset, flat in memory, atomic; check_indexed_dataset names what is wrong."""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_longctx.data.formats.indexed_reader import IndexedDatasetError, check_indexed_dataset
from megatron_longctx.data.formats.indexed_writer import (
    IndexedDatasetWriter,
    OutputInUseError,
    merge_datasets,
    optimal_dtype,
    temp_files,
)


def random_docs(seed: int, count: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 50, size=count)
    lengths[3] = 0  # an empty document
    return [rng.integers(0, vocab, size=n) for n in lengths]


def write_megatron(prefix: str, docs, dtype) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


def read_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


@pytest.mark.parametrize("vocab", [1000, 100_000])  # uint16 and int32 on disk
@pytest.mark.parametrize("batched", [False, True])
def test_byte_identical_to_megatron_builder(tmp_path, vocab, batched):
    dtype = optimal_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    docs = random_docs(0, 300, vocab)
    write_megatron(str(tmp_path / "ref"), docs, dtype.type)
    # tiny blocks: index entries go through the temp files and the pointer blocks many times
    with IndexedDatasetWriter(str(tmp_path / "ours"), dtype, block_entries=7) as writer:
        if batched:
            for start in range(0, len(docs), 64):
                part = docs[start:start + 64]
                writer.add_documents(np.concatenate(part).astype(np.int64),
                                     np.array([len(d) for d in part]))
        else:
            for doc in docs:
                writer.add_document(doc)
        writer.finalize()
    assert read_bytes(str(tmp_path / "ours")) == read_bytes(str(tmp_path / "ref"))
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == len(docs)
    for doc, read in zip(docs, (dataset[i] for i in range(len(docs)))):
        assert read.dtype == dtype and np.array_equal(read, doc)
    info = check_indexed_dataset(str(tmp_path / "ours"))
    assert (info.num_documents, info.num_tokens) == (len(docs), sum(len(d) for d in docs))
    assert np.array_equal(info.read_document(5), docs[5])


def test_multi_sequence_documents_match_megatron(tmp_path):
    docs = [(np.arange(10), [3, 7]), (np.arange(5), [5]), (np.arange(4), [1, 1, 2])]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16, block_entries=2) as writer:
        for tokens, lengths in docs:
            builder.add_document(torch.tensor(tokens), lengths)
            writer.add_document(tokens, lengths)
        writer.finalize()
    builder.finalize(str(tmp_path / "ref.idx"))
    assert read_bytes(str(tmp_path / "ours")) == read_bytes(str(tmp_path / "ref"))
    info = check_indexed_dataset(str(tmp_path / "ours"))
    assert [b.tolist() for b in info.iter_document_lengths(block=2)] == [[10, 5], [4]]
    assert info.read_document(2).tolist() == [0, 1, 2, 3]


def test_merge_matches_megatron_add_index(tmp_path):
    parts = []
    for seed in range(3):
        prefix = str(tmp_path / f"part{seed}")
        write_megatron(prefix, random_docs(seed, 50 + seed, 500), np.uint16)
        parts.append(prefix)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in parts:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    merge_datasets(parts, str(tmp_path / "merged"))
    assert read_bytes(str(tmp_path / "merged")) == read_bytes(str(tmp_path / "ref"))


def test_merge_refuses_mixed_dtypes(tmp_path):
    write_megatron(str(tmp_path / "small"), random_docs(0, 10, 500), np.uint16)
    write_megatron(str(tmp_path / "big"), random_docs(0, 10, 500), np.int32)
    with pytest.raises(ValueError, match=r"different token dtypes: .*small \(uint16\), .*big "
                                         r"\(int32\)"):
        merge_datasets([str(tmp_path / "small"), str(tmp_path / "big")], str(tmp_path / "m"))


def _peak_bytes(prefix: str, batches: int) -> int:
    tokens = np.ones(3 * 1000, dtype=np.uint16)
    lengths = np.full(1000, 3, dtype=np.int32)
    tracemalloc.start()
    with IndexedDatasetWriter(prefix, np.uint16, block_entries=4096) as writer:
        for _ in range(batches):
            writer.add_documents(tokens, lengths)
        writer.finalize()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_index_memory_does_not_grow_with_documents(tmp_path):
    """megatron-core's builder holds Python lists of every length (~100 bytes per document
    here: 120 MB at 1.2M documents); ours holds one block of numpy arrays and a 1 MiB copy
    buffer."""
    # tracemalloc sees every thread's allocations: the least of two runs leaves out those of
    # threads earlier tests left behind (seen: +87 kB in one run of the whole suite)
    small = min(_peak_bytes(str(tmp_path / "small"), 300) for _ in range(2))
    large = min(_peak_bytes(str(tmp_path / "large"), 1200) for _ in range(2))
    assert large < small + 64 * 1024 and large < 3 * 2**20, (small, large)
    assert check_indexed_dataset(str(tmp_path / "large")).num_documents == 1_200_000


def test_nothing_published_until_finalize(tmp_path):
    prefix = str(tmp_path / "ds")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([1, 2, 3])
    assert not IndexedDataset.exists(prefix) and temp_files(prefix)
    with pytest.raises(IndexedDatasetError, match="temporary files of a run writing"):
        check_indexed_dataset(prefix)
    writer.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):  # an exception inside the block aborts
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_an_existing_dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    for docs in ([[1, 2]], [[3], [4, 5, 6]]):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
            writer.finalize()
    info = check_indexed_dataset(prefix)
    assert info.num_documents == 2 and info.read_document(1).tolist() == [4, 5, 6]
    assert sorted(os.listdir(tmp_path)) == [".dataset_check", "ds.bin", "ds.idx"]  # + record


def test_stale_temp_files_are_removed_and_live_ones_refused(tmp_path):
    prefix = str(tmp_path / "ds")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = os.uname().nodename
    stale = f"{prefix}.bin.tmp-{host}-{dead}"
    open(stale, "wb").write(b"junk")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        assert not os.path.exists(stale)
        writer.abort()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = f"{prefix}.idx.tmp-{host}-{sleeper.pid}"
        open(live, "wb").close()
        with pytest.raises(OutputInUseError, match=f"process {sleeper.pid} is writing the same"):
            IndexedDatasetWriter(prefix, np.uint16)
        assert os.path.exists(live)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_token_ids_must_fit_the_dtype(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16) as writer:
        with pytest.raises(ValueError, match="do not fit the dataset dtype uint16"):
            writer.add_document(np.array([70000]))


# -- check_indexed_dataset on broken datasets -------------------------------------------------

@pytest.fixture
def good(tmp_path) -> str:
    prefix = str(tmp_path / "good")
    write_megatron(prefix, random_docs(1, 20, 500), np.uint16)
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, match", [
    (lambda p: os.remove(p + ".idx"), r"good\.idx does not exist although .*good\.bin does"),
    (lambda p: os.remove(p + ".bin"), r"good\.bin does not exist although .*good\.idx does"),
    (lambda p: _truncate(p + ".idx", 20), r"good\.idx is 20 bytes, shorter than the 34-byte"),
    (lambda p: _truncate(p + ".idx", 100), r"good\.idx is 100 bytes but its header announces 20"
                                           r" sequences"),
    (lambda p: _patch(p + ".idx", 0, b"NOTANIDX!"), r"good\.idx does not start with"),
    (lambda p: _patch(p + ".idx", 9, (2).to_bytes(8, "little")), r"index version 2"),
    (lambda p: _patch(p + ".idx", 17, bytes([42])), r"dtype code 42"),
    (lambda p: _truncate(p + ".bin", 10), r"good\.bin is 10 bytes but .*: the \.bin is "
                                          r"truncated"),
    (lambda p: _patch(p + ".idx", 34 + 4 * 20 + 8 * 5, (1).to_bytes(8, "little")),
     r"good\.idx: sequence 5 starts at byte 1 of the \.bin"),
    (lambda p: _patch(p + ".idx", 34 + 12 * 20 + 8 * 20, (7).to_bytes(8, "little")),
     r"good\.idx: document indices run from 0 to 7"),
])
def test_corrupt_datasets_are_named(good, damage, match):
    damage(good)
    with pytest.raises(IndexedDatasetError, match=match) as info:
        check_indexed_dataset(good)
    assert "regenerate" in str(info.value)


def test_missing_dataset_and_extension_hints(good, tmp_path):
    with pytest.raises(IndexedDatasetError, match="no indexed dataset at prefix"):
        check_indexed_dataset(str(tmp_path / "other"))
    with pytest.raises(IndexedDatasetError, match="without .bin/.idx"):
        check_indexed_dataset(good + ".idx")
    with pytest.raises(IndexedDatasetError, match="Prefixes found nearby: .*good"):
        check_indexed_dataset(str(tmp_path / "goo"))


def test_bin_from_another_run_is_caught(good, tmp_path):
    other = str(tmp_path / "other")
    write_megatron(other, random_docs(2, 20, 500), np.uint16)
    os.replace(other + ".bin", good + ".bin")
    with pytest.raises(IndexedDatasetError, match="come from different runs"):
        check_indexed_dataset(good)
