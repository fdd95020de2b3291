"""Shared by the merge and impactful-token tests: tiny transformers Llamas A and B (other
seeds) and C (another RoPE, with tokenizer files), vocabulary 300 (padded to 384 rows at TP=1,
512 at TP=2: Megatron-LM's padding), converted in one process; a few documents; and one
torchrun launch (2 processes) that converts A and B at TP=2 and A at PP=2 and runs the
impactful-token tool at TP=2."""

import os

import numpy as np
import pytest
import torch

from convert.hf_models import HF_ROPES, make_hf_model, write_tokenizer
from distributed import run_torchrun

VOCAB = 300
DOC_LENGTHS = (30, 60, 70)  # the first is shorter than SEQ_LENGTH: skipped
SEQ_LENGTH = 48


@pytest.fixture(scope="session")
def methods_models(tmp_path_factory, single_process_group):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_longctx.convert import hf_to_mcore

    work = tmp_path_factory.mktemp("methods")
    models = {"work": str(work)}
    for name, seed, rope in (("a", 0, HF_ROPES["default"]), ("b", 1, HF_ROPES["default"]),
                             ("c", 2, {"rope_type": "default", "rope_theta": 500000.0})):
        models[f"hf_{name}"] = make_hf_model(str(work / f"hf_{name}"), "llama", rope, seed=seed,
                                             vocab_size=VOCAB)
        if name == "c":  # a checkpoint with tokenizer files, as conversions keep them
            write_tokenizer(str(work / f"hf_{name}"))
        models[name] = str(work / f"ckpt_{name}")
        hf_to_mcore(str(work / f"hf_{name}"), models[name])
    prefix = str(work / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for n in DOC_LENGTHS:
        builder.add_document(torch.from_numpy(rng.integers(0, VOCAB, n).astype(np.int32)), [n])
    builder.finalize(prefix + ".idx")
    models["data"] = prefix
    return models


@pytest.fixture(scope="session")
def methods_tp2(methods_models):
    """The torchrun launch: ``{work}/ckpt_a_tp2``, ``ckpt_b_tp2``, ``ckpt_a_pp2`` and the tool's
    output at TP=2 in ``{work}/impactful_tp2``."""
    work = methods_models["work"]
    run_torchrun(os.path.join(os.path.dirname(__file__), "methods_worker.py"), 2, work,
                 str(SEQ_LENGTH))
    return {name: os.path.join(work, name)
            for name in ("ckpt_a_tp2", "ckpt_b_tp2", "ckpt_a_pp2", "impactful_tp2")}
