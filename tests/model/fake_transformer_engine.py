"""Transformer Engine's attention contract, computed with torch, for CPU tests of the code that
calls it (no GPU or TE on CI): megatron-core's ``TEDotProductAttention`` as our core attention
builds and calls it, including the packed (THD) format with context parallelism.

Written from TE's documentation and kernels, independently of ``megatron_longctx``:
``te_partitioned_indices`` transcribes ``thd_partition_indices_kernel``; THD attention is
causal within each sequence ``i``, whose ``cu_seqlens[i + 1] - cu_seqlens[i]`` tokens start at
slot ``cu_seqlens_padded[i]`` of the pack (global slots; under CP each rank holds its
partitioned indices of them, and TE exchanges keys/values itself).
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state


def te_partitioned_indices(cu_seqlens_padded, total_tokens, world_size, rank) -> list[int]:
    """TransformerEngine's ``thd_partition_indices_kernel``, one token at a time."""
    local_cu = [n // world_size for n in cu_seqlens_padded]
    out = []
    for token in range(total_tokens // world_size):
        seq = bisect.bisect_right(local_cu, token) - 1
        seq_len = local_cu[seq + 1] - local_cu[seq]
        index = token - local_cu[seq]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + local_cu[seq] * world_size + seq_len // 2 * offset)
    return out


class _AllGather(torch.autograd.Function):
    """Rank-major concatenation of every rank's tensor; backward: the summed gradient of our
    part (every rank uses the gathered tensor)."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


class FakeTEAttention(torch.nn.Module):
    """``sbhd``: causal attention (output zeros: only the call is recorded); ``thd``:
    ``q [t, np, hn]``, ``k/v [t, ng, hn]`` -> ``[t, np * hn]`` as described above."""

    calls: list = []

    def __init__(self, **kwargs):
        super().__init__()
        self.calls.append(("init", kwargs["cp_comm_type"], kwargs["attn_mask_type"]))
        pg = kwargs.get("pg_collection")
        self.cp_group = getattr(pg, "cp", None)

    def forward(self, q, k, v, mask, attn_mask_type=None, packed_seq_params=None):
        if packed_seq_params is None:
            self.calls.append(("forward", attn_mask_type))
            return torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
        p = packed_seq_params
        self.calls.append(("thd", attn_mask_type, p.qkv_format))
        assert p.cu_seqlens_q.dtype == torch.int32 and torch.equal(p.cu_seqlens_q,
                                                                   p.cu_seqlens_kv)
        real, padded = p.cu_seqlens_q.tolist(), p.cu_seqlens_q_padded.tolist()
        group = self.cp_group or parallel_state.get_context_parallel_group()
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        assert padded[-1] == q.shape[0] * cp
        if cp > 1:  # the whole pack in slot order from every rank's partitioned indices
            order = torch.tensor([i for r in range(cp)
                                  for i in te_partitioned_indices(padded, padded[-1], cp, r)])
            slots = torch.empty_like(order)
            slots[order] = torch.arange(len(order))
            q, k, v = (_AllGather.apply(t, group)[slots] for t in (q, k, v))
        out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2])
        for i, start in enumerate(padded[:-1]):
            rows = slice(start, start + real[i + 1] - real[i])
            assert max(real[i + 1] - real[i], padded[i + 1] - start) <= p.max_seqlen_q
            one = [t[rows].transpose(0, 1)[None] for t in (q, k, v)]  # [1, h, n, d]
            o = F.scaled_dot_product_attention(*one, is_causal=True, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1).reshape(o.shape[2], -1)
        if cp > 1:
            out = out[torch.tensor(te_partitioned_indices(padded, padded[-1], cp, rank))]
        return out


def install(monkeypatch_setattr) -> list:
    """Make Transformer Engine "usable" with :class:`FakeTEAttention`, the local layers
    around it (TE's own layers cannot be built without it); returns the call record.
    ``monkeypatch_setattr``: pytest's ``MonkeyPatch.setattr`` (undone after the test)."""
    from megatron_longctx.model import gpu_kernels, layer_spec

    FakeTEAttention.calls = []
    monkeypatch_setattr(gpu_kernels, "transformer_engine_attention", lambda: FakeTEAttention)
    monkeypatch_setattr(layer_spec, "transformer_engine_spec_provider", lambda: None)
    return FakeTEAttention.calls
