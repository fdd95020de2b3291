"""Bad inputs to tools/preprocess_data.py, as a new user makes them: each case exits non-zero
within a time limit, prints one line that names the file or flag at fault, and leaves nothing
in the output directory that loads as a dataset. Plus the inputs that must be accepted (a UTF-8
byte-order mark) and a worker killed mid-run."""

import gzip
import json
import os
import signal
import subprocess
import time

import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pipeline_helpers import PYTHON, ROOT, write_jsonl

from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl

TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
CASE_TIMEOUT = 60  # seconds; a hang fails the case instead of the suite
CORPUS = b"".join(json.dumps({"text": f"document {i} " * 40}).encode() + b"\n"
                  for i in range(300))


def _file(name: str, data: bytes):
    def make(d):
        (d / name).write_bytes(data)
        return ["--input", str(d / name)]
    return make


def _zst_half(d):
    data = zstandard.ZstdCompressor().compress(CORPUS)
    (d / "half.jsonl.zst").write_bytes(data[:len(data) // 2])
    return ["--input", str(d / "half.jsonl.zst")]


def _gz_half(d):
    data = gzip.compress(CORPUS)
    (d / "half.jsonl.gz").write_bytes(data[:len(data) // 2])
    return ["--input", str(d / "half.jsonl.gz")]


def _ok(d, *flags):
    write_jsonl(d / "ok.jsonl", [{"text": "1 2 3"}, {"text": "hello world"}])
    return ["--input", str(d / "ok.jsonl"), *flags]


def _with_ok(*flags):
    return lambda d: _ok(d, *flags)


# (id, make(dir) -> flags, text that must appear in the one-line message, extra env)
CASES = [
    ("empty file", _file("empty.jsonl", b""), "no document in {d}/empty.jsonl", None),
    ("blank lines only", _file("blank.jsonl", b"\n \n\n"), "no document in {d}/blank.jsonl",
     None),
    ("every record lacks the key", _file("k.jsonl", b'{"content": "a"}\n{"content": "b"}\n'),
     "2 for missing key (e.g. {d}/k.jsonl:1: no key 'text'", None),
    ("random bytes", _file("random.jsonl", bytes(range(256)) * 50),
     "no document in {d}/random.jsonl", None),
    ("gzip named .jsonl", _file("gz.jsonl", gzip.compress(CORPUS)),
     "{d}/gz.jsonl holds gzip data but is named as plain JSON lines; rename it to "
     "{d}/gz.jsonl.gz", None),
    ("zstd named .jsonl", _file("z.jsonl", zstandard.ZstdCompressor().compress(CORPUS)),
     "{d}/z.jsonl holds zstd data", None),
    ("truncated .zst", _zst_half, "cannot read {d}/half.jsonl.zst after line", None),
    ("truncated .gz", _gz_half, "cannot read {d}/half.jsonl.gz after line", None),
    ("not gzip", _file("x.jsonl.gz", CORPUS), "{d}/x.jsonl.gz ends in .gz but is not gzip",
     None),
    ("UTF-16 text", _file("u16.jsonl", '{"text": "a"}\n'.encode("utf-16")),
     "{d}/u16.jsonl is UTF-16 text", None),
    ("missing file", lambda d: ["--input", str(d / "nope.jsonl")],
     "--input {d}/nope.jsonl does not exist", None),
    ("shard index out of range", _with_ok("--num-shards", "2", "--shard-index", "2"),
     "--shard-index must be in 0..1", None),
    ("shard count without index", _with_ok("--num-shards", "2"),
     "--num-shards and --shard-index go together", None),
    ("array with a step", _ok, "is not one of consecutive shards",
     {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2",
      "SLURM_ARRAY_TASK_STEP": "2"}),
    ("workers not a multiple of partitions", _with_ok("--partitions", "2", "--workers", "3"),
     "--workers 3 must be a multiple of --partitions 2", None),
    ("NullTokenizer without --vocab-size",
     _with_ok("--tokenizer-type", "NullTokenizer"), "needs --vocab-size", None),
    ("NullTokenizer given words",
     _with_ok("--tokenizer-type", "NullTokenizer", "--vocab-size", "10"),
     "{d}/ok.jsonl:2: NullTokenizer reads whitespace-separated integer token ids, got 'hello'",
     None),
    ("NullTokenizer id past the vocabulary",
     lambda d: [*_file("ids.jsonl", b'{"text": "0 1"}\n{"text": "1 5 2"}\n')(d),
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "3"],
     "{d}/ids.jsonl:2: token id 5 is outside the tokenizer's vocabulary of 4", None),
    ("GPT2BPETokenizer without merges",
     _with_ok("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{d}/ok.jsonl"),
     "--merge-file is missing", None),
    ("unknown --lang", _with_ok("--split-sentences", "--lang", "klingon"),
     "--lang 'klingon' has no sentence splitter", None),
    ("--keep-newlines alone", _with_ok("--keep-newlines"),
     "--keep-newlines only applies with --split-sentences", None),
    ("TikTokenizer missing vocabulary", _with_ok("--tokenizer-type", "TikTokenizer",
                                                 "--tokenizer-model", "{d}/none.json"),
     "--tokenizer-model {d}/none.json does not exist", None),
]


@pytest.mark.parametrize("make, expected, env", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_and_leaves_nothing(tmp_path, make, expected, env):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    flags = [a.replace("{d}", str(inputs)) for a in make(inputs)]
    if "--tokenizer-type" not in flags:
        flags += ["--tokenizer-type", "ByteTokenizer"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([PYTHON, TOOL, *flags, "--output-prefix", str(out / "o"),
                           "--no-progress"], capture_output=True, text=True,
                          timeout=CASE_TIMEOUT, env={**base, **(env or {})})
    # skipped records may be reported while the run goes; the error is the one last line
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert lines and [x for x in lines if x.startswith("error: ")] == lines[-1:], lines
    assert expected.replace("{d}", str(inputs)) in lines[-1], lines[-1]
    leftovers = os.listdir(out) if out.exists() else []
    assert not [f for f in leftovers if not f.startswith(".")], leftovers


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    for name, data in (("bom.jsonl", path.read_bytes()),
                       ("bom.jsonl.gz", gzip.compress(path.read_bytes()))):
        (tmp_path / name).write_bytes(data)
        proc = subprocess.run([PYTHON, TOOL, "--input", str(tmp_path / name), "--output-prefix",
                               str(tmp_path / name.replace(".", "_")), "--tokenizer-type",
                               "ByteTokenizer", "--no-progress"],
                              capture_output=True, text=True, timeout=CASE_TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        dataset = IndexedDataset(str(tmp_path / f"{name.replace('.', '_')}_text_document"))
        assert [dataset[i].tolist() for i in range(len(dataset))] == [list(b"first"),
                                                                      list(b"second")]


def test_a_killed_worker_fails_the_run_within_seconds(tmp_path, sp_model):
    corpus = str(tmp_path / "big.jsonl")
    write_stdlib_jsonl(corpus, max_docs=250)  # seconds of tokenizing with 2 workers
    out = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, TOOL, "--input", corpus, "--output-prefix", str(out / "o"),
                             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                             sp_model, "--workers", "2", "--chunk-mb", "0.1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        workers = []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                     text=True).stdout.split()
            time.sleep(0.01)
        assert workers, "no worker process appeared"
        os.kill(int(workers[0]), signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=CASE_TIMEOUT)
        took = time.monotonic() - killed
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 1
    assert took < 10, f"the run took {took:.1f} s to notice the dead worker"
    # the cause is named when the worker's exit status is in by then; on a loaded machine the
    # pool can break first (about 1 run in 4 here): then it only says the worker was killed
    last = err.strip().splitlines()[-1]
    assert (last.startswith(f"error: a worker process died (pid {workers[0]} was killed by "
                            f"SIGKILL") or last.startswith("error: a worker process died "
                                                           "(killed); the run stopped")), err
    assert not [f for f in os.listdir(out) if not f.startswith(".")]


def test_multi_frame_zstd_with_skippable_frames_is_read_to_the_end(tmp_path):
    """pzstd writes a skippable frame before each of its frames."""
    import struct

    from megatron_longctx.data.preprocessing.jsonl_reader import DocumentReader

    skippable = struct.pack("<II", 0x184D2A50, 4) + b"\0" * 4
    half = len(CORPUS) // 2
    cut = CORPUS.rindex(b"\n", 0, half) + 1
    frames = [CORPUS[:cut], CORPUS[cut:]]
    data = b"".join(skippable + zstandard.ZstdCompressor().compress(f) for f in frames)
    (tmp_path / "p.jsonl.zst").write_bytes(data)
    assert len(list(DocumentReader([str(tmp_path / "p.jsonl.zst")]))) == 300
    (tmp_path / "cut.jsonl.zst").write_bytes(data[:-5])  # the last frame loses its end
    with pytest.raises(ValueError, match="cut.jsonl.zst after line .*ends inside a frame"):
        list(DocumentReader([str(tmp_path / "cut.jsonl.zst")]))
