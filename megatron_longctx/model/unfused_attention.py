"""Unfused attention: scores, mask, softmax and dropout written out (``--attention-backend
unfused`` / ``local``, Megatron-LM's ``DotProductAttention`` without Transformer Engine).

It builds the ``[b, heads, s_q, s_k]`` score matrix, so it is the reference and the small-scale
path, not the long-context one: the flash-based paths of :mod:`..blockwise_attention` never
materialize scores. It is also the one path that applies attention dropout together with
packed-document masks or context parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import Tensor


def _document_ids(positions: Tensor, starts: list[int]) -> Tensor:
    """Index of the document holding each global position (``starts`` sorted, first 0)."""
    bounds = torch.tensor(starts, dtype=positions.dtype, device=positions.device)
    return torch.searchsorted(bounds, positions, right=True) - 1


def unfused_attention(query: Tensor, key: Tensor, value: Tensor, scale: float,
                      chunks: list[tuple[int, int, int]], doc_starts: list[list[int]] | None,
                      dropout: float = 0.0, fork_rng: bool = True) -> Tensor:
    """``query [s_q, b, np, hn]`` (rows at global positions given by ``chunks``:
    ``(local_start, local_end, global_start)``), ``key/value [s_k, b, ng, hn]`` (the whole
    sequence) -> ``[s_q, b, np * hn]``. A query sees earlier keys of its own document.

    ``dropout`` applies to the attention probabilities; under tensor parallelism each rank
    holds other heads, so (as Megatron-LM) it draws from the model-parallel RNG
    (``fork_rng``; off with sequence parallelism, where megatron-core forks around the layer).
    """
    s_q, batch, heads, head_dim = query.shape
    s_k = key.shape[0]
    q_pos = torch.empty(s_q, dtype=torch.long, device=query.device)  # [s_q] global positions
    for local_start, local_end, global_start in chunks:
        q_pos[local_start:local_end] = torch.arange(global_start,
                                                    global_start + local_end - local_start)
    k_pos = torch.arange(s_k, device=query.device)  # [s_k]
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, s_q, s_k]
    if doc_starts is not None:
        same = [(_document_ids(q_pos, starts)[:, None] == _document_ids(k_pos, starts)[None])
                for starts in doc_starts]
        allowed = allowed & torch.stack(same)  # [b, s_q, s_k]
    q = query.permute(1, 2, 0, 3)  # [b, np, s_q, hn]
    groups = heads // key.shape[2]
    k = key.permute(1, 2, 0, 3).repeat_interleave(groups, dim=1)  # [b, np, s_k, hn]
    v = value.permute(1, 2, 0, 3).repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [b, np, s_q, s_k]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    if dropout > 0.0:
        if fork_rng:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = F.dropout(probs, p=dropout)
        else:
            probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, v)  # [b, np, s_q, hn]
    return out.permute(2, 0, 1, 3).reshape(s_q, batch, heads * head_dim)
