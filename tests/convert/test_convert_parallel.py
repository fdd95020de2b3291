"""Converted checkpoints load at TP=2 and PP=2 with transformers' logits (one torchrun launch,
2 processes): converted in one process and resharded on load, converted under torchrun at
TP=2, and (defect 4) tied embeddings converted and loaded with PP=2."""

import json
import os

import torch

from megatron_longctx.convert import hf_to_mcore

from convert.hf_models import HF_ROPES, hf_logits, inputs, make_hf_model
from distributed import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "convert_worker.py")
TOL = 1e-4


def test_tp2_pp2_logits_equal_transformers(single_process_group, tmp_path):
    untied = make_hf_model(str(tmp_path / "hf_untied"), "llama", HF_ROPES["yarn"])
    tied = make_hf_model(str(tmp_path / "hf_tied"), "qwen2", HF_ROPES["llama3"], tied=True,
                         seed=1)
    tokens, positions = inputs()
    torch.save({"tokens": tokens, "positions": positions,
                "untied": hf_logits(untied, tokens, positions),
                "tied": hf_logits(tied, tokens, positions)}, tmp_path / "expected.pt")
    hf_to_mcore(str(tmp_path / "hf_untied"), str(tmp_path / "ckpt_tp1"))
    run_torchrun(WORKER, 2, str(tmp_path))
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(rank, results)
        assert len(results) == 6
        for name, diff in results.items():
            assert diff is True or diff <= TOL, (rank, name, diff)
