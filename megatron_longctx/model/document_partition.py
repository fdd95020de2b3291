"""Context parallelism that splits every packed *document*, not the whole sample.

The sample-level layout (:mod:`.context_parallel`) gives CP rank ``r`` chunks ``r`` and
``2 cp - 1 - r`` of the whole sequence: balanced for one causal document, but with packed
documents the attention work of a chunk depends on where the documents fall. Transformer
Engine's packed (THD) format with CP instead cuts *each document* into ``2 cp`` chunks and gives
rank ``r`` chunks ``r`` and ``2 cp - 1 - r`` of every document (``thd_get_partitioned_indices``),
which balances any packing and is the layout TE's own CP exchange expects.

Each document must then span a multiple of ``2 cp`` slots: we lay the sample out again with
every document padded to that multiple (``cu_seqlens_padded`` in TE's words), keeping the
sample length ``s``. The padding pushes the sample's last tokens out: at most ``2 cp - 1`` per
document (0.043% of the tokens of packed 128k samples at CP=8 in
``benchmarks/results/cp_balance.md``), never trained on, exactly as if their loss were
masked. Padding slots get loss mask 0 and attend only among themselves (each run of padding is
its own "document" for our kernels, outside ``cu_seqlens`` for TE's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DocumentLayout:
    """One sample laid out for per-document CP: document ``i`` occupies slots
    ``[starts[i], starts[i] + padded[i])`` of which the first ``lengths[i]`` hold its tokens
    (original positions ``[sources[i], sources[i] + lengths[i])``), the rest padding."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    sources: tuple[int, ...]
    seq_length: int
    cp_size: int

    @property
    def padded(self) -> tuple[int, ...]:
        ends = (*self.starts[1:], self.seq_length)
        return tuple(b - a for a, b in zip(self.starts, ends))

    @property
    def kept_tokens(self) -> int:
        return sum(self.lengths)

    def source_index(self) -> Tensor:
        """``[s]`` int64: the original position of each slot's token, -1 for padding."""
        index = torch.full((self.seq_length,), -1, dtype=torch.long)
        for start, length, source in zip(self.starts, self.lengths, self.sources):
            index[start:start + length] = torch.arange(source, source + length)
        return index

    def mask_starts(self) -> list[int]:
        """Document starts in slot coordinates, each run of padding a document of its own
        (causality already hides it from real tokens; this keeps padding rows, whose loss is
        masked, from attending to a whole document)."""
        starts = []
        for start, length, padded in zip(self.starts, self.lengths, self.padded):
            starts.append(start)
            if length < padded:
                starts.append(start + length)
        return starts

    def rank_chunks(self, cp_rank: int) -> list[tuple[int, int, int]]:
        """``(local_start, local_end, global_start)`` of rank ``cp_rank``'s slot runs, in the
        order its local tensor holds them: per document, chunk ``r`` then ``2 cp - 1 - r``."""
        chunks, local = [], 0
        for start, padded in zip(self.starts, self.padded):
            c = padded // (2 * self.cp_size)
            for chunk in (cp_rank, 2 * self.cp_size - 1 - cp_rank):
                chunks.append((local, local + c, start + chunk * c))
                local += c
        return chunks

    def rank_slots(self, cp_rank: int) -> Tensor:
        """``[s / cp]`` int64: the slots rank ``cp_rank`` holds, in its local order."""
        return torch.cat([torch.arange(g, g + end - begin)
                          for begin, end, g in self.rank_chunks(cp_rank)])


