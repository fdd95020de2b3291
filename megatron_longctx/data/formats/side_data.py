"""Per-token side data of an indexed dataset (DECISIONS.md 6): arrays aligned token for token
with its documents, such as LongRecipe's recorded position ids or prompt loss masks.

Each kind is an indexed dataset of its own beside the data, ``{prefix}.side_{name}.bin/.idx``
(Megatron's format: its own small index, memory-mapped, written atomically by the same writer),
with one sequence per document of exactly the document's length. Dataset discovery (a directory
or glob as ``--data-path``, shard merging) skips these files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from megatron_longctx.data.formats import dataset_check
from megatron_longctx.data.formats.indexed_format import bin_path, idx_path
from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
from megatron_longctx.data.formats.shard_concat import (
    ConcatenatedDataset,
    expand_entry,
    names_several,
)

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


def remove_side_data(prefix: str, name: str) -> None:
    """Delete ``name`` beside ``prefix`` (``.idx`` first: a half-removed one does not load)."""
    path = side_prefix(prefix, name)
    for file in (idx_path(path), bin_path(path)):
        if os.path.exists(file):
            os.remove(file)
    dataset_check.remove_record(path)


def publish_with_side_data(datasets: Mapping[str, IndexedDatasetWriter],
                           sides: Mapping[str, Mapping[str, IndexedDatasetWriter]]) -> None:
    """Publish ``datasets`` (key -> writer) with their side data (name -> key -> writer).

    Every writer is prepared first, so a failure publishes nothing; each dataset's side data
    are published before it, so a dataset never appears without them; a dataset written without
    some kind of side data loses that kind left beside its prefix by an earlier run (it would
    otherwise be read with the new data).
    """
    for writer in [*(w for kind in sides.values() for w in kind.values()), *datasets.values()]:
        writer.prepare()
    for key, writer in datasets.items():
        for name in SIDE_DTYPES:
            side = sides.get(name, {}).get(key)
            if side is not None:
                side.publish()
            else:
                remove_side_data(writer.prefix, name)
        writer.publish()


def open_side_data(entry: str, name: str, indexed):
    """``name`` of the ``--data-path`` entry opened as ``indexed`` (one dataset, or a directory
    or glob of shards: theirs concatenated likewise), or None when it has none."""
    if not names_several(entry):
        if not has_side_data(entry, name):
            return None
        return SideData(entry, name, np.asarray(indexed.sequence_lengths))
    prefixes = expand_entry(entry)
    have = [has_side_data(p, name) for p in prefixes]
    if not any(have):
        return None
    if not all(have):
        missing = prefixes[have.index(False)]
        raise ValueError(f"--data-path {entry}: {sum(have)} of its {len(prefixes)} datasets "
                         f"have {name} side data but {missing} has none; preprocess every "
                         f"part the same way (e.g. all with --mask-prompt-loss)")
    return ConcatenatedDataset(entry, [SideData(p, name, np.asarray(part.sequence_lengths))
                                       for p, part in zip(prefixes, indexed.parts)])


class SideData:
    """``name`` of the dataset ``prefix``, checked against the dataset's document lengths."""

    def __init__(self, prefix: str, name: str, lengths: np.ndarray):
        # imported here: preprocessing imports this module and does not need torch
        from megatron_longctx.data.samples.long_context_dataset import open_indexed

        path = side_prefix(prefix, name)
        self.indexed = open_indexed(path)
        own = np.asarray(self.indexed.sequence_lengths)
        if len(own) != len(lengths) or not np.array_equal(own, lengths):
            bad = len(own) if len(own) != len(lengths) else int(np.flatnonzero(own != lengths)[0])
            raise ValueError(f"{path}.idx does not match {prefix}.idx ({len(own)} vs "
                             f"{len(lengths)} documents, first difference at document {bad}): "
                             f"the side data belongs to another dataset; rewrite both together")

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.indexed.sequence_lengths

    def get(self, document: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.indexed.get(document, offset=offset, length=length)
