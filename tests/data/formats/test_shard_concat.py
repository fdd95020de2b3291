"""A directory or glob given as one --data-path entry trains on the shards of a preprocessing
run as one dataset: the same samples as the merged dataset (DECISIONS.md 5); an unfinished
shard set is refused before any work."""

import numpy as np
import pytest
from pipeline_helpers import load_tool, write_jsonl

from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, open_indexed

SEQ = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_texts):
    root = tmp_path_factory.mktemp("shard_concat")
    path = write_jsonl(root / "a.jsonl", [{"text": t} for t in corpus_texts])
    pre, merge = load_tool("preprocess_data").main, load_tool("merge_datasets").main
    shard_dir = root / "shards"
    for i in range(3):
        assert pre(["--input", path, "--tokenizer-type", "ByteTokenizer", "--append-eod",
                    "--output-prefix", str(shard_dir / "s"), "--num-shards", "3",
                    "--shard-index", str(i), "--no-progress"]) == 0
    assert merge(["--input", str(shard_dir), "--output-prefix", str(root / "merged")]) == 0
    return root, shard_dir


@pytest.mark.parametrize("entry", ["directory", "glob"])
def test_unmerged_shards_give_the_merged_samples(shards, entry):
    root, shard_dir = shards
    data = str(shard_dir) if entry == "directory" else f"{shard_dir}/s_shard*_text_document"
    merged = open_indexed(str(root / "merged"))
    virtual = open_indexed(data)
    assert np.array_equal(virtual.sequence_lengths, merged.sequence_lengths)
    options = SampleOptions(SEQ, eod=257, reset_position_ids=True)
    ours = build_blended_dataset([data], "90,10,0", 40, options, 3)
    ref = build_blended_dataset([str(root / "merged")], "90,10,0", 40, options, 3)
    for i in range(len(ref)):
        a, b = ours[i], ref[i]
        assert np.array_equal(a["tokens"], b["tokens"]) and a["doc_starts"] == b["doc_starts"]
        assert np.array_equal(a["position_ids"], b["position_ids"])


def test_an_unfinished_shard_set_is_refused(shards, tmp_path):
    _, shard_dir = shards
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(shard_dir, partial)
    for f in partial.glob("s_shard00001_text_document.*"):
        f.unlink()
    with pytest.raises(ValueError, match=r"s_shard00001_text_document \(shard 1 of 3\) is "
                                         r"missing"):
        open_indexed(str(partial))
    with pytest.raises(ValueError, match=r"--data-path .*nothing.*: .*matches no dataset"):
        open_indexed(str(tmp_path / "nothing*_text_document"))


def test_training_checks_every_shard(shards):
    from megatron_longctx.data.formats.dataset_check import check_training_data

    _, shard_dir = shards
    checks = check_training_data([str(shard_dir)], 258)
    assert sorted(c.prefix for c in checks) == sorted(
        str(p)[:-4] for p in shard_dir.glob("s_shard*_text_document.idx"))
    with pytest.raises(ValueError, match="but the tokenizer has 100 tokens"):
        check_training_data([f"{shard_dir}/s_shard*_text_document"], 100)
