"""Before training, each dataset is validated once (its check record kept beside the data):
token ids within the tokenizer's vocabulary, lengths consistent with pointers, and a .bin that
belongs with its .idx; the preprocessing writer records fresh datasets itself."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from pipeline_helpers import ROOT, load_tool, write_jsonl

from megatron_longctx.data.formats import dataset_check
from megatron_longctx.data.formats.dataset_check import (
    DatasetMismatchError,
    check_training_data,
    record_path,
    validated_dataset_info,
)
from megatron_longctx.data.formats.indexed_format import HEADER_BYTES
from megatron_longctx.data.formats.indexed_reader import IndexedDatasetError, check_indexed_dataset
from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter, merge_datasets
from megatron_longctx.data.preprocessing.shards import resolve_prefixes
from megatron_longctx.data.samples.long_context_dataset import open_indexed


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    """Each test starts with nothing validated in this process."""
    monkeypatch.setattr(dataset_check, "_validated", {})


@pytest.fixture
def scans(monkeypatch):
    """Counts the full scans (the expensive path)."""
    calls = []
    real = dataset_check.scan_dataset

    def counting(prefix):
        calls.append(prefix)
        return real(prefix)

    monkeypatch.setattr(dataset_check, "scan_dataset", counting)
    return calls


def ours(prefix, docs, dtype=np.uint16) -> str:
    """Written by our writer: it leaves a check record."""
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for doc in docs:
            writer.add_document(np.asarray(doc))
        writer.finalize()
    return str(prefix)


def megatrons(prefix, docs) -> str:
    """Written by megatron-core's builder (as Megatron-LM's preprocessing): no record."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.as_tensor(np.asarray(doc, dtype=np.int32)), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def docs_up_to(high: int, n: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, high, int(rng.integers(5, 40))) for _ in range(n)]
    docs[n // 2][0] = high - 1  # the largest id is there
    return docs


# -- (a) the vocabulary ---------------------------------------------------------------------------
@pytest.mark.parametrize("write", [ours, megatrons])
def test_ids_beyond_the_tokenizer_vocabulary_are_refused(tmp_path, write):
    prefix = write(tmp_path / "wide_text_document", docs_up_to(512))
    with pytest.raises(DatasetMismatchError) as err:
        check_training_data([prefix], vocab_size=400)
    message = str(err.value)
    assert prefix in message and "go up to 511" in message and "400 tokens" in message
    assert "--tokenizer-model" in message and "\n" not in message
    (check,) = check_training_data([prefix], vocab_size=512)  # the tokenizer that made it
    assert (check.min_token_id, check.max_token_id) == (0, 511)


# -- (b) an index whose lengths disagree with its pointers ----------------------------------------
@pytest.mark.parametrize("write", [ours, megatrons])
def test_index_whose_lengths_disagree_with_pointers_is_refused(tmp_path, write):
    prefix = write(tmp_path / "d", [[1, 2, 3], [4, 5, 6, 7, 8], [9]])
    with open(f"{prefix}.idx", "r+b") as f:  # swap two lengths: same total, so the .bin size
        f.seek(HEADER_BYTES)  # still agrees and the O(1) checks pass
        f.write(np.array([5, 3, 1], dtype=np.int32).tobytes())
    check_indexed_dataset(prefix, full=False)
    for attempt in (lambda: validated_dataset_info(prefix), lambda: open_indexed(prefix)):
        with pytest.raises(IndexedDatasetError, match=f"{prefix}.idx: sequence 1 starts at "
                                                      r"byte \d+ .* put it at \d+"):
            attempt()


# -- (c) a .bin/.idx pair mixed up ---------------------------------------------------------------
def twins(tmp_path):
    """Two datasets with .bin and .idx of equal sizes (3 documents, 12 tokens each)."""
    a = ours(tmp_path / "a_text_document", [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12]])
    b = ours(tmp_path / "b_text_document", [[20] * 4, [21] * 4, [22] * 4])
    for ext in ("bin", "idx"):
        assert os.path.getsize(f"{a}.{ext}") == os.path.getsize(f"{b}.{ext}")
    return a, b


def swap(a: str, b: str) -> None:
    os.replace(a, a + ".swap")
    os.replace(b, a)
    os.replace(a + ".swap", b)


@pytest.mark.parametrize("ext", ["bin", "idx"])
def test_swapped_files_of_equal_size_are_refused_naming_both(tmp_path, ext):
    a, b = twins(tmp_path)
    swap(f"{a}.{ext}", f"{b}.{ext}")
    check_indexed_dataset(a)  # every structural check passes: only the record can tell
    other = "idx" if ext == "bin" else "bin"
    for prefix, partner in ((a, b), (b, a)):
        with pytest.raises(DatasetMismatchError) as err:
            validated_dataset_info(prefix)
        message = str(err.value)
        assert f"{prefix}.{ext} does not belong with {prefix}.{other}" in message, message
        assert f"it is {partner}.{ext}" in message and "\n" not in message


def test_a_replaced_bin_without_a_known_owner_is_refused(tmp_path):
    a, b = twins(tmp_path)
    os.remove(record_path(b))
    swap(f"{a}.bin", f"{b}.bin")
    with pytest.raises(DatasetMismatchError, match=f"{a}.bin has been replaced since {a}.idx "
                                                   f"was written with it .* delete "):
        validated_dataset_info(a)


