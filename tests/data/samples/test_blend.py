"""Megatron-LM's data flags: blends (weighted and not), per-split paths, files holding them,
mock data and a required data source, checked against megatron-core's own blend parsing and
dataset builder."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list
from test_packing import EOD, make_docs, write_dataset

from megatron_longctx.arguments import parse_config
from megatron_longctx.config import DataConfig
from megatron_longctx.data.samples.blend import blend_from_list, resolve_data_sources
from megatron_longctx.data.samples.blended_dataset import BlendedDataset, build_split_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.data.tokenization.tokenizers import NullTokenizer, build_tokenizer

SEQ, SEED = 32, 5
TOKENIZER = SimpleNamespace(vocab_size=5000, eod=EOD, pad=EOD,
                            unique_identifiers={"class": "test"})


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    """Three sources of different sizes (and document lengths), so size weights differ."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    out = []
    # enough documents that each source has samples in every split of --split 969,30,1
    for k, (name, n) in enumerate((("a", 2000), ("b", 1200), ("c", 1000))):
        prefix = str(root / name)
        write_dataset(prefix, make_docs(rng.integers(40, 200, n).tolist(), 2 + 1000 * k))
        out.append(prefix)
    return out


def megatron_core_blend(tmp_path, sizes, **config):
    """megatron-core's datasets for ``config`` (blend or blend_per_split): per split, the
    (prefix, document range) of each source and the normalized weights, or None."""
    cfg = GPTDatasetConfig(random_seed=SEED, sequence_length=SEQ, tokenizer=TOKENIZER,
                           reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, path_to_cache=str(tmp_path / "mcore_cache"),
                           **config)
    built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()
    return [None if ds is None else describe_megatron(ds) for ds in built]


def describe_megatron(ds):
    parts = ds.datasets if hasattr(ds, "datasets") else [ds]
    weights = getattr(ds, "weights", [1.0])
    return ([(p.dataset_path, int(p.indices[0]), int(p.indices[-1]) + 1) for p in parts],
            np.asarray(weights, dtype=np.float64) / np.sum(weights))


def ours(data: DataConfig, sizes):
    sources = resolve_data_sources(data)
    options = SampleOptions(SEQ, eod=EOD)
    out = []
    for index, size in enumerate(sizes):
        ds = None if size is None else build_split_dataset(sources, index, size, options, SEED,
                                                          TOKENIZER)
        if ds is None:
            out.append(None)
            continue
        parts = ds.datasets if isinstance(ds, BlendedDataset) else [ds]
        weights = ds.weights if isinstance(ds, BlendedDataset) else [1.0]
        out.append(([(p.prefix, *p.doc_range) for p in parts], np.asarray(weights)))
    return out


def assert_same_blend(mine, theirs):
    assert len(mine) == len(theirs)
    for split, (m, t) in enumerate(zip(mine, theirs)):
        assert (m is None) == (t is None), split
        if m is not None:
            assert m[0] == t[0], split  # the same sources, each the same documents
            np.testing.assert_allclose(m[1], t[1], rtol=1e-12, err_msg=f"split {split}")


def test_unweighted_data_path_weighs_sources_by_size_as_megatron_core(single_process_group,
                                                                     prefixes, tmp_path):
    data = DataConfig(data_path=prefixes)  # --split: Megatron-LM's default 969,30,1
    mine = ours(data, [400, 40, 4])
    theirs = megatron_core_blend(tmp_path, [400, 40, 4], blend=get_blend_from_list(prefixes),
                                 split="969,30,1")
    assert_same_blend(mine, theirs)
    sizes = mine[0][1]
    assert sizes[0] > sizes[1] > sizes[2]  # not uniform: by size


def test_weighted_data_path_as_megatron_core(single_process_group, prefixes, tmp_path):
    spec = ["30", prefixes[0], "50", prefixes[1], "20", prefixes[2]]
    mine = ours(DataConfig(data_path=spec, split="90,10,0"), [400, 40, None])
    theirs = megatron_core_blend(tmp_path, [400, 40, 0], blend=get_blend_from_list(spec),
                                 split="90,10,0")
    assert_same_blend(mine, theirs)
    np.testing.assert_allclose(mine[0][1], [0.3, 0.5, 0.2])


def test_per_split_paths_as_megatron_core(single_process_group, prefixes, tmp_path):
    train, valid = prefixes[:2], prefixes[2:]
    data = DataConfig(train_data_path=train, valid_data_path=valid)
    mine = ours(data, [400, 40, None])
    theirs = megatron_core_blend(
        tmp_path, [400, 40, None],
        blend_per_split=[get_blend_from_list(train), get_blend_from_list(valid), None])
    assert_same_blend(mine, theirs)
    assert mine[1][0][0][1:] == (0, 1000)  # whole datasets: --split does not apply


