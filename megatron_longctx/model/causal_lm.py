"""``CausalLM``: our GPT stage(s) as a plain causal LM for evaluation and generation.

Whatever the layout, every rank gets the same full-vocabulary logits: TP shards are gathered,
CP chunks are gathered back into sequence order (sequences are padded at the end to a multiple
of ``2 * cp``; causal attention keeps padding from changing earlier positions), and with PP the
last stage broadcasts. Generation prefills with TP and CP and decodes with TP (PP is refused).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch import Tensor

from megatron_longctx.config import ModelConfig
from megatron_longctx.model.context_parallel import chunk_ids, slice_for_cp_rank
from megatron_longctx.model.gpt import LongContextGPTModel
from megatron_longctx.model.kv_cache import KVCache
from megatron_longctx.rope import RotaryEmbedding


class CausalLM(torch.nn.Module):
    """``model(input_ids [b, s], position_ids=None) -> logits [b, s, vocab]`` (fp32-exact
    logits of every vocabulary entry, padding rows dropped; computed without autograd when
    PP > 1 or CP > 1)."""

    def __init__(self, gpt: LongContextGPTModel, model_cfg: ModelConfig):
        super().__init__()
        self.gpt, self.config = gpt, model_cfg

    def set_rope_parameters(self, rope_parameters: dict) -> None:
        """The same weights under other RoPE settings (LongRoPE search, method comparisons):
        a new rotary module for this rank's heads, validated now."""
        old = self.gpt.rotary
        self.gpt.rotary = RotaryEmbedding(
            rope_parameters, old.head_dim, old.num_attention_heads, old.num_query_groups,
            old.rotary_percent, old.max_position_embeddings, old.tp_rank, old.tp_size,
        ).to(old.inv_freq_q.device)
        self.config = dataclasses.replace(self.config, rope_parameters=dict(rope_parameters))

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                rope_seq_len: int | None = None) -> Tensor:
        """``rope_seq_len``: the length length-dependent RoPE types (dynamic, LongRoPE) see;
        default ``max(position_ids) + 1``, as a single unsplit forward would."""
        if position_ids is None:
            position_ids = _arange_like(input_ids, 0)
        rope_seq_len = rope_seq_len or int(position_ids.max()) + 1
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            return self._stages(input_ids, position_ids, rope_seq_len)
        with torch.no_grad():
            s = input_ids.shape[1]
            local = self._stages(*_split_for_cp(input_ids, position_ids), rope_seq_len)
            return _gather_cp(local)[:, :s]

    @torch.no_grad()
    def next_token_logits(self, input_ids: Tensor, cache: KVCache, rope_seq_len: int) -> Tensor:
        """Run ``input_ids [b, s]`` (the tokens after the ``cache.offset`` cached ones) through
        the model, caching their keys/values; logits ``[b, vocab]`` of the token after them.
        ``rope_seq_len``: the final length of the generation (see :mod:`.kv_cache`)."""
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("generation runs with --pipeline-model-parallel-size 1 "
                             "(TP and CP are supported)")
        s = input_ids.shape[1]
        position_ids = _arange_like(input_ids, cache.offset)
        cp = parallel_state.get_context_parallel_world_size()
        if cache.offset > 0 or cp == 1:  # decode: the new tokens are replicated on CP ranks
            logits = self._last_logits(input_ids, position_ids, cache, rope_seq_len, s - 1)
        else:  # prefill split across CP ranks; the rank holding the last token broadcasts
            ids, pos = _split_for_cp(input_ids, position_ids)
            owner, index = _cp_owner(s - 1, ids.shape[1], cp)
            mine = parallel_state.get_context_parallel_rank() == owner
            logits = self._last_logits(ids, pos, cache, rope_seq_len, index if mine else 0)
            group = parallel_state.get_context_parallel_group()
            dist.broadcast(logits, src=dist.get_global_rank(group, owner), group=group)
        cache.offset += s  # CP padding beyond the prompt is overwritten by the next tokens
        return logits

    def _last_logits(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache,
                     rope_seq_len: int, index: int) -> Tensor:
        """Logits ``[b, vocab]`` of local position ``index`` only: the output layer sees one
        position (a 128k prompt's full logits would not fit)."""
        def one_position(module, args, kwargs):
            return (args[0][index:index + 1], *args[1:]), kwargs  # hidden [1, b, h]

        hook = self.gpt.output_layer.register_forward_pre_hook(one_position, with_kwargs=True)
        try:
            out = self.gpt(input_ids, position_ids, None, rope_seq_len=rope_seq_len,
                           kv_cache=cache)  # [b, 1, vocab / tp]
        finally:
            hook.remove()
        return self._logits(out)[:, 0].contiguous()

    def _stages(self, input_ids: Tensor, position_ids: Tensor, rope_seq_len: int) -> Tensor:
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return self._logits(self.gpt(input_ids, position_ids, None,
                                         rope_seq_len=rope_seq_len))
        with torch.no_grad():
            return self._pipelined(input_ids, position_ids, rope_seq_len)

    def _logits(self, local: Tensor) -> Tensor:  # [b, s, padded_vocab / tp]
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        return full[..., :self.config.vocab_size]

    def _pipelined(self, input_ids: Tensor, position_ids: Tensor, rope_seq_len: int) -> Tensor:
        """Stage by stage: hidden states ``[s, b, h]`` go to the next stage; the last stage's
        logits are broadcast to every stage."""
        b, s = input_ids.shape
        dtype = self.gpt.config.params_dtype
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(s, b, self.config.hidden_size, dtype=dtype,
                                 device=input_ids.device)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.gpt.set_input_tensor(hidden)
        out = self.gpt(input_ids, position_ids, None, rope_seq_len=rope_seq_len)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(),
                      dst=parallel_state.get_pipeline_model_parallel_next_rank())
            logits = torch.empty(b, s, self.config.vocab_size, dtype=dtype,
                                 device=input_ids.device)
        else:
            logits = self._logits(out).contiguous()
        dist.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return logits


