"""A dataset of several sequences per document (Megatron-LM's ``--split-sentences`` output,
``{prefix}_{key}_sentence``) read as whole documents.

Packing, ``--split`` and document masks work on documents, and a document's sequences are
contiguous in the ``.bin`` (the ``.idx``'s document indices say which sequences each document
holds), so document ``d`` is simply its sequences' tokens read in one go. The sample builders
see the interface of megatron-core's ``IndexedDataset`` with one sequence per document:
``sequence_lengths`` (per document) and ``get(document, offset, length)``.
"""

from __future__ import annotations

import numpy as np


class WholeDocuments:
    """``indexed`` (megatron-core's ``IndexedDataset``) with each document as one sequence."""

    def __init__(self, indexed):
        self.indexed = indexed
        bounds = np.asarray(indexed.document_indices, dtype=np.int64)  # [documents + 1]
        ends = np.zeros(len(indexed.sequence_lengths) + 1, dtype=np.int64)
        np.cumsum(indexed.sequence_lengths, out=ends[1:])  # tokens before each sequence
        lengths = ends[bounds[1:]] - ends[bounds[:-1]]
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document of 2**31 tokens or more cannot be packed")
        # one int32 per document, as the .idx stores one per sequence (not an int64 copy)
        self.sequence_lengths = lengths.astype(np.int32)  # [documents]
        self.first = bounds[:-1]  # [documents] first sequence of each

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, document: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        total = int(self.sequence_lengths[document])
        length = total - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > total:
            raise IndexError(f"tokens [{offset}, {offset + length}) of document {document} "
                             f"of {total} tokens")
        if length == 0:
            return self.indexed.get(0, length=0)
        # megatron-core's get reads ``length`` tokens from the sequence's start + offset,
        # running on into the document's next sequences, which follow it in the .bin
        return self.indexed.get(int(self.first[document]), offset=offset, length=length)