def test_renaming_whole_datasets_is_not_a_mix_up(tmp_path, scans):
    a, b = twins(tmp_path)
    for ext in ("bin", "idx"):
        swap(f"{a}.{ext}", f"{b}.{ext}")
    assert validated_dataset_info(a).max_token_id == 22  # b's data, validated again
    assert scans == [a]


# -- (d) the record is used, and invalidated ------------------------------------------------------
def test_the_scan_runs_once_and_again_when_the_files_change(tmp_path, scans, monkeypatch,
                                                           caplog):
    prefix = megatrons(tmp_path / "m", docs_up_to(300))
    caplog.set_level("INFO", logger="megatron_longctx")
    first = validated_dataset_info(prefix)
    assert scans == [prefix] and first.max_token_id == 299 and first.num_documents == 20
    assert first.record == record_path(prefix) and os.path.isfile(first.record)
    assert f"validating {prefix} (it has no check record yet)" in caplog.text
    assert f"validated {prefix} in " in caplog.text

    assert validated_dataset_info(prefix) == first and len(scans) == 1  # this process
    monkeypatch.setattr(dataset_check, "_validated", {})
    assert validated_dataset_info(prefix) == first and len(scans) == 1  # the record

    megatrons(prefix, docs_up_to(700, n=5))  # rebuilt: both files change
    monkeypatch.setattr(dataset_check, "_validated", {})
    again = validated_dataset_info(prefix)
    assert len(scans) == 2 and again.max_token_id == 699 and again.num_documents == 5
    assert "its check record is out of date" in caplog.text

    os.utime(f"{prefix}.bin", ns=(1, 1))  # touched or copied: same content, validated again
    monkeypatch.setattr(dataset_check, "_validated", {})
    assert validated_dataset_info(prefix) == again and len(scans) == 3


def test_the_record_goes_to_the_cache_dir_when_the_data_dir_cannot_hold_it(tmp_path, scans,
                                                                          monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    prefix = megatrons(data / "m", docs_up_to(50))
    (data / dataset_check.RECORD_DIR).write_text("")  # a file where the directory would go
    check = validated_dataset_info(prefix, cache_dir=str(cache))
    assert check.record == record_path(prefix, str(cache)) and os.path.isfile(check.record)
    monkeypatch.setattr(dataset_check, "_validated", {})
    assert validated_dataset_info(prefix, cache_dir=str(cache)) == check and len(scans) == 1


# -- (e) preprocessing writes the record ---------------------------------------------------------
def test_preprocessing_output_carries_its_record(tmp_path, scans):
    texts = ["plain ascii", "Grüße 🙂 — ünïcödé", "x" * 50]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    assert load_tool("preprocess_data").main(
        ["--input", corpus, "--output-prefix", str(tmp_path / "c"), "--tokenizer-type",
         "ByteTokenizer", "--append-eod", "--no-progress"]) == 0
    prefix = str(tmp_path / "c_text_document")
    tokens = np.fromfile(f"{prefix}.bin", dtype=check_indexed_dataset(prefix).dtype)
    check = validated_dataset_info(prefix)
    assert scans == [] and check.record == record_path(prefix)
    assert (check.min_token_id, check.max_token_id) == (int(tokens.min()), int(tokens.max()))
    assert check.num_tokens == tokens.size and check.num_documents == len(texts)

    other = ours(tmp_path / "o", [[1, 900]])
    merge_datasets([prefix, other], str(tmp_path / "merged"))
    merged = validated_dataset_info(str(tmp_path / "merged"))
    assert scans == [] and (merged.min_token_id, merged.max_token_id) == (1, 900)


def test_records_are_not_datasets_to_shard_globs_or_megatron_lm_merge(tmp_path):
    a, b = twins(tmp_path)
    assert resolve_prefixes([str(tmp_path)]) == [a, b]
    assert resolve_prefixes([str(tmp_path / "*_text_document")]) == [a, b]
    # Megatron-LM's tools/merge_datasets.py asserts every *file* of a directory is half of a
    # .bin/.idx pair; it skips directories
    files = [f for f in os.listdir(tmp_path) if os.path.isfile(tmp_path / f)]
    assert sorted(files) == sorted(f"{p}.{e}" for p in ("a_text_document", "b_text_document")
                                   for e in ("bin", "idx"))


# -- the training entry -------------------------------------------------------------------------
def test_training_refuses_data_beyond_the_tokenizer_before_any_work(tmp_path,
                                                                   single_process_group):
    """In-process (rank 0 checks and broadcasts the error) and through the real CLI."""
    from megatron_longctx.config import RunConfig
    from megatron_longctx.training.run import build_datasets

    prefix = ours(tmp_path / "wide_text_document", docs_up_to(512, n=200))
    cfg = RunConfig()
    cfg.data.data_path, cfg.data.tokenizer_type, cfg.data.vocab_size = [prefix], \
        "NullTokenizer", 399  # ids 0..399: 400 tokens
    with pytest.raises(DatasetMismatchError, match="go up to 511 but the tokenizer has 400"):
        build_datasets(cfg)
    assert not list(tmp_path.glob("*_samples_*"))  # refused before any sample index

    save = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), "--data-path", prefix,
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "399", "--train-iters", "2",
         "--save", str(save)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert last.startswith(f"error: {prefix}: token ids go up to 511"), last
    assert not save.exists() and '"parameters_this_rank"' not in proc.stderr
