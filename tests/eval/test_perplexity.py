"""Perplexity: every token scored once whatever the window; a window's perplexity equals
transformers' own loss on the same weights; the tool writes its table, results.json and plot."""

import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_longctx.eval import perplexity, sliding_window_nll, token_nll
from megatron_longctx.eval.perplexity import perplexity_by_length

from convert.hf_models import make_hf_model
from distributed import run_torchrun


class Bigram(torch.nn.Module):
    """Logits from the current token only: each token's NLL is the same with any context."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, position_ids=None):
        return self.table(input_ids)


def test_every_token_is_scored_exactly_once_for_any_window():
    model, doc = Bigram(), torch.randint(0, 50, (203,))
    reference = float(token_nll(model, doc[None]).double().sum())
    for length, stride in ((203, None), (204, None), (16, None), (16, 5), (16, 15), (2, 1)):
        total, count = sliding_window_nll(model, doc, length, stride)
        assert count == 202, (length, stride)
        assert total == pytest.approx(reference, rel=1e-12), (length, stride)
    with pytest.raises(ValueError, match="--stride must be in"):
        sliding_window_nll(model, doc, 16, 16)
    assert perplexity(0.0, 0) != perplexity(0.0, 0)  # nan: no tokens
    assert perplexity(2 * math.log(3), 2) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, single_process_group):
    from megatron_longctx.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("ppl")
    hf = make_hf_model(str(root / "hf"), "llama", {"rope_type": "default", "rope_theta": 1e4})
    hf_to_mcore(str(root / "hf"), str(root / "ckpt"))
    return hf, str(root / "ckpt")


def test_window_perplexity_equals_transformers_loss(checkpoint):
    from megatron_longctx.model import load_model

    hf, ckpt = checkpoint
    model = load_model(ckpt)
    doc = torch.randint(0, hf.config.vocab_size, (90,), generator=torch.Generator().manual_seed(3))
    total, count = sliding_window_nll(model, doc, 90)
    with torch.no_grad():
        expected = float(hf(doc[None], labels=doc[None]).loss)  # mean NLL of tokens 1..89
    assert count == 89
    assert perplexity(total, count) == pytest.approx(math.exp(expected), rel=1e-4)
    # shorter windows: less context, same tokens
    results = perplexity_by_length(model, [doc, doc[:40]], [16, 90])
    assert results[16]["tokens"] == results[90]["tokens"] == 89  # the short doc is left out
    assert results[90]["ppl"] == pytest.approx(math.exp(expected), rel=1e-4)


def _documents(tmp_path) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for n in (20, 80, 70, 100, 90):
        builder.add_document(torch.from_numpy(rng.integers(0, 50, n).astype(np.int32)), [n])
    builder.finalize(prefix + ".idx")
    return prefix


def test_eval_perplexity_tool_writes_table_json_and_plot(checkpoint, tmp_path):
    from megatron_longctx.eval.perplexity_tool import main

    _, ckpt = checkpoint
    prefix = _documents(tmp_path)
    out = tmp_path / "out"
    results = main(["--load", ckpt, "--data", prefix, "--lengths", "32,64",
                    "--num-documents", "2", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["documents"] == 2 and saved["lengths"] == [32, 64]  # the first two of >= 64 tokens
    assert saved["rows"][0]["32"] == pytest.approx(results[ckpt][32]["ppl"])
    assert (out / "perplexity.md").read_text().startswith("| checkpoint | 32 | 64 |")
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_tp2_pp2_and_cp2_give_the_single_process_numbers(checkpoint, tmp_path):
    from megatron_longctx.eval.perplexity_tool import main

    _, ckpt = checkpoint
    prefix = _documents(tmp_path)
    single = main(["--load", ckpt, "--data", prefix, "--lengths", "32,64", "--num-documents",
                   "2", "--out", str(tmp_path / "one")])[ckpt]
    run_torchrun(os.path.join(os.path.dirname(__file__), "perplexity_worker.py"), 2, ckpt,
                 prefix, str(tmp_path))
    for layout in ("tp2", "pp2", "cp2"):
        rows = json.loads((tmp_path / layout / "results.json").read_text())["rows"][0]
        for length in (32, 64):
            assert rows[str(length)] == pytest.approx(single[length]["ppl"], rel=1e-5), layout
