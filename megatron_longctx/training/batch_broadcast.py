"""Which ranks read a batch from disk, and how the others get their part of it.

Megatron-LM's ``get_batch_on_this_tp_rank``: TP rank 0 reads and broadcasts over its TP group,
and pipeline middle stages read nothing. What each stage needs differs from Megatron-LM because
our model computes its rotary tables from explicit ``position_ids`` in *every* stage (megatron-
core's from the length alone) and document-causal attention needs ``doc_starts`` in every layer:

    every stage:  position_ids [b, s/cp], doc_starts, rope_seq_len (+ documents: per-document CP)
    first stage:  + tokens [b, s/cp]                      (the embedding)
    last stage:   + labels, loss_mask [b, s/cp], source [b]  (the loss, by position and source)

A sample comes from disk whole, so TP rank 0 of the first and of the last stage each read the
micro-batches, keep their CP rank's slice of the fields their stage needs (:meth:`prepare`, in
the loader's workers when ``--num-workers`` > 0) and broadcast them over the TP group. With more
than two stages, the first stage's TP rank 0 also sends the every-stage fields down its pipeline
group (a few bytes per token), which middle stages' TP rank 0 pass on over their TP group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from megatron_longctx.model.context_parallel import slice_for_cp_rank
from megatron_longctx.model.document_partition import (
    lay_out,
    partition_documents,
    rank_sources,
)

FIRST_STAGE_ONLY = frozenset({"tokens"})
LAST_STAGE_ONLY = frozenset({"labels", "loss_mask", "source"})


def stage_needs(key: str, first: bool, last: bool) -> bool:
    """Whether a pipeline stage uses field ``key`` of a micro-batch (unknown fields: kept)."""
    if key in FIRST_STAGE_ONLY:
        return first
    if key in LAST_STAGE_ONLY:
        return last
    return True


def reads_from_disk(tp_rank: int, first: bool, last: bool) -> bool:
    """One rank per TP group reads, and only in the stages whose fields come from the samples
    (tokens: first; labels and loss mask: last); middle stages get theirs from the first."""
    return tp_rank == 0 and (first or last)


def local_fields(batch: dict, first: bool, last: bool, cp_rank: int, cp_size: int,
                 document_partition: bool = False) -> dict:
    """This stage's fields of a full micro-batch, per-token ones (``[b, s]``) cut to this CP
    rank's slice ``[b, s / cp]``; ``rope_seq_len`` is taken before the cut, since length-
    dependent RoPE needs the whole sequence's length.

    ``document_partition`` (CP > 1, packed documents): the slice is this rank's part of every
    document (:mod:`..model.document_partition`); ``doc_starts`` become slot positions and
    ``documents`` holds each sample's layout."""
    out = {"rope_seq_len": int(batch["position_ids"].max()) + 1}
    layouts = None
    if document_partition and cp_size > 1:
        s = batch["position_ids"].shape[1]
        layouts = [partition_documents(starts, s, cp_size) for starts in batch["doc_starts"]]
        sources = rank_sources(layouts, cp_rank)  # [b, s / cp]
        out["documents"] = layouts
    for key, value in batch.items():
        if not stage_needs(key, first, last):
            continue
        if layouts is not None and key == "doc_starts":
            value = [layout.mask_starts() for layout in layouts]
        elif isinstance(value, Tensor) and value.dim() >= 2:
            value = (slice_for_cp_rank(value, cp_rank, cp_size) if layouts is None
                     else lay_out(value, sources, fill=0)).contiguous()
        out[key] = value
    return out


def broadcast_micro_batches(micro: list[dict] | None, src: int, group) -> list[dict]:
    """The micro-batches of global rank ``src`` (``None`` elsewhere) on every rank of ``group``:
    one object broadcast for the non-tensor fields and the tensors' shapes, then one broadcast
    per tensor field with all micro-batches stacked (``[n, ...]``), not one per micro-batch."""
    device = torch.cuda.current_device()  # the CPU on CPU machines (cpu_adapter)
    sending = dist.get_rank() == src
    stacked: dict[str, Tensor] = {}
    header: list = [None, None]
    if sending:
        stacked = {k: torch.stack([b[k] for b in micro]).to(device)
                   for k, v in micro[0].items() if isinstance(v, Tensor)}
        header = [[{k: v for k, v in b.items() if k not in stacked} for b in micro],
                  {k: (tuple(t.shape), t.dtype) for k, t in stacked.items()}]
    dist.broadcast_object_list(header, src=src, group=group)
    objects, specs = header
    out = [dict(o) for o in objects]
    for key, (shape, dtype) in specs.items():
        t = stacked[key] if sending else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=src, group=group)
        for batch, part in zip(out, t.unbind(0)):
            batch[key] = part
    return out


class StageBatches:
    """This rank's part of each micro-batch, under the current megatron-core groups."""

    def __init__(self, document_partition: bool = False):
        ps = parallel_state
        self.document_partition = document_partition
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.cp_size = ps.get_context_parallel_world_size()
        self.reads = reads_from_disk(self.tp_rank, self.first, self.last)

    def prepare(self, batch: dict) -> dict:
        """A collated micro-batch cut to this stage's fields and CP slice (reading ranks)."""
        return local_fields(batch, self.first, self.last, self.cp_rank, self.cp_size,
                            self.document_partition)

    def micro_batches(self, read: Callable[[], list[dict]]) -> list[dict]:
        """``read()`` (prepared micro-batches) is called on reading ranks only; every rank
        returns its stage's micro-batches. Collective over the TP (and pipeline) group."""
        ps = parallel_state
        micro = read() if self.reads else None
        if self.pp_size > 2 and self.tp_rank == 0:
            shared = None
            if self.first:
                shared = [{k: v for k, v in b.items() if stage_needs(k, False, False)}
                          for b in micro]
            shared = broadcast_micro_batches(shared, ps.get_pipeline_model_parallel_first_rank(),
                                             ps.get_pipeline_model_parallel_group())
            if not (self.first or self.last):
                micro = shared
        if self.tp_size > 1:
            micro = broadcast_micro_batches(micro, ps.get_tensor_model_parallel_src_rank(),
                                            ps.get_tensor_model_parallel_group())
        return micro
