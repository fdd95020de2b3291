"""Output layer + cross entropy without the full logits (``--cross-entropy-chunk-size``).

megatron-core computes the loss from the whole logits tensor: at 131072 tokens x 128256 vocab
the fp32 logits alone are 64 GiB, and megatron-core keeps them (as the softmax) until
backward. Here the output layer and the vocab-parallel cross entropy are one autograd function
that walks the tokens in chunks: forward computes a chunk's logits ``hidden @ W_local.T``, the
TP-wide max and sum of exponentials (the arithmetic of megatron-core's
``VocabParallelCrossEntropy``, whose helpers it reuses) and the target logit (from the rank
owning the target id), and keeps only the per-token loss and log-sum-exp; backward recomputes
each chunk's logits to accumulate the gradients of the hidden states and of the weight. Peak
memory is one chunk's logits (<= 256 MiB with automatic sizing) instead of all of them.

Communication follows megatron-core's output layer (``ColumnParallelLinear``): with sequence
parallelism the hidden states are all-gathered along the sequence (only the local shard is
saved; backward gathers again and reduce-scatters the gradient), otherwise the gradient of the
hidden states is all-reduced over TP. Padded vocabulary rows are ordinary logits, as in
megatron-core. Softmax statistics are fp32 (float64 for float64 inputs); matmuls run in the
input dtype, and the weight gradient is accumulated over chunks in fp32.

On CUDA with TP=1 and bf16, Apple's Cut Cross Entropy (``cut_cross_entropy``) computes the
same loss in fused kernels when installed; it is called with ``filter_eps=None``, which turns
off its skipping of small gradient terms, so it stays exact (not exercised by the CPU
tests; its ``ignore_index=-100`` never matches a token id). liger-kernel's fused linear cross
entropy is not used: with ``reduction='none'`` it scales its gradients (computed during
forward) by a single value of the output gradient, which is wrong for per-token, masked
gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import dist_all_gather_func, dist_reduce_scatter_func
from torch import Tensor

from megatron_longctx.model.gpu_kernels import cut_cross_entropy

AUTO_MIN_LOGITS_BYTES = 1 << 30  # automatic: chunk when one micro-batch's fp32 logits exceed
AUTO_CHUNK_LOGITS_BYTES = 256 << 20  # automatic: fp32 logits of one chunk at most


def logits_chunk_tokens(chunk_size: int | None, tokens: int, vocab_per_rank: int) -> int:
    """Tokens per chunk for ``--cross-entropy-chunk-size``; 0 means full logits (off).

    ``chunk_size``: the flag (None: automatic, 0: off). ``tokens``: this rank's tokens of one
    micro-batch after the sequence-parallel gather (micro_batch_size x seq_length / cp).
    ``vocab_per_rank``: padded vocabulary / tp. Automatic turns chunking on when the fp32
    logits would exceed 1 GiB, with chunks of at most 256 MiB of fp32 logits.
    """
    if chunk_size is not None:
        return chunk_size
    if tokens * vocab_per_rank * 4 <= AUTO_MIN_LOGITS_BYTES:
        return 0
    return max(1, AUTO_CHUNK_LOGITS_BYTES // (vocab_per_rank * 4))


def _size_rank(group) -> tuple[int, int]:
    return (group.size(), group.rank()) if group is not None else (1, 0)


def _all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if _size_rank(group)[0] > 1:
        dist.all_reduce(t, op=op, group=group)


def _gather_sequence(hidden: Tensor, group) -> Tensor:
    size = _size_rank(group)[0]
    if size == 1:
        return hidden
    total = hidden.new_empty((hidden.shape[0] * size, *hidden.shape[1:]))  # [s, b, h]
    dist_all_gather_func(total, hidden.contiguous(), group=group)
    return total


def _logits(x: Tensor, weight: Tensor, buffer: Tensor) -> Tensor:
    """``x @ weight.T`` ``[c, v/tp]`` in ``buffer``'s dtype, written into a prefix of it: one
    buffer serves every chunk (fresh 256 MiB tensors per chunk page-fault on CPUs)."""
    out = buffer[:x.shape[0]]
    if x.dtype == buffer.dtype:
        return torch.matmul(x, weight.t(), out=out)
    return out.copy_(x @ weight.t())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                sequence_parallel: bool, allreduce_grad: bool, group) -> Tensor:
        total = _gather_sequence(hidden, group) if sequence_parallel else hidden  # [s, b, h]
        x = total.reshape(-1, total.shape[-1])  # [n, h], tokens in (s, b) order
        target = labels.reshape(-1)  # [n]
        _, rank = _size_rank(group)
        first, last = rank * weight.shape[0], (rank + 1) * weight.shape[0]  # this rank's ids
        stats = torch.promote_types(x.dtype, torch.float32)
        loss = x.new_empty(x.shape[0], dtype=stats)  # [n]
        lse = torch.empty_like(loss)  # [n]
        buffer = x.new_empty((min(chunk, x.shape[0]), weight.shape[0]), dtype=stats)
        for i in range(0, x.shape[0], chunk):
            logits = _logits(x[i:i + chunk], weight, buffer)  # [c, v/tp]
            maxes = logits.amax(dim=-1)  # [c]
            _all_reduce(maxes, group, dist.ReduceOp.MAX)
            # in place: logits -= max, then exp; predicted is 0 where another rank owns the id
            _, _, predicted, sum_exp, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target[i:i + chunk], maxes, first, last)
            both = torch.stack([predicted, sum_exp])  # [2, c]: one all-reduce instead of two
            _all_reduce(both, group)
            log_sum = both[1].log()
            loss[i:i + chunk] = log_sum - both[0]
            lse[i:i + chunk] = log_sum + maxes
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.group = chunk, group
        ctx.sequence_parallel, ctx.allreduce_grad = sequence_parallel, allreduce_grad
        return loss.view(labels.shape)  # [s, b]

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        group, chunk = ctx.group, ctx.chunk
        total = _gather_sequence(hidden, group) if ctx.sequence_parallel else hidden  # [s, b, h]
        x = total.reshape(-1, total.shape[-1])  # [n, h]
        target = labels.reshape(-1)  # [n]
        grad_out = grad_loss.reshape(-1).to(lse.dtype)  # [n]
        _, rank = _size_rank(group)
        first, last = rank * weight.shape[0], (rank + 1) * weight.shape[0]
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if want_x else None  # [n, h]
        # fp32 accumulation over chunks: hundreds of bf16 partial sums would lose the low bits
        grad_w = (torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
                  if want_w else None)  # [v/tp, h]
        buffer = x.new_empty((min(chunk, x.shape[0]), weight.shape[0]), dtype=lse.dtype)
        for i in range(0, x.shape[0], chunk):
            x_chunk, t_chunk = x[i:i + chunk], target[i:i + chunk]  # [c, h], [c]
            logits = _logits(x_chunk, weight, buffer)  # [c, v/tp]
            softmax = logits.sub_(lse[i:i + chunk, None]).exp_()  # [c, v/tp]
            target_mask = (t_chunk < first) | (t_chunk >= last)  # [c]: id on another rank
            masked_target = (t_chunk - first).masked_fill(target_mask, 0)
            grad_2d, arange, update, grad_logits = (
                VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
                    softmax, target_mask))
            grad_logits = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d, arange, masked_target, update, grad_logits, grad_out[i:i + chunk])
            grad_logits = grad_logits.to(x.dtype)  # [c, v/tp], as megatron-core's output layer
            if want_x:
                torch.matmul(grad_logits, weight, out=grad_x[i:i + chunk])
            if want_w and grad_w.dtype == x.dtype:
                grad_w.addmm_(grad_logits.t(), x_chunk)
            elif want_w:
                grad_w += grad_logits.t() @ x_chunk
        grad_hidden = None
        if want_x:
            grad_x = grad_x.view(total.shape)  # [s, b, h]: partial sums over this vocab slice
            if ctx.sequence_parallel and _size_rank(group)[0] > 1:
                grad_hidden = hidden.new_empty(hidden.shape)  # [s / tp, b, h]
                dist_reduce_scatter_func(grad_hidden, grad_x, group=group)
            else:
                if ctx.allreduce_grad:
                    _all_reduce(grad_x, group)
                grad_hidden = grad_x
        grad_weight = grad_w.to(weight.dtype) if want_w else None
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                          sequence_parallel: bool = False, allreduce_grad: bool = False,
                          group=None) -> Tensor:
    """Per-token loss ``[b, s]`` (fp32) of ``hidden @ weight.T`` against ``labels``.

    ``hidden [s, b, h]`` (``[s / tp, b, h]`` with ``sequence_parallel``), ``weight [v / tp, h]``
    (this TP rank's rows of the output layer, or of the tied embedding), ``labels [b, s]``;
    ``chunk``: tokens per chunk. ``allreduce_grad``: all-reduce the hidden states' gradient
    over ``group`` (the TP group), as megatron-core's output layer does without sequence
    parallelism. Equals megatron-core's ``compute_language_model_loss(labels,
    output_layer(hidden))`` (unfused) and its gradients.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    fused = cut_cross_entropy() if hidden.is_cuda else None
    if (fused is not None and _size_rank(group)[0] == 1 and hidden.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16):
        loss = fused(hidden, weight, labels.t(), reduction="none", filter_eps=None)  # [s, b]
        return loss.float().t().contiguous()
    loss = _ChunkedLinearCrossEntropy.apply(hidden, weight, labels.t().contiguous(), chunk,
                                            sequence_parallel, allreduce_grad, group)  # [s, b]
    return loss.t().contiguous()
