"""tools/preprocess_data.py end to end: round trip against the tokenizer libraries, Megatron
naming, input formats, bad records, workers, interrupted runs; merge and inspect tools."""

import gzip
import os
import re
import signal
import subprocess

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from pipeline_helpers import (
    PYTHON,
    ROOT,
    load_tool,
    read_jsonl_texts,
    run_tool,
    wait_until_writing,
    write_jsonl,
)
from test_jsonl_reader import BAD_LINES, write_bad_file

from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl
from megatron_longctx.data.formats.indexed_reader import IndexedDatasetError, check_indexed_dataset
from megatron_longctx.data.formats.indexed_writer import temp_files


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def dataset_bytes(prefix) -> tuple[bytes, bytes]:
    return read_file(f"{prefix}.bin"), read_file(f"{prefix}.idx")


def assert_round_trip(prefix: str, texts: list[str], encode, eod: int | None) -> None:
    """Document i of the dataset == the tokenizer library applied to text i (+ EOD)."""
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        expected = encode(text) + ([eod] if eod is not None else [])
        assert dataset[i].tolist() == expected, f"document {i} differs"


def test_sentencepiece_round_trip(tmp_path, preprocess, corpus_jsonl, corpus_texts, sp_model,
                                  capsys):
    out = tmp_path / "sp"
    assert preprocess("--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                      "--append-eod") == 0
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    prefix = f"{out}_text_document"
    assert_round_trip(prefix, corpus_texts, ref.encode, ref.eos_id())
    assert IndexedDataset(prefix).index.dtype == np.uint16  # vocab 400 < 65500
    assert sorted(os.listdir(tmp_path)) == [".dataset_check", "sp_text_document.bin",
                                            "sp_text_document.idx"]  # + the check record
    summary = capsys.readouterr().out
    lengths = [len(ref.encode(t)) + 1 for t in corpus_texts]
    assert f"documents: {len(corpus_texts):,}" in summary
    assert f"tokens: {sum(lengths):,}" in summary
    assert "document length histogram (tokens):" in summary
    bucket = sum(1 for n in lengths if 1024 <= n < 2048)
    assert any(line.startswith("  [    1k,     2k)") and f" {bucket:,} " in line
               for line in summary.splitlines())
    assert "documents >=  32k tokens: 0" in summary and "skipped records: 0" in summary


def test_huggingface_round_trip(tmp_path, preprocess, corpus_jsonl, corpus_texts,
                                hf_tokenizer_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    out = tmp_path / "hf"
    assert preprocess("--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir,
                      "--append-eod") == 0
    assert_round_trip(f"{out}_text_document", corpus_texts,
                      lambda t: ref.encode(t, add_special_tokens=False), ref.eos_token_id)
    # without --append-eod documents are the bare token ids
    assert preprocess("--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model",
                      f"{hf_tokenizer_dir}/tokenizer.json") == 0
    assert_round_trip(f"{out}_text_document", corpus_texts,
                      lambda t: ref.encode(t, add_special_tokens=False), None)


def test_one_dataset_per_json_key(tmp_path, preprocess):
    path = write_jsonl(tmp_path / "k.jsonl", [{"text": "abc", "title": "T1"},
                                              {"text": "de", "title": "T2"}])
    assert preprocess("--input", path, "--output-prefix", tmp_path / "o", "--json-keys",
                      "text", "title", "--tokenizer-type", "ByteTokenizer") == 0
    # keep the datasets referenced: megatron-core unmaps the file when one is collected
    text, title = (IndexedDataset(str(tmp_path / f"o_{key}_document")) for key in ("text",
                                                                                   "title"))
    assert text[1].tolist() == list(b"de") and title[1].tolist() == list(b"T2")


def test_compressed_and_parquet_inputs_give_identical_datasets(tmp_path, preprocess,
                                                               corpus_jsonl, corpus_texts,
                                                               sp_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    raw = read_file(corpus_jsonl)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": corpus_texts}), tmp_path / "c.parquet", row_group_size=7)
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
              "--append-eod", "--chunk-mb", "0.05"]
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "ref", *common) == 0
    reference = dataset_bytes(tmp_path / "ref_text_document")
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        out = tmp_path / name.replace(".", "_")
        assert preprocess("--input", tmp_path / name, "--output-prefix", out, *common) == 0
        assert dataset_bytes(f"{out}_text_document") == reference, name


def test_workers_do_not_change_the_output(tmp_path, corpus_jsonl, corpus_texts, sp_model):
    """Small chunks so the two workers interleave many of them; imap keeps input order."""
    second = write_jsonl(tmp_path / "reversed.jsonl", [{"text": t} for t in corpus_texts[::-1]])
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_tool("preprocess_data", "--input", corpus_jsonl, "--input", second,
                 "--output-prefix", str(out), "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", sp_model, "--append-eod", "--workers", str(workers),
                 "--chunk-mb", "0.02")
        outputs.append(dataset_bytes(f"{out}_text_document"))
    assert outputs[0] == outputs[1]
    assert check_indexed_dataset(f"{out}_text_document").num_documents == 2 * len(corpus_texts)


def test_bad_records_are_skipped_and_reported(tmp_path, preprocess, capsys):
    path = write_bad_file(tmp_path / "bad.jsonl")
    assert preprocess("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                      "ByteTokenizer", "--append-eod") == 0
    dataset = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        list(b"ok 1") + [257], list("ok 2 \u00e9\u65e5".encode()) + [257]]
    captured = capsys.readouterr()
    out = captured.out
    # the first few skips per reason are reported on stderr while the run goes
    assert f"skipped {path}:2: invalid JSON" in captured.err
    counts = {}
    for _, reason in BAD_LINES:
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    assert "skipped records: 10" in out
    assert re.search(rf"\n  invalid JSON +{counts['invalid_json']}\n", out)
    assert re.search(rf"\n  missing key +{counts['missing_key']}\n", out)
    assert f"e.g. {path}:8: line is not valid UTF-8" in out
    assert f"e.g. {path}:10: key 'text' is empty or whitespace-only" in out


def test_strict_stops_with_a_clear_message_and_leaves_nothing(tmp_path, preprocess, capsys):
    path = write_bad_file(tmp_path / "bad.jsonl")
    assert preprocess("--input", path, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                      "ByteTokenizer", "--strict") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: invalid JSON: Unterminated string")
    assert "run without --strict to skip bad records" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


@pytest.mark.parametrize("args, match", [
    (["--input", "{d}/none.jsonl"], "--input {d}/none.jsonl does not exist."),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{d}/x.model"],
     "--tokenizer-model {d}/x.model does not exist"),
    (["--output-prefix", "{d}/ok.jsonl/out"], "is a file, not a directory"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--json-keys", "text", "text"], "--json-keys must name distinct keys"),
])
def test_arguments_are_validated_before_any_work(tmp_path, preprocess, capsys, args, match):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    base = {"--input": ok, "--output-prefix": str(tmp_path / "o"),
            "--tokenizer-type": "ByteTokenizer"}
    flags = [a.format(d=tmp_path) for a in args]
    for flag, value in base.items():
        if flag not in flags:
            flags += [flag, value]
    assert preprocess(*flags) == 1
    assert capsys.readouterr().err.strip().startswith("error: ")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o_")]


def test_killed_run_leaves_nothing_loadable_and_rerun_succeeds(tmp_path, sp_model):
    corpus = str(tmp_path / "big.jsonl")
    write_stdlib_jsonl(corpus, max_docs=250)  # ~7 MB: seconds of tokenizing
    prefix = str(tmp_path / "out_text_document")
    cmd = [PYTHON, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
           "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
           "--workers", "2", "--chunk-mb", "0.25", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until_writing(proc, prefix)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: workers must not hang on
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover workers, if any
        except ProcessLookupError:
            pass
    assert temp_files(prefix), "no temporary files: the run was not killed midway"
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert not IndexedDataset.exists(prefix)
    with pytest.raises(IndexedDatasetError, match="was interrupted. Wait for it, or rerun it"):
        check_indexed_dataset(prefix)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert temp_files(prefix) == []
    assert len(IndexedDataset(prefix)) == len(read_jsonl_texts(corpus))
    check_indexed_dataset(prefix)


def test_merge_tool_equals_megatron_and_a_single_run(tmp_path, preprocess, corpus_texts,
                                                     sp_model, capsys):
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
              "--append-eod"]
    parts = [corpus_texts[:20], corpus_texts[20:]]
    paths = [write_jsonl(tmp_path / f"p{i}.jsonl", [{"text": t} for t in part])
             for i, part in enumerate(parts)]
    for i, path in enumerate(paths):
        assert preprocess("--input", path, "--output-prefix", tmp_path / f"p{i}", *common) == 0
    assert preprocess("--input", paths[0], "--input", paths[1], "--output-prefix",
                      tmp_path / "both", *common) == 0
    prefixes = [str(tmp_path / f"p{i}_text_document") for i in range(2)]
    assert load_tool("merge_datasets").main(["--input", *prefixes, "--output-prefix",
                                             str(tmp_path / "merged")]) == 0
    assert f"{len(corpus_texts):,} documents" in capsys.readouterr().out
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    merged = dataset_bytes(tmp_path / "merged")
    assert merged == dataset_bytes(tmp_path / "ref")
    assert merged == dataset_bytes(tmp_path / "both_text_document")
    os.remove(prefixes[1] + ".bin")
    assert load_tool("merge_datasets").main(["--input", *prefixes, "--output-prefix",
                                             str(tmp_path / "m2")]) == 1
    assert "p1_text_document.bin does not exist" in capsys.readouterr().err


def test_inspect_tool(tmp_path, preprocess, corpus_jsonl, corpus_texts, sp_model, capsys):
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "o",
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      sp_model, "--append-eod") == 0
    capsys.readouterr()
    inspect = load_tool("inspect_dataset").main
    prefix = str(tmp_path / "o_text_document")
    assert inspect(["--path-prefix", prefix]) == 0
    out = capsys.readouterr().out
    assert "dtype: uint16" in out and f"documents: {len(corpus_texts):,}" in out
    assert "documents >= 128k tokens: 0 (0.00%)" in out
    n = len(corpus_texts) - 3  # the non-ASCII document
    assert inspect(["--path-prefix", prefix, "--document", str(n), "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", sp_model]) == 0
    assert capsys.readouterr().out == corpus_texts[n] + "\n"  # EOD decodes to nothing
    assert inspect(["--path-prefix", prefix, "--document", "9999", "--ids"]) == 1
    assert "document 9999 out of range" in capsys.readouterr().err
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(50)
    assert inspect(["--path-prefix", prefix]) == 1
    assert f"error: {prefix}.idx is 50 bytes but its header announces" in capsys.readouterr().err
