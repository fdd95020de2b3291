"""examples/slurm/preprocess.sbatch on a real Slurm cluster: a 2-task job array preprocesses
the stdlib corpus in two shards, the merge job waits for both (afterok), and the merged dataset
is byte-identical to a one-process run."""

import os
import subprocess
import sys

from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl

from distributed import ROOT

SCRIPT = os.path.join(ROOT, "examples", "slurm", "preprocess.sbatch")
FLAGS = ["--tokenizer-type", "ByteTokenizer", "--append-eod", "--no-progress",
         "--chunk-mb", "0.1"]


def test_array_of_shards_then_merge_equals_one_process(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    corpus = str(tmp_path / "corpus.jsonl")
    write_stdlib_jsonl(corpus, max_docs=60)  # ~1 MB: the two shards split it by bytes
    one = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                          "--input", corpus, "--output-prefix", str(tmp_path / "one"), *FLAGS],
                         capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    env = {**cluster.env, "INPUT": corpus, "OUTPUT_PREFIX": str(tmp_path / "data" / "corpus"),
           "NUM_SHARDS": "2", "CPUS_PER_TASK": "1", "TIME": "5",
           "VENV": os.path.join(ROOT, ".venv"), "LOG_DIR": str(tmp_path / "logs")}
    submit = subprocess.run(["bash", SCRIPT, *FLAGS], capture_output=True, text=True, env=env,
                            cwd=str(tmp_path), timeout=60)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    array, merge = submit.stdout.split()[-2:]

    def logs() -> str:
        directory = tmp_path / "logs"
        return "\n".join(f"--- {name}\n{(directory / name).read_text(errors='replace')[-2000:]}"
                         for name in sorted(os.listdir(directory))) if directory.exists() else ""

    def merged() -> bool:
        state = cluster.job(int(merge))["JobState"]
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"merge job {merge}: {state}\n{logs()}")
        return state == "COMPLETED"

    cluster.wait_for(merged, 60, "the shards and the merge", details=logs)
    text = logs()
    assert "shard 0 of 2" in text and "shard 1 of 2" in text, text
    assert f"preprocess-{array}_1.out" in text  # the array's tasks
    data = tmp_path / "data"
    assert sorted(f for f in os.listdir(data) if f.endswith(".idx")) == [
        "corpus_shard00000_text_document.idx", "corpus_shard00001_text_document.idx",
        "corpus_text_document.idx"]
    for ext in ("bin", "idx"):
        assert (data / f"corpus_text_document.{ext}").read_bytes() == \
            (tmp_path / f"one_text_document.{ext}").read_bytes(), ext
