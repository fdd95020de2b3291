"""One ``--data-path`` entry naming several datasets (DECISIONS.md 5): a directory (every dataset
in it) or a glob of prefixes, typically the shards of a sharded preprocessing run, read as one
virtual concatenation in sorted order. Those are the documents, in the order, that
``tools/merge_datasets.py`` writes, so training on the entry gives the samples of the merged
dataset without merging. An unfinished shard set is refused, as the merge refuses it.
"""

from __future__ import annotations

import glob
import os

import numpy as np


def names_several(entry: str) -> bool:
    """Whether a ``--data-path`` entry is a directory or a glob rather than one prefix."""
    return os.path.isdir(entry) or glob.has_magic(entry)


def expand_entry(entry: str) -> list[str]:
    """The dataset prefixes of a directory or glob entry, sorted, checked as a shard set."""
    from megatron_longctx.data.preprocessing.shards import check_shard_set, resolve_prefixes

    try:
        prefixes = resolve_prefixes([entry])
    except ValueError as err:
        raise ValueError(f"--data-path {entry}: {err}".replace("--input ", "")) from None
    check_shard_set(prefixes)
    return prefixes


class ConcatenatedDataset:
    """Several indexed datasets as one: the interface the sample builders use
    (``sequence_lengths``, ``get(document, offset, length)``)."""

    def __init__(self, entry: str, parts: list):
        self.entry, self.parts = entry, parts
        lengths = [np.asarray(p.sequence_lengths) for p in parts]
        self.sequence_lengths = np.concatenate(lengths)  # [documents of all parts]
        self.first = np.cumsum([0] + [len(x) for x in lengths])  # [parts + 1]

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, document: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        part = int(np.searchsorted(self.first, document, side="right")) - 1
        return self.parts[part].get(int(document - self.first[part]), offset=offset,
                                    length=length)


def cache_name(entry: str) -> str:
    """A file-name-safe stand-in for an entry in cache file names."""
    name = os.path.basename(os.path.normpath(entry)) or "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
