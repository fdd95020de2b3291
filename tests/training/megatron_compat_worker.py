"""Two processes, two Megatron-LM behaviours (one torchrun launch for both):

    torchrun --nproc_per_node 2 megatron_compat_worker.py WORK_DIR

* **vocabulary padding across TP sizes**: a 258-token vocabulary pads to 512 rows at TP=2 and
  384 at TP=1 (Megatron-LM's 128 x TP). A TP=2 checkpoint loads at TP=1 (rows trimmed) and that
  TP=1 checkpoint loads back at TP=2 (padding added as zeros).
* **--overlap-grad-reduce --overlap-param-gather** (DP=2, distributed optimizer): the same losses
  and weights as without overlap, and a checkpoint saved right after a step holds the updated
  weights (the parameter all-gather is otherwise deferred to the next forward).

Rank 0 writes ``results.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.model import CausalLM, build_model, load_model
from megatron_longctx.model.sharding import full_tensors
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
from megatron_longctx.training.checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    save_weights,
)
from megatron_longctx.training.trainer import Trainer

VOCAB = 258
ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def vocab_padding(work: str) -> dict:
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=2, vocab_size=VOCAB)
    tp1, tp2 = ParallelConfig(), ParallelConfig(tensor_model_parallel_size=2)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    initialize_model_parallel(tp2, seed=7)
    original = build_model(cfg, tp2)
    with torch.no_grad():  # the padding rows carry values, so trimming them is visible
        for name in ROWS:
            original.state_dict()[name].normal_()
        reference = CausalLM(original, cfg).eval()(tokens)  # [b, s, vocab]
    full_tp2 = full_tensors(original)
    save_weights(original, RunConfig(model=cfg, parallel=tp2), os.path.join(work, "tp2"))

    at_tp1 = load_model(os.path.join(work, "tp2"), tp1)  # DP=2, TP=1
    full_tp1 = full_tensors(at_tp1.gpt)
    with torch.no_grad():
        logits_tp1 = at_tp1(tokens)
    save_weights(at_tp1.gpt, RunConfig(model=cfg, parallel=tp1), os.path.join(work, "tp1"))
    back_at_tp2 = load_model(os.path.join(work, "tp1"), tp2)
    full_back = full_tensors(back_at_tp2.gpt)
    with torch.no_grad():
        logits_back = back_at_tp2(tokens)
    return {
        "rows_tp2": [full_tp2[n].shape[0] for n in ROWS],
        "rows_tp1": [full_tp1[n].shape[0] for n in ROWS],
        "rows_back": [full_back[n].shape[0] for n in ROWS],
        "tp1_rows_equal": all(torch.equal(full_tp1[n], full_tp2[n][:384]) for n in ROWS),
        "back_rows_equal": all(torch.equal(full_back[n][:384], full_tp2[n][:384])
                               for n in ROWS),
        "back_padding_zero": all(bool((full_back[n][384:] == 0).all()) for n in ROWS),
        "other_weights_equal": all(torch.equal(full_tp1[n], t) for n, t in full_tp2.items()
                                   if n not in ROWS),
        "logits_tp1_max_diff": (logits_tp1 - reference).abs().max().item(),
        "logits_back_max_diff": (logits_back - reference).abs().max().item(),
        "logits_shape": list(logits_tp1.shape),
    }


def dp2_trainer(overlap: bool) -> Trainer:
    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    cfg.model.num_layers, cfg.model.num_query_groups = 2, 2
    cfg.training.seq_length, cfg.training.train_iters = 64, 4
    p = cfg.parallel
    p.use_distributed_optimizer = True
    p.overlap_grad_reduce = p.overlap_param_gather = overlap
    cfg.validate(dist.get_world_size())
    initialize_model_parallel(p, cfg.training.seed)
    return Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=30), 64))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def overlap(work: str) -> dict:
    plain = dp2_trainer(overlap=False)
    plain_losses = [plain.train_step()["lm_loss"] for _ in range(3)]
    expected = weights(plain)
    overlapped = dp2_trainer(overlap=True)
    losses = [overlapped.train_step()["lm_loss"] for _ in range(3)]
    stale = weights(overlapped)  # other ranks' shards arrive in the next forward
    save_checkpoint(overlapped, os.path.join(work, "overlap"))  # gathers them first
    synced = weights(overlapped)
    resumed = dp2_trainer(overlap=False)
    load_checkpoint(resumed, resolve_checkpoint(os.path.join(work, "overlap")))
    return {
        "losses_plain": plain_losses, "losses_overlap": losses,
        "stale_before_save": any(not torch.equal(stale[n], t) for n, t in expected.items()),
        "synced_equal": all(torch.equal(synced[n], t) for n, t in expected.items()),
        "saved_equal": all(torch.equal(weights(resumed)[n], t) for n, t in expected.items()),
        "next_loss_plain": plain.train_step()["lm_loss"],
        "next_loss_overlap": overlapped.train_step()["lm_loss"],
    }


def main(work: str) -> None:
    init_process_group()
    results = {"vocab_padding": vocab_padding(work), "overlap": overlap(work)}
    if dist.get_rank() == 0:
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
