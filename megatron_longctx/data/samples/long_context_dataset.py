"""Long-context training samples from Megatron indexed datasets (``.bin``/``.idx``).

Documents are packed into ``seq_length``-token samples (131072 and beyond); every sample
carries its document starts so that training can reset position ids, restrict attention to
each document (never with a dense ``s x s`` mask), and mask the loss after EOD. Each source is
optionally length-upsampled; its sample index is built once (rank 0), cached beside the data
and reused. Sources are blended in :mod:`.blended_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.data.formats.dataset_check import validated_dataset_info
from megatron_longctx.data.formats.shard_concat import (
    ConcatenatedDataset,
    cache_name,
    expand_entry,
    names_several,
)
from megatron_longctx.data.formats.side_data import open_side_data
from megatron_longctx.data.samples import packing


@dataclass(frozen=True)
class SampleOptions:
    seq_length: int
    eod: int
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
    # (input tokens [s], sample index) -> positions [s]: --position-transform; its samples are
    # single-document windows (document_windows.py)
    position_transform: Callable[[np.ndarray, int], np.ndarray] | None = None
    pack_short: bool = False  # with a transform: pack documents too short for a window


def open_indexed(prefix: str):
    """megatron-core's reader, after our full validation (once per dataset, then kept in its
    check record: ``dataset_check``), whose errors name the file and the fix. A dataset of
    several sequences per document (``--split-sentences``) is read as whole documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_longctx.data.formats.whole_documents import WholeDocuments

    if names_several(prefix):  # a directory or glob: its shards as one dataset
        return ConcatenatedDataset(prefix, [open_indexed(p) for p in expand_entry(prefix)])
    info = validated_dataset_info(prefix)
    if info.num_sequences != info.num_documents:
        return WholeDocuments(IndexedDataset(prefix))
    return IndexedDataset(prefix)


class PackedDataset(torch.utils.data.Dataset):
    """One source: ``num_samples`` packed samples from documents ``[doc_range)`` of ``prefix``."""

    def __init__(self, prefix: str | None, doc_range: tuple[int, int], num_samples: int,
                 options: SampleOptions, seed: int, upsample: tuple[int, float] | None = None,
                 cache_dir: str | None = None, indexed=None, shorter_than: int | None = None):
        """``prefix`` None: ``indexed`` is in-memory (mock) documents, indexed without a
        cache. ``shorter_than``: only the documents of fewer tokens (``--pack-short``)."""
        self.prefix, self.options, self.doc_range = prefix, options, tuple(doc_range)
        self.indexed = indexed if indexed is not None else open_indexed(prefix)
        # the .idx's memory map as it is (no per-rank int64 copy of every document's length)
        self.lengths = np.asarray(self.indexed.sequence_lengths)
        # --mask-prompt-loss data: which tokens are trained on (side data beside the dataset)
        self.loss_masks = None if prefix is None else \
            open_side_data(prefix, "loss_mask", self.indexed)
        documents = np.arange(*doc_range, dtype=np.int64)
        if shorter_than is not None:
            documents = documents[self.lengths[documents] < shorter_than]
        if len(documents) == 0:
            raise ValueError(f"{prefix}: the split selects no documents; change --split")
        if prefix is None:
            arrays = self._build(documents, num_samples, seed, upsample)
        else:
            key = dict(prefix=os.path.abspath(prefix), docs=list(doc_range),
                       samples=num_samples, seq=options.seq_length, seed=seed,
                       upsample=upsample, **_index_identity(prefix),
                       **({"shorter_than": shorter_than} if shorter_than else {}))
            arrays = _cached(cache_dir or os.path.dirname(os.path.abspath(prefix)), key,
                             lambda: self._build(documents, num_samples, seed, upsample))
        # cached: memory maps, of which each rank pages in only what its samples touch
        self.order, self.index = arrays["order"], arrays["index"]
        self.ordered_lengths = arrays["ordered_lengths"]
        self.num_samples = num_samples

    def _build(self, documents, num_samples, seed, upsample) -> dict[str, np.ndarray]:
        s = self.options.seq_length
        lengths = np.asarray(self.lengths, dtype=np.int64)
        order = packing.document_order(documents, lengths, num_samples * s + 1, seed, upsample)
        ordered_lengths = lengths[order]  # [len(order)]
        return {"order": order, "ordered_lengths": ordered_lengths,
                "index": packing.sample_index(ordered_lengths, s, num_samples)}  # [n + 1, 2]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        pieces = packing.sample_documents(self.order, self.ordered_lengths, self.index, int(i),
                                          self.options.seq_length)
        tokens = np.concatenate([self.indexed.get(d, offset=o, length=n) for d, o, n in pieces])
        starts = np.cumsum([0] + [n for _, _, n in pieces[:-1]])  # document starts in sample
        trained = None if self.loss_masks is None else np.concatenate(
            [self.loss_masks.get(d, offset=o, length=n) for d, o, n in pieces])  # [s + 1]
        return build_sample(tokens.astype(np.int64), starts, self.options, trained=trained)


def build_sample(tokens: np.ndarray, doc_starts: np.ndarray, options: SampleOptions,
                 positions: np.ndarray | None = None, trained: np.ndarray | None = None) -> dict:
    """Inputs, labels, loss mask, position ids and document starts of one packed sample.

    tokens: ``[s + 1]``; doc_starts: starts of the documents within it (first is 0);
    positions: ``[s]`` given position ids (a transformed or recorded sample); trained:
    ``[s + 1]`` 0 for tokens not to learn (side data ``loss_mask``: prompt tokens).
    """
    s = options.seq_length
    inputs, labels = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    starts = [int(x) for x in doc_starts if x < s]
    loss_mask = torch.ones(s, dtype=torch.float32)
    if options.eod_mask_loss:
        loss_mask[inputs == options.eod] = 0.0  # do not predict across a document end
    if trained is not None:  # a label's mask is its token's: tokens[1:]
        loss_mask *= torch.from_numpy(np.asarray(trained[1:], dtype=np.float32))
    if positions is not None:
        position_ids = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    elif options.reset_position_ids:
        bounds = starts + [s]
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    else:
        position_ids = torch.arange(s)
    return {"tokens": inputs, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "doc_starts": starts}


def _index_identity(prefix: str) -> dict:
    """What invalidates a cached sample index: the ``.idx`` files' sizes and times."""
    parts = expand_entry(prefix) if names_several(prefix) else [prefix]
    sizes = [os.path.getsize(p + ".idx") for p in parts]
    times = [int(os.path.getmtime(p + ".idx")) for p in parts]
    if len(parts) == 1:
        return {"idx_size": sizes[0], "idx_mtime": times[0]}
    return {"idx_size": sizes, "idx_mtime": times}


def _cached(cache_dir: str, key: dict, build) -> dict[str, np.ndarray]:
    """``build()``'s arrays, built on rank 0 into a directory of ``.npy`` files (written aside,
    then renamed into place: readers never see half an index), then memory-mapped by every
    rank, so no rank holds the whole sample index in memory (as Megatron-LM's GPTDataset)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{cache_name(key['prefix'])}_samples_{digest}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.isdir(path):
        arrays = build()
        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        with open(os.path.join(tmp, "key.json"), "w") as f:
            json.dump(key, f, sort_keys=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another job built the same index meanwhile
            if not os.path.isdir(path):
                raise
            shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    return {name.removesuffix(".npy"): np.load(os.path.join(path, name), mmap_mode="r")
            for name in os.listdir(path) if name.endswith(".npy")}
