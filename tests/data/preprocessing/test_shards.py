"""Sharded preprocessing: N shards merged are byte-identical to one process (and to
megatron-core's builder over the same documents), a killed shard leaves nothing visible and is
redone by a rerun that skips finished shards, incomplete shard sets are refused by the merge,
--partitions gives the same output, and the Slurm array defaults."""

import gzip
import json
import os
import signal
import subprocess

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from pipeline_helpers import PYTHON, ROOT, load_tool, wait_until_writing, write_jsonl

from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl
from megatron_longctx.data.formats.indexed_writer import temp_files
from megatron_longctx.data.preprocessing.input_files import expand_inputs
from megatron_longctx.data.preprocessing.jsonl_reader import iter_chunks, parse_chunk
from megatron_longctx.data.preprocessing.shards import resolve_shard, split_inputs, summary_path

TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def tools():
    pre, merge = load_tool("preprocess_data"), load_tool("merge_datasets")
    return (lambda *a: pre.main([*map(str, a), "--no-progress"]),
            lambda *a: merge.main(list(map(str, a))))


def dataset_bytes(prefix) -> bytes:
    return b"".join(open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx"))


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, corpus_texts):
    """A plain file big enough to be cut by byte range, a gzip file and a Parquet file of
    several row groups (ByteTokenizer: tokenizing costs nothing, the split is under test)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("shard_inputs")
    write_jsonl(d / "a.jsonl", [{"text": t} for t in corpus_texts])
    (d / "b.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t[::-1]}) + "\n" for t in corpus_texts[:9]).encode()))
    pq.write_table(pa.table({"text": corpus_texts[5:30]}), d / "c.parquet", row_group_size=4)
    return [str(d / "a.jsonl"), str(d / "b.jsonl.gz"), str(d / "c.parquet")]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_merged_shards_equal_one_process(tmp_path, tools, mixed_inputs, num_shards, capsys):
    preprocess, merge = tools
    inputs = [x for path in mixed_inputs for x in ("--input", path)]
    common = [*inputs, "--tokenizer-type", "ByteTokenizer", "--append-eod", "--chunk-mb", "0.02"]
    assert preprocess(*common, "--output-prefix", tmp_path / "one") == 0
    for i in range(num_shards):
        assert preprocess(*common, "--output-prefix", tmp_path / "sh", "--num-shards",
                          num_shards, "--shard-index", i) == 0
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("sh_shard")
                    and f.endswith(".idx"))
    if num_shards in (2, 3):  # a.jsonl is cut by byte range: every shard holds documents
        assert len(shards) == num_shards
    assert merge("--input", f"{tmp_path}/sh_shard*_text_document", "--output-prefix",
                 tmp_path / "merged") == 0
    assert dataset_bytes(tmp_path / "merged") == dataset_bytes(tmp_path / "one_text_document")
    # the unmerged shards inspect as one dataset
    capsys.readouterr()
    assert load_tool("inspect_dataset").main(["--path-prefix",
                                              f"{tmp_path}/sh_shard*_text_document"]) == 0
    stats = capsys.readouterr().out
    merged = IndexedDataset(str(tmp_path / "merged"))
    assert f"documents: {len(merged):,}\n" in stats
    assert f"tokens: {int(merged.sequence_lengths.sum()):,} (mean" in stats
    summary = json.load(open(summary_path(str(tmp_path / "sh"), num_shards - 1)))
    assert summary["num_shards"] == num_shards and summary["skipped"]["empty"] == 0
    assert set(summary) >= {"documents", "tokens", "input_bytes", "skipped", "seconds", "inputs"}


def test_split_reads_every_line_once_and_reference_builder_agrees(tmp_path, corpus_texts):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus_texts])
    files = expand_inputs([path])
    for parts in (2, 5, 64):  # 64 > lines: most parts hold no line start
        texts = []
        for part in split_inputs(files, parts):
            for chunk in iter_chunks(part, ["text"], 1000):
                texts += parse_chunk(chunk, ["text"]).texts[0]
        assert texts == corpus_texts, parts
    # the merge equals megatron-core's IndexedDatasetBuilder on the same documents
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for t in corpus_texts:
        builder.add_document(list(t.encode()) + [257], [len(t.encode()) + 1])
    builder.finalize(str(tmp_path / "ref.idx"))
    pre, merge = load_tool("preprocess_data").main, load_tool("merge_datasets").main
    for i in range(3):
        assert pre(["--input", path, "--tokenizer-type", "ByteTokenizer", "--append-eod",
                    "--output-prefix", str(tmp_path / "shards" / "s"), "--num-shards", "3",
                    "--shard-index", str(i), "--no-progress"]) == 0
    # a directory, as Megatron-LM's merge tool takes it: its datasets in sorted order
    assert merge(["--input", str(tmp_path / "shards"), "--output-prefix",
                  str(tmp_path / "m")]) == 0
    assert dataset_bytes(tmp_path / "m") == dataset_bytes(tmp_path / "ref")


def test_merge_refuses_an_incomplete_or_mixed_shard_set(tmp_path, tools, capsys):
    preprocess, merge = tools
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    common = ["--input", path, "--tokenizer-type", "ByteTokenizer", "--output-prefix",
              tmp_path / "s", "--num-shards", "3"]
    for i in (0, 2):
        assert preprocess(*common, "--shard-index", i) == 0
    capsys.readouterr()
    assert merge("--input", f"{tmp_path}/s_shard*_text_document", "--output-prefix",
                 tmp_path / "m") == 1
    assert f"shard(s) 1 of 3 of {tmp_path}/s have not finished" in capsys.readouterr().err
    assert preprocess(*common, "--shard-index", 1, "--append-eod") == 0  # other settings
    assert merge("--input", f"{tmp_path}/s_shard*_text_document", "--output-prefix",
                 tmp_path / "m") == 1
    assert "come from different runs" in capsys.readouterr().err
    assert preprocess(*common, "--shard-index", 1) == 0  # redone with the run's settings
    assert "redoing it" in capsys.readouterr().err
    assert merge("--input", f"{tmp_path}/s_shard00000_text_document",
                 f"{tmp_path}/s_shard00002_text_document", "--output-prefix", tmp_path / "m") == 1
    assert "s_shard00001_text_document (shard 1 of 3) is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.idx")


def test_killed_shard_leaves_nothing_and_rerun_finishes_it(tmp_path, tools, sp_model, capsys):
    preprocess, merge = tools
    corpus = str(tmp_path / "big.jsonl")
    write_stdlib_jsonl(corpus, max_docs=120)
    common = ["--input", corpus, "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", sp_model, "--append-eod", "--output-prefix",
              str(tmp_path / "s"), "--num-shards", "2", "--chunk-mb", "0.1"]
    assert preprocess(*common, "--shard-index", 0) == 0
    proc = subprocess.Popen([PYTHON, TOOL, *common, "--shard-index", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prefix = str(tmp_path / "s_shard00001_text_document")
    try:
        wait_until_writing(proc, prefix)
        assert proc.poll() is None, "shard 1 finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not IndexedDataset.exists(prefix) and not os.path.exists(prefix + ".bin")
    assert not os.path.exists(summary_path(str(tmp_path / "s"), 1))
    capsys.readouterr()
    for i in (0, 1):  # the rerun of the whole array: shard 0 is skipped, shard 1 redone
        assert preprocess(*common, "--shard-index", i) == 0
    assert "shard 0 of 2 already finished" in capsys.readouterr().err
    assert temp_files(prefix) == []
    assert preprocess(*common[:-4], "--output-prefix", tmp_path / "one") == 0
    assert merge("--input", f"{tmp_path}/s_shard*_text_document", "--output-prefix",
                 tmp_path / "merged") == 0
    assert dataset_bytes(tmp_path / "merged") == dataset_bytes(tmp_path / "one_text_document")


def test_partitions_give_the_output_of_one_process(tmp_path, mixed_inputs):
    inputs = [x for path in mixed_inputs for x in ("--input", path)]
    for name, extra in (("one", []), ("parts", ["--partitions", "2", "--workers", "2",
                                                "--keep-sequential-samples"])):
        proc = subprocess.run([PYTHON, TOOL, *inputs, "--tokenizer-type", "ByteTokenizer",
                               "--append-eod", "--output-prefix", str(tmp_path / name),
                               "--no-progress", *extra], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert dataset_bytes(tmp_path / "parts_text_document") == \
        dataset_bytes(tmp_path / "one_text_document")
    assert sorted(os.listdir(tmp_path)) == sorted(  # the check records are in .dataset_check
        [".dataset_check"] + [f"{n}_text_document.{e}" for n in ("one", "parts")
                              for e in ("bin", "idx")])


@pytest.mark.parametrize("env, flags, expected", [
    ({}, (None, None), None),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"},
     (None, None), (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"},
     (8, 1), (1, 8)),  # flags win
    ({}, (3, 0), (0, 3)),
])
def test_shard_from_flags_or_slurm_array(env, flags, expected):
    assert resolve_shard(*flags, env=env) == expected
