"""Chunked loss under TP=2 (with and without sequence parallelism) and CP=2, against the
single-process computation on the same full weights.

    torchrun --nproc_per_node 2 chunked_loss_worker.py OUT.json

Writes, from rank 0, the largest relative error over both ranks of each compared quantity:
``tp2``/``tp2_sp`` (the loss function on a TP-split weight vs float64 full-logits cross
entropy), ``cp2_model`` and ``tp2_sp_model`` (the model with chunking on vs the TP=CP=1 model
with megatron-core's full-logits loss).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_longctx.config import ParallelConfig, RunConfig
from megatron_longctx.model import build_model
from megatron_longctx.model.chunked_loss import chunked_cross_entropy
from megatron_longctx.model.context_parallel import slice_for_cp_rank
from megatron_longctx.model.sharding import full_tensors, load_full_state_dict, local_parameters
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel

SEQ = 32


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def tensor_parallel_function(results: dict) -> None:
    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2), seed=1234)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    torch.manual_seed(0)  # the same data on both ranks
    s, b, h, v = 16, 2, 16, 64
    hidden = torch.randn(s, b, h)  # [s, b, h]
    weight = torch.randn(v, h) * 0.5  # [v, h]
    labels = torch.randint(0, v, (b, s))
    grad_out = (torch.rand(b, s) > 0.3).float() * torch.rand(b, s)  # masked tokens: 0
    x64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = x64 @ w64.t()  # [s, b, v]
    ref = F.cross_entropy(logits.reshape(-1, v), labels.t().reshape(-1), reduction="none")
    ref = ref.view(s, b).t()  # [b, s]
    (ref * grad_out).sum().backward()
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        x = (hidden.chunk(2, dim=0)[rank] if sp else hidden).clone().requires_grad_()
        w = weight.chunk(2, dim=0)[rank].clone().requires_grad_()  # this rank's vocab rows
        loss = chunked_cross_entropy(x, w, labels, 5, sequence_parallel=sp,
                                     allreduce_grad=not sp, group=group)  # 32 tokens, 7 chunks
        (loss * grad_out).sum().backward()
        ref_x = x64.grad.chunk(2, dim=0)[rank] if sp else x64.grad
        results[name] = {"loss": rel(loss, ref), "grad_hidden": rel(x.grad, ref_x),
                         "grad_weight": rel(w.grad, w64.grad.chunk(2, dim=0)[rank])}


def model_config(untie: bool) -> RunConfig:
    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    cfg.model.untie_embeddings_and_output_weights = untie
    # Megatron-LM pads the vocabulary to a multiple of 128 x TP, so TP=1 and TP=2 would differ in
    # padding rows, whose logits enter the loss; divisor 1 pads 258 (260) the same at both
    cfg.model.make_vocab_size_divisible_by = 1
    return cfg


def reference_model(untie: bool, tokens, positions, labels, mask):
    """Full state, per-token loss [b, s] and grads of the TP=CP=1 model, chunking off."""
    cfg = model_config(untie)
    cfg.training.cross_entropy_chunk_size = 0
    initialize_model_parallel(cfg.parallel, seed=1234)  # DP=2: each rank a whole model
    model = build_model(cfg.model, cfg.parallel, training=cfg.training)
    state = {n: t.clone() for n, t in full_tensors(model).items()}
    loss = model(tokens, positions, None, labels=labels)
    (loss * mask).sum().backward()
    grads = {n: p.grad for n, p in local_parameters(model).items()}
    return state, loss.detach(), grads


def parallel_model(parallel: ParallelConfig, untie: bool, state):
    cfg = model_config(untie)
    cfg.parallel = parallel
    cfg.training.cross_entropy_chunk_size = 5
    initialize_model_parallel(parallel, seed=1234)
    model = build_model(cfg.model, parallel, training=cfg.training)
    load_full_state_dict(model, state)

    def no_full_logits(*args, **kwargs):
        raise AssertionError("the output layer ran on the full sequence")

    model.output_layer.forward = no_full_logits
    return model


def context_parallel_model(results: dict, tokens, positions, labels, mask) -> None:
    state, ref_loss, ref_grads = reference_model(True, tokens, positions, labels, mask)
    model = parallel_model(ParallelConfig(context_parallel_size=2), True, state)
    rank = parallel_state.get_context_parallel_rank()
    local = [slice_for_cp_rank(t, rank, 2) for t in (tokens, positions, labels, mask)]
    loss = model(local[0], local[1], None, labels=local[2], rope_seq_len=SEQ)  # [b, s / 2]
    (loss * local[3]).sum().backward()
    errors = {"loss": rel(loss, slice_for_cp_rank(ref_loss, rank, 2))}
    for name, param in local_parameters(model).items():  # the whole loss: sum over CP ranks
        grad = param.grad.clone()
        dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        errors[name] = rel(grad, ref_grads[name])
    results["cp2_model"] = errors


def sequence_parallel_model(results: dict, tokens, positions, labels, mask) -> None:
    state, ref_loss, ref_grads = reference_model(False, tokens, positions, labels, mask)
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    model = parallel_model(parallel, False, state)
    loss = model(tokens, positions, None, labels=labels)  # [b, s] on every TP rank
    (loss * mask).sum().backward()
    params = local_parameters(model)
    for param in params.values():  # norms see a slice of the tokens: sum over TP
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
    grads = full_tensors(model, {n: p.grad for n, p in params.items()})
    errors = {"loss": rel(loss, ref_loss)}
    errors.update({n: rel(g, ref_grads[n]) for n, g in grads.items()})
    results["tp2_sp_model"] = errors


def main(out: str) -> None:
    init_process_group()
    results: dict[str, dict[str, float]] = {}
    tensor_parallel_function(results)
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, SEQ))
    labels = torch.randint(0, 256, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, -1)
    mask = (torch.rand(2, SEQ) > 0.25).float()
    context_parallel_model(results, tokens, positions, labels, mask)
    sequence_parallel_model(results, tokens, positions, labels, mask)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        worst = {name: {k: max(r[name][k] for r in gathered) for k in errors}
                 for name, errors in results.items()}
        with open(out, "w") as f:
            json.dump(worst, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
