"""Reading JSONL/gz/zst/Parquet in chunks: same documents whatever the format or chunk size,
right line numbers, every bad-record class skipped and counted, or stopped at in strict mode."""

import gzip
import json

import pytest
from pipeline_helpers import write_jsonl

from megatron_longctx.data.preprocessing.jsonl_reader import (
    DocumentReader,
    InputError,
    SkipCounter,
    expand_inputs,
    iter_chunks,
    iter_records,
)

# one line per bad-input class, each with the reason it must be counted under
BAD_LINES = [
    (b'{"text": "ok 1"}', None),
    (b'{"text": "unterminated', "invalid_json"),
    (b'["text", "not an object"]', "invalid_json"),
    (b'{"content": "wrong key"}', "missing_key"),
    (b'{"text": 42}', "non_string"),
    (b'{"text": ["a", "list"]}', "non_string"),
    (b'{"text": null}', "non_string"),
    (b'{"text": "caf\xe9 latin-1"}', "undecodable"),
    (b'{"text": "lone \\ud800 surrogate"}', "undecodable"),
    (b'{"text": "   \\n\\t"}', "empty"),
    (b"", "empty"),
    (b'{"text": "ok 2 \\u00e9\\u65e5"}', None),
]


def write_bad_file(path) -> str:
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return str(path)


def test_each_bad_class_is_skipped_counted_and_located(tmp_path):
    path = write_bad_file(tmp_path / "bad.jsonl")
    reader = DocumentReader([path])
    assert [t[0] for t in reader] == ["ok 1", "ok 2 \u00e9\u65e5"]
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in reader.counter.counts.items() if v} == expected
    examples = reader.counter.examples
    assert examples["invalid_json"][0].startswith(f"{path}:2: invalid JSON")
    assert examples["invalid_json"][1] == (f"{path}:3: expected a JSON object like "
                                           f'{{"text": "..."}}, got a JSON array')
    assert examples["missing_key"] == [f"{path}:4: no key 'text' (keys present: 'content'); "
                                       f"choose the text key with --json-keys"]
    assert "holds a number, expected a string" in examples["non_string"][0]
    assert "are not supported: join them" in examples["non_string"][1]
    assert examples["non_string"][2].endswith(":7: key 'text' is null, expected a string")
    assert examples["undecodable"][0] == (f"{path}:8: line is not valid UTF-8 (byte 0xe9 at "
                                          f"column 14); re-encode the file as UTF-8")
    assert "lone surrogate (\\ud800" in examples["undecodable"][1]
    assert examples["empty"] == [f"{path}:10: key 'text' is empty or whitespace-only",
                                 f"{path}:11: blank line"]
    report = reader.counter.format()
    assert "skipped records: 10" in report and f"e.g. {path}:4: no key" in report


@pytest.mark.parametrize("line_no", [i + 1 for i, (_, r) in enumerate(BAD_LINES)
                                     if r and r != "empty"])
def test_strict_stops_at_first_malformed_record(tmp_path, line_no):
    lines = [BAD_LINES[0][0], BAD_LINES[line_no - 1][0], BAD_LINES[1][0]]
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError, match=rf"^{path}:2: .*--strict stops at the first bad "
                                         rf"record; fix the input, or run without --strict"):
        list(DocumentReader([str(path)], strict=True))


def test_strict_still_skips_empty_documents(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": " "}, {"text": "b"}])
    reader = DocumentReader([path], strict=True)
    assert [t[0] for t in reader] == ["a", "b"] and reader.counter.counts["empty"] == 1


def test_multiple_keys_keep_records_aligned(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{"a": "1", "b": "x"}, {"a": "2"},
                                              {"a": "3", "b": "z"}])
    reader = DocumentReader([path], keys=["a", "b"])
    assert list(reader) == [["1", "x"], ["3", "z"]]
    assert reader.counter.counts["missing_key"] == 1


def _records(paths, chunk_bytes=1 << 20, keys=("text",)):
    files = expand_inputs(paths)
    counter = SkipCounter(files)
    return [r[0] for r in iter_records(files, list(keys), counter, chunk_bytes)], counter


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 1 << 20])
def test_chunk_size_does_not_change_records_or_line_numbers(tmp_path, corpus_texts,
                                                            chunk_bytes):
    texts = corpus_texts[:5] + ["short"] * 3
    path = tmp_path / "c.jsonl"
    # no trailing newline on the last line, and a bad line to locate
    body = "\n".join([json.dumps({"text": t}) for t in texts] + ["{bad", '{"text": "end"}'])
    path.write_text(body)
    records, counter = _records([str(path)], chunk_bytes)
    assert records == texts + ["end"]
    assert counter.examples["invalid_json"][0].startswith(f"{path}:9: ")
    chunks = list(iter_chunks(expand_inputs([str(path)]), ["text"], chunk_bytes))
    assert sum(c.num_lines for c in chunks) == 10
    assert [c.first_line for c in chunks] == [1] + [
        sum(c.num_lines for c in chunks[:i]) + 1 for i in range(1, len(chunks))]


def test_compressed_and_parquet_inputs_give_the_same_documents(tmp_path, corpus_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = corpus_texts[:12]
    plain = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    raw = open(plain, "rb").read()
    with gzip.open(tmp_path / "p.jsonl.gz", "wb") as f:
        f.write(raw)
    # two zstd frames: readers must continue across frames
    half = len(raw) // 2
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "p.jsonl.zst").write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}),
                   tmp_path / "p.parquet", row_group_size=5)
    for name in ("p.jsonl.gz", "p.jsonl.zst", "p.parquet"):
        records, counter = _records([str(tmp_path / name)], chunk_bytes=2000)
        assert records == texts, name
        assert counter.total == 0
    records, _ = _records([str(tmp_path / "p.*")])  # glob over all four, sorted
    assert records == texts * 4


def test_parquet_nulls_and_non_strings_are_counted_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None, " ", "d"]}), path)
    records, counter = _records([str(path)])
    assert records == ["a", "d"]
    assert counter.examples["non_string"] == [f"{path}: row 2: key 'text' is null, expected a "
                                              f"string"]
    assert counter.counts["empty"] == 1
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    records, counter = _records([str(tmp_path / "ints.parquet")])
    assert records == [] and counter.counts["non_string"] == 2


@pytest.mark.parametrize("make, match", [
    (lambda d: [str(d / "none*.jsonl")], "matches no file; check the pattern"),
    (lambda d: [str(d / "missing.jsonl")], "missing.jsonl does not exist"),
    (lambda d: [str(d)], "is a directory; pass files or a glob"),
    (lambda d: [_write(d / "x.jsonl.gz", b"plain text")], "ends in .gz but is not gzip data"),
    (lambda d: [_write(d / "x.jsonl.zst", b"plain text")], "ends in .zst but is not zstd data"),
    (lambda d: [_write(d / "x.parquet", b"plain text")], "is not a readable Parquet file"),
])
def test_bad_inputs_fail_before_reading(tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        DocumentReader(make(tmp_path))


def test_parquet_missing_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"has no column 'text'; its columns are \['content'\]"):
        DocumentReader([str(tmp_path / "c.parquet")])


def test_truncated_gzip_is_reported_with_the_file(tmp_path, corpus_texts):
    raw = "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts).encode()
    data = gzip.compress(raw)
    path = _write(tmp_path / "t.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cannot read {path} after line \d+: .*truncated or "
                                         rf"corrupt"):
        list(DocumentReader([path]))


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
