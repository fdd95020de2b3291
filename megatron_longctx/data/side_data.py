"""Per-token side data of an indexed dataset (DECISIONS.md 6): arrays aligned token for token
with its documents, such as LongRecipe's recorded position ids or prompt loss masks.

Each kind is an indexed dataset of its own beside the data, ``{prefix}.side_{name}.bin/.idx``
(Megatron's format: its own small index, memory-mapped, written atomically by the same writer),
with one sequence per document of exactly the document's length. Dataset discovery (a directory
or glob as ``--data-path``, shard merging) skips these files.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_longctx.data.indexed_writer import IndexedDatasetWriter

SIDE_TAG = ".side_"
SIDE_DTYPES = {"position_ids": np.int32, "loss_mask": np.uint8}


def side_prefix(prefix: str, name: str) -> str:
    if name not in SIDE_DTYPES:
        raise ValueError(f"unknown side data {name!r}; known: {', '.join(SIDE_DTYPES)}")
    return f"{prefix}{SIDE_TAG}{name}"


def is_side_data(prefix: str) -> bool:
    """Whether a prefix found on disk is side data, not a dataset."""
    return SIDE_TAG in os.path.basename(prefix)


def has_side_data(prefix: str, name: str) -> bool:
    return os.path.exists(side_prefix(prefix, name) + ".idx")


def side_writer(prefix: str, name: str) -> IndexedDatasetWriter:
    """A writer for ``name`` beside ``prefix``: add one array per document, in order."""
    return IndexedDatasetWriter(side_prefix(prefix, name), dtype=SIDE_DTYPES[name])


class SideData:
    """``name`` of the dataset ``prefix``, checked against the dataset's document lengths."""

    def __init__(self, prefix: str, name: str, lengths: np.ndarray):
        # imported here: preprocessing imports this module and does not need torch
        from megatron_longctx.data.long_context_dataset import open_indexed

        path = side_prefix(prefix, name)
        self.indexed = open_indexed(path)
        own = np.asarray(self.indexed.sequence_lengths)
        if len(own) != len(lengths) or not np.array_equal(own, lengths):
            bad = len(own) if len(own) != len(lengths) else int(np.flatnonzero(own != lengths)[0])
            raise ValueError(f"{path}.idx does not match {prefix}.idx ({len(own)} vs "
                             f"{len(lengths)} documents, first difference at document {bad}): "
                             f"the side data belongs to another dataset; rewrite both together")

    def get(self, document: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.indexed.get(document, offset=offset, length=length)