def partition_documents(doc_starts: list[int], seq_length: int, cp_size: int
                        ) -> DocumentLayout:
    """The per-document layout of a sample whose documents start at ``doc_starts`` (sorted,
    from 0): documents in order, each padded to a multiple of ``2 cp_size`` slots, until the
    ``seq_length`` slots are full (the last document kept gets the remaining slots). Without
    CP (``cp_size`` 1) the layout is the sample itself: TE's THD format needs no padding."""
    unit = 2 * cp_size if cp_size > 1 else 1  # one rank: the sample as it is
    if seq_length % unit:
        raise ValueError(f"sequence length {seq_length} is not a multiple of 2 * CP = {unit}")
    if not doc_starts or doc_starts[0] != 0 or any(
            b <= a for a, b in zip(doc_starts, doc_starts[1:])) or doc_starts[-1] >= seq_length:
        raise ValueError(f"document starts {doc_starts} must increase from 0 and stay below "
                         f"{seq_length}")
    ends = [*doc_starts[1:], seq_length]
    starts, lengths, sources = [], [], []
    slot = 0
    for source, end in zip(doc_starts, ends):
        if slot >= seq_length:
            break
        length = min(end - source, seq_length - slot)
        starts.append(slot)
        lengths.append(length)
        sources.append(source)
        slot += -(-length // unit) * unit
    return DocumentLayout(tuple(starts), tuple(lengths), tuple(sources), seq_length, cp_size)


def rank_sources(layouts: list[DocumentLayout], cp_rank: int) -> Tensor:
    """``[b, s / cp]`` int64: the original position of each of rank ``cp_rank``'s slots in
    each sample's layout, -1 for padding (one index for every field of a micro-batch)."""
    return torch.stack([layout.source_index()[layout.rank_slots(cp_rank)]
                        for layout in layouts])


def lay_out(values: Tensor, sources: Tensor, fill: float | int) -> Tensor:
    """``values [b, s, ...]`` (whole samples) -> ``[b, s / cp, ...]``: the tokens at
    ``sources`` (:func:`rank_sources`), padding slots set to ``fill``."""
    local = torch.stack([sample[index.clamp(min=0)] for sample, index in zip(values, sources)])
    local[sources < 0] = fill
    return local


def thd_cu_seqlens(layouts: list[DocumentLayout]) -> tuple[list[int], list[int]]:
    """TE's ``(cu_seqlens, cu_seqlens_padded)`` for a micro-batch packed as one THD sequence
    (sample after sample): cumulative real lengths of the documents, and their slot starts."""
    real, padded = [0], [0]
    for layout in layouts:
        for length, slots in zip(layout.lengths, layout.padded):
            real.append(real[-1] + length)
            padded.append(padded[-1] + slots)
    return real, padded


def gathered_to_global(layouts: list[DocumentLayout], device) -> Tensor:
    """``[s * b]`` int64: for each (slot, sample), in ``[s, b]`` order, its row in the
    rank-major all-gather of the local ``[s / cp, b]`` tensors, flattened the same way.
    Cached: every layer's key and value gathers of a micro-batch use the same index."""
    return _gathered_to_global(tuple(layouts), torch.device(device))


def global_to_local(layouts: list[DocumentLayout], cp_rank: int, device) -> Tensor:
    """``[s / cp * b]`` int64: for each local (row, sample), its row in the flattened global
    ``[s, b]`` tensor (cached as :func:`gathered_to_global`)."""
    return _global_to_local(tuple(layouts), cp_rank, torch.device(device))


@functools.lru_cache(maxsize=8)
def _gathered_to_global(layouts: tuple[DocumentLayout, ...], device: torch.device) -> Tensor:
    cp = layouts[0].cp_size
    s, b = layouts[0].seq_length, len(layouts)
    local = s // cp
    where = torch.empty(s, b, dtype=torch.long)
    for j, layout in enumerate(layouts):
        for rank in range(cp):
            where[layout.rank_slots(rank), j] = torch.arange(rank * local, (rank + 1) * local)
    return (where * b + torch.arange(b)).reshape(-1).to(device)


@functools.lru_cache(maxsize=8)
def _global_to_local(layouts: tuple[DocumentLayout, ...], cp_rank: int, device: torch.device
                     ) -> Tensor:
    b = len(layouts)
    slots = torch.stack([layout.rank_slots(cp_rank) for layout in layouts], dim=1)  # [s/cp, b]
    return (slots * b + torch.arange(b)).reshape(-1).to(device)