def test_list_files_and_flags_name_the_same_data(prefixes, tmp_path):
    args = tmp_path / "data_args.txt"
    args.write_text("0.3 " + prefixes[0] + "\n0.7 " + prefixes[1] + "\n")
    per_split = tmp_path / "per_split.json"
    per_split.write_text(json.dumps({"train": prefixes[:2], "valid": prefixes[2], "test": None}))
    assert resolve_data_sources(DataConfig(data_args_path=str(args))) == resolve_data_sources(
        DataConfig(data_path=["0.3", prefixes[0], "0.7", prefixes[1]]))
    assert resolve_data_sources(DataConfig(per_split_data_args_path=str(per_split))) == \
        resolve_data_sources(DataConfig(train_data_path=prefixes[:2],
                                        valid_data_path=[prefixes[2]]))
    cfg, _ = parse_config(["--train-data-path", *prefixes[:2], "--valid-data-path", prefixes[2],
                           "--data-cache-path", str(tmp_path)])
    assert cfg.data.train_data_path == prefixes[:2] and cfg.data.split is None


@pytest.mark.parametrize("values", [["a", "b"], ["a"], ["a", "b", "c"], ["1", "a", "2", "b"],
                                    ["0.5", "a", "0.5", "b", "0", "c"], ["a", "0.2", "b", "x"]])
def test_blend_lists_parse_as_get_blend_from_list(values):
    blend = blend_from_list(values)
    prefixes, weights = get_blend_from_list(values)
    assert list(blend.prefixes) == list(prefixes)
    assert (blend.weights is None and weights is None) or list(blend.weights) == weights


@pytest.mark.parametrize("data,match", [
    (DataConfig(), "no training data: give --data-path"),
    (DataConfig(data_path=["a"], train_data_path=["b"]), "exclude each other"),
    (DataConfig(data_path=["a"], mock_data=True), "exclude each other"),
    (DataConfig(train_data_path=["a"], split="1,1,1"), "drop --split"),
    (DataConfig(valid_data_path=["a"]), "give --train-data-path"),
    (DataConfig(data_path=["0.5", "stdlib", "0.5", "a"]), "used alone"),
    (DataConfig(data_path=["0.5", "a", "b", "c"]), "mixes weights and prefixes"),
    (DataConfig(data_path=["a"], split="a,b"), "comma-separated numbers"),
    (DataConfig(data_path=["a"], dataloader_type="external"), "dataloader-type"),
    (DataConfig(mock_data=True, tokenizer_type="NullTokenizer"), "needs --vocab-size"),
])
def test_bad_data_flags_are_clear_errors(data, match):
    with pytest.raises(ValueError, match=match):
        data.validate()


def test_pretrain_without_data_path_stops_before_work():
    from megatron_longctx.training.pretrain_tool import main

    with pytest.raises(SystemExit, match="error: no training data.*--data-path stdlib"):
        main(["--train-iters", "1"])


def test_mock_data_is_megatron_cores_mock_documents():
    """--mock-data --tokenizer-type NullTokenizer --vocab-size N: megatron-core's
    MockGPTLowLevelDataset documents (tokens 1, 2, ... then EOD = N), packed."""
    tokenizer = build_tokenizer("NullTokenizer", None, 50000)
    assert isinstance(tokenizer, NullTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod) == (50001, 50000)  # Megatron-LM's NullTokenizer
    assert tokenizer.tokenize("3 5 7") == [3, 5, 7] and tokenizer.detokenize([3, 5]) == "3 5"
    sources = resolve_data_sources(DataConfig(mock_data=True, tokenizer_type="NullTokenizer",
                                              vocab_size=50000))
    options = SampleOptions(256, eod=tokenizer.eod)
    train = build_split_dataset(sources, 0, 64, options, SEED, tokenizer)
    valid = build_split_dataset(sources, 1, 8, options, SEED, tokenizer)
    assert len(train) >= 64 and len(valid) >= 8
    assert train.doc_range == (0, 33333) and valid.doc_range == (33333, 66667)  # split 1,1,1
    eod = tokenizer.eod
    samples = np.stack([train[i]["tokens"].numpy() for i in range(64)])  # [64, 256]
    within = (samples[:, :-1] != eod) & (samples[:, 1:] != eod)
    assert (np.diff(samples)[within] == 1).all()  # documents count up: 1, 2, 3, ...
    assert (samples[:, 1:][samples[:, :-1] == eod] == 1).all()  # and start at 1 after an EOD
    assert (samples == eod).sum() > 2  # documents end inside samples (lengths 1..4095)
