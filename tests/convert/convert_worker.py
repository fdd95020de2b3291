"""Converted checkpoints under TP=2 / PP=2 (2 processes), against transformers' logits.

    torchrun --nproc_per_node 2 convert_worker.py WORK_DIR

WORK_DIR holds ``expected.pt`` (tokens, positions, logits of the HF models ``hf_untied`` and
``hf_tied``) and ``ckpt_tp1`` (``hf_untied`` converted in one process). Each rank writes
``rank{r}.json``: the max |logits - transformers| per check.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_longctx.config import ParallelConfig
from megatron_longctx.convert import hf_to_mcore
from megatron_longctx.convert.hf_config import model_config_from_hf
from megatron_longctx.convert.safetensors_io import SafetensorsReader
from megatron_longctx.model import build_model, load_model
from megatron_longctx.model.gpt import padded_vocab_size
from megatron_longctx.model.hf_conversion import from_hf
from megatron_longctx.model.sharding import load_full_state_dict
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel

TP2 = ParallelConfig(tensor_model_parallel_size=2)
PP2 = ParallelConfig(pipeline_model_parallel_size=2)


def max_diff(ckpt: str, parallel: ParallelConfig | None, tokens, positions, expected) -> float:
    with torch.no_grad():
        logits = load_model(ckpt, parallel)(tokens, positions)
    assert logits.shape == expected.shape, (logits.shape, expected.shape)
    return (logits - expected).abs().max().item()


def main(work: str) -> None:
    init_process_group()
    ref = torch.load(os.path.join(work, "expected.pt"))
    tokens, positions = ref["tokens"], ref["positions"]
    untied, tied = ref["untied"], ref["tied"]
    results = {
        # converted in one process, resharded on load
        "tp1_converted_tp2_loaded": max_diff(os.path.join(work, "ckpt_tp1"), TP2, tokens,
                                             positions, untied),
        "tp1_converted_pp2_loaded": max_diff(os.path.join(work, "ckpt_tp1"), PP2, tokens,
                                             positions, untied),
    }
    # converted at the target layout under torchrun
    hf_to_mcore(os.path.join(work, "hf_untied"), os.path.join(work, "ckpt_tp2"), tp=2)
    results["tp2_converted_tp2_loaded"] = max_diff(os.path.join(work, "ckpt_tp2"), None,
                                                   tokens, positions, untied)
    # defect 4: tied embeddings with PP=2 (output_layer.weight lives on the last stage)
    hf_to_mcore(os.path.join(work, "hf_tied"), os.path.join(work, "ckpt_pp2_tied"), pp=2)
    for name, layout in (("pp2", None), ("tp2", TP2)):
        results[f"tied_pp2_converted_{name}_loaded"] = max_diff(
            os.path.join(work, "ckpt_pp2_tied"), layout, tokens, positions, tied)
    with open(os.path.join(work, "hf_tied", "config.json")) as f:
        cfg, _ = model_config_from_hf(json.load(f))
    reader = SafetensorsReader(os.path.join(work, "hf_tied"))
    initialize_model_parallel(PP2, seed=0)
    model = build_model(cfg, PP2)
    load_full_state_dict(model, from_hf({n: reader.get(n) for n in reader.names()}, cfg,
                                        padded_vocab_size(cfg.vocab_size, 1)))
    results["tied_pp2_full_state_dict_loaded"] = True
    with open(os.path.join(work, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
