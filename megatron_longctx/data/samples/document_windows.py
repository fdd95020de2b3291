"""Samples of one document each, for position-index transformations (PoSE, LongRecipe).

A transformed sample must not mix documents: its position ids span the target window as if it
were one long text. Documents of at least ``seq_length + 1`` tokens are cut into consecutive
windows (each ``seq_length`` inputs plus one label, sharing that token with the next window, as
packed samples do); sample ``i`` is window ``i mod W`` with positions from the transform seeded
by ``(seed, i)``, so a window seen again in a later epoch gets fresh positions. Shorter
documents are dropped, or with ``--pack-short`` packed as usual (untransformed) and
interleaved with the windows in proportion to their counts.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_longctx.data.formats.side_data import SideData, open_side_data
from megatron_longctx.data.samples.long_context_dataset import (
    PackedDataset,
    SampleOptions,
    build_sample,
)


def window_counts(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Windows of ``seq_length + 1`` tokens in each document (0 for short ones)."""
    return np.maximum((np.asarray(lengths, dtype=np.int64) - 1) // seq_length, 0)


class DocumentWindows(torch.utils.data.Dataset):
    """``num_samples`` transformed windows of the long documents among ``documents``."""

    def __init__(self, name: str, indexed, documents: np.ndarray, num_samples: int,
                 options: SampleOptions, loss_masks=None):
        """``loss_masks``: side data ``loss_mask`` of the documents (``--mask-prompt-loss``)."""
        s = options.seq_length
        lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)[documents]
        counts = window_counts(lengths, s)
        self.documents = documents[counts > 0]
        self.first = np.concatenate([[0], np.cumsum(counts[counts > 0])])  # [docs + 1]
        self.num_windows = int(self.first[-1])
        if self.num_windows == 0:
            raise ValueError(f"{name}: no document has the {s + 1} tokens a transformed sample "
                             f"needs (--position-transform uses single documents); lower "
                             f"--seq-length or give longer documents")
        self.indexed, self.options, self.num_samples = indexed, options, num_samples
        self.loss_masks = loss_masks

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        s, window = self.options.seq_length, int(i) % self.num_windows
        doc = int(np.searchsorted(self.first, window, side="right")) - 1
        offset = (window - int(self.first[doc])) * s
        tokens = self.indexed.get(int(self.documents[doc]), offset=offset, length=s + 1)
        tokens = tokens.astype(np.int64)  # [s + 1]
        positions = self.options.position_transform(tokens[:-1], int(i))
        document, trained = int(self.documents[doc]), None
        if self.loss_masks is not None:
            trained = self.loss_masks.get(document, offset=offset, length=s + 1)  # [s + 1]
        return build_sample(tokens, np.zeros(1, dtype=np.int64), self.options, positions,
                            trained)


class RecordedSamples(torch.utils.data.Dataset):
    """A dataset written as finished samples (``tools/select_long_samples.py``): every document
    is one sample of ``seq_length + 1`` tokens whose position ids are recorded as side data, so
    training reproduces the selection's transform exactly."""

    def __init__(self, prefix: str, indexed, doc_range: tuple[int, int], num_samples: int,
                 options: SampleOptions):
        lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)
        wrong = np.flatnonzero(lengths != options.seq_length + 1)
        if len(wrong):
            raise ValueError(f"{prefix}: its documents are finished samples with recorded "
                             f"position ids, of {lengths[wrong[0]] - 1} tokens (document "
                             f"{wrong[0]}), but --seq-length is {options.seq_length}; train "
                             f"with the --seq-length it was selected for")
        if options.position_transform is not None:
            raise ValueError(f"{prefix} carries recorded position ids; drop "
                             f"--position-transform (it would transform them again)")
        self.positions = SideData(prefix, "position_ids", lengths)
        self.indexed, self.options, self.num_samples = indexed, options, num_samples
        self.documents = np.arange(*doc_range, dtype=np.int64)
        if len(self.documents) == 0:
            raise ValueError(f"{prefix}: the split selects no documents; change --split")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        doc, s = int(self.documents[int(i) % len(self.documents)]), self.options.seq_length
        tokens = self.indexed.get(doc).astype(np.int64)  # [s + 1]
        positions = self.positions.get(doc, length=s).astype(np.int64)  # [s]
        return build_sample(tokens, np.zeros(1, dtype=np.int64), self.options, positions)


class WindowsAndPacked(torch.utils.data.Dataset):
    """``--pack-short``: per cycle of ``W + P`` samples, ``W`` windows then ``P`` packed samples
    of the short documents (``W``, ``P``: their counts in one pass over the documents)."""

    def __init__(self, windows: DocumentWindows, packed: PackedDataset, packed_per_epoch: int):
        self.windows, self.packed = windows, packed
        self.cycle = (windows.num_windows, packed_per_epoch)
        self.num_samples = windows.num_samples

    @staticmethod
    def packed_needed(num_samples: int, num_windows: int, packed_per_epoch: int) -> int:
        return (num_samples // (num_windows + packed_per_epoch) + 1) * packed_per_epoch

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        w, p = self.cycle
        cycle, j = divmod(int(i), w + p)
        return self.windows[cycle * w + j] if j < w else self.packed[cycle * p + j - w]


def transformed_source(name: str, prefix: str | None, indexed, doc_range: tuple[int, int],
                       num_samples: int, options: SampleOptions, seed: int, upsample=None,
                       cache_dir: str | None = None):
    """One source's samples under ``options.position_transform`` (``upsample`` and
    ``cache_dir``: of the short documents' packing)."""
    documents = np.arange(*doc_range, dtype=np.int64)
    masks = None if prefix is None else open_side_data(prefix, "loss_mask", indexed)
    windows = DocumentWindows(name, indexed, documents, num_samples, options, masks)
    if not options.pack_short:
        return windows
    per_epoch = short_samples_per_epoch(indexed, doc_range, options.seq_length)
    if per_epoch == 0:
        return windows
    packed = PackedDataset(prefix, doc_range, WindowsAndPacked.packed_needed(
        num_samples, windows.num_windows, per_epoch), options, seed, upsample, cache_dir,
        indexed, shorter_than=options.seq_length + 1)
    return WindowsAndPacked(windows, packed, per_epoch)


def epoch_samples(indexed, doc_range: tuple[int, int], options: SampleOptions) -> int:
    """Samples of one pass over ``doc_range`` under the transform: the weight of an unweighted
    source."""
    lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)[doc_range[0]:doc_range[1]]
    total = int(window_counts(lengths, options.seq_length).sum())
    if options.pack_short:
        total += short_samples_per_epoch(indexed, doc_range, options.seq_length)
    return total


def short_samples_per_epoch(indexed, doc_range: tuple[int, int], seq_length: int) -> int:
    """Packed samples of one pass over the documents too short for a window."""
    lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)[doc_range[0]:doc_range[1]]
    return max(int(lengths[lengths <= seq_length].sum()) - 1, 0) // seq_length