def _arange_like(input_ids: Tensor, start: int) -> Tensor:
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
    return positions[None].expand_as(input_ids)


def _split_for_cp(input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Pad ``[b, s]`` at the end to a multiple of ``2 cp`` (positions continuing), then keep
    this CP rank's two chunks."""
    cp = parallel_state.get_context_parallel_world_size()
    rank = parallel_state.get_context_parallel_rank()
    pad = -input_ids.shape[1] % (2 * cp)
    if pad:
        input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(-1, pad)], dim=1)
        last = position_ids[:, -1:]
        position_ids = torch.cat([position_ids, last + _arange_like(last.expand(-1, pad), 1)],
                                 dim=1)
    return slice_for_cp_rank(input_ids, rank, cp), slice_for_cp_rank(position_ids, rank, cp)


def _cp_owner(position: int, local_len: int, cp: int) -> tuple[int, int]:
    """(CP rank, local index) of a global sequence position."""
    chunk_len = local_len // 2
    chunk = position // chunk_len
    for rank in range(cp):
        first, second = chunk_ids(rank, cp)
        if chunk in (first, second):
            return rank, (0 if chunk == first else chunk_len) + position % chunk_len
    raise ValueError(f"position {position} is beyond the sequence")


def _gather_cp(local: Tensor) -> Tensor:
    """``[b, 2C, ...]`` of every CP rank -> ``[b, 2 cp C, ...]`` in sequence order."""
    cp = parallel_state.get_context_parallel_world_size()
    group = parallel_state.get_context_parallel_group()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    chunks = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = chunk_ids(rank, cp)
        chunks[first], chunks[second] = part.chunk(2, dim=1)
    return torch.cat(chunks, dim=1)
