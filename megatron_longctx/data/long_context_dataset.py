"""Long-context training samples from Megatron indexed datasets (``.bin``/``.idx``).

Documents are packed into ``seq_length``-token samples (131072 and beyond); every sample
carries its document starts so that training can reset position ids, restrict attention to
each document (never with a dense ``s x s`` mask), and mask the loss after EOD. Several sources
blend by weight (``--data-path 0.7 A 0.2 B 0.1 C``) or, unweighted, by size (``--data-path A
B``; see :mod:`.blend`), each optionally length-upsampled. The sample index of each source is
built once (rank 0), cached beside the data and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.data import packing
from megatron_longctx.data.blend import Blend, DataSources, blend_from_list, samples_per_epoch
from megatron_longctx.data.indexed_reader import check_indexed_dataset


@dataclass(frozen=True)
class SampleOptions:
    seq_length: int
    eod: int
    reset_position_ids: bool = False
    eod_mask_loss: bool = False


def open_indexed(prefix: str):
    """megatron-core's reader, after our O(1) checks (which name the file and the fix)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = check_indexed_dataset(prefix, full=False)
    if info.sequence_count != info.num_documents:
        # packing, --split and document masks work on documents; Megatron-LM's
        # --split-sentences datasets hold several sequences per document
        raise ValueError(f"{prefix}: {info.sequence_count} sequences in {info.num_documents} "
                         f"documents; only one sequence per document is supported (preprocess "
                         f"without --split-sentences)")
    return IndexedDataset(prefix)


class PackedDataset(torch.utils.data.Dataset):
    """One source: ``num_samples`` packed samples from documents ``[doc_range)`` of ``prefix``."""

    def __init__(self, prefix: str | None, doc_range: tuple[int, int], num_samples: int,
                 options: SampleOptions, seed: int, upsample: tuple[int, float] | None = None,
                 cache_dir: str | None = None, indexed=None):
        """``prefix`` None: ``indexed`` is in-memory (mock) documents, indexed without a
        cache."""
        self.prefix, self.options, self.doc_range = prefix, options, tuple(doc_range)
        self.indexed = indexed if indexed is not None else open_indexed(prefix)
        self.lengths = np.asarray(self.indexed.sequence_lengths, dtype=np.int64)
        documents = np.arange(*doc_range, dtype=np.int64)
        if len(documents) == 0:
            raise ValueError(f"{prefix}: the split selects no documents; change --split")
        if prefix is None:
            self.order, self.index = self._build(documents, num_samples, seed, upsample)
        else:
            key = dict(prefix=os.path.abspath(prefix), docs=list(doc_range),
                       samples=num_samples, seq=options.seq_length, seed=seed,
                       upsample=upsample, idx_size=os.path.getsize(prefix + ".idx"),
                       idx_mtime=int(os.path.getmtime(prefix + ".idx")))
            self.order, self.index = _cached(
                cache_dir or os.path.dirname(os.path.abspath(prefix)), key,
                lambda: self._build(documents, num_samples, seed, upsample))
        self.ordered_lengths = self.lengths[self.order]
        self.num_samples = num_samples

    def _build(self, documents, num_samples, seed, upsample):
        s = self.options.seq_length
        order = packing.document_order(documents, self.lengths, num_samples * s + 1, seed,
                                       upsample)
        return order, packing.sample_index(self.lengths[order], s, num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        pieces = packing.sample_documents(self.order, self.ordered_lengths, self.index, int(i),
                                          self.options.seq_length)
        tokens = np.concatenate([self.indexed.get(d, offset=o, length=n) for d, o, n in pieces])
        starts = np.cumsum([0] + [n for _, _, n in pieces[:-1]])  # document starts in sample
        return build_sample(tokens.astype(np.int64), starts, self.options)


def build_sample(tokens: np.ndarray, doc_starts: np.ndarray, options: SampleOptions) -> dict:
    """Inputs, labels, loss mask, position ids and document starts of one packed sample.

    tokens: ``[s + 1]``; doc_starts: starts of the documents within it (first is 0).
    """
    s = options.seq_length
    inputs, labels = torch.from_numpy(tokens[:-1]), torch.from_numpy(tokens[1:])
    starts = [int(x) for x in doc_starts if x < s]
    loss_mask = torch.ones(s, dtype=torch.float32)
    if options.eod_mask_loss:
        loss_mask[inputs == options.eod] = 0.0  # do not predict across a document end
    if options.reset_position_ids:
        bounds = starts + [s]
        position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    else:
        position_ids = torch.arange(s)
    return {"tokens": inputs, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "doc_starts": starts}


def _cached(cache_dir: str, key: dict, build):
    """Build on rank 0 (atomically written ``.npz``), then every rank loads the same file."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{os.path.basename(key['prefix'])}_samples_{digest}.npz")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.exists(path):
        order, index = build()
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, order=order, index=index, key=json.dumps(key))
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    with np.load(path) as cached:
        return cached["order"], cached["index"]


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets in proportion to ``weights``; each sample says which
    source it came from (``source``: its index in ``names``), for the loss by source."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int,
                 names: list[str] | None = None):
        self.datasets = datasets
        self.weights = [w / sum(weights) for w in weights]
        self.names = names or [str(d) for d in range(len(datasets))]
        self.dataset_index, self.sample_index = packing.blend_indices(weights, num_samples)
        for d, ds in enumerate(datasets):
            needed = int((self.dataset_index == d).sum())
            if needed > len(ds):
                raise ValueError(f"source {d} has {len(ds)} samples but the blend needs {needed}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        source = int(self.dataset_index[i])
        return {**self.datasets[source][int(self.sample_index[i])],
                "source": torch.tensor(source)}


def parse_upsample(specs: list[str] | None, num_sources: int) -> list[tuple[int, float] | None]:
    """``--length-upsample 4096:0.1`` (all sources) or one ``THRESHOLD:KEEP_P``/``none`` each."""
    if not specs:
        return [None] * num_sources
    if len(specs) not in (1, num_sources):
        raise ValueError(f"--length-upsample takes 1 or {num_sources} (one per source) values, "
                         f"got {len(specs)}")
    parsed = []
    for spec in specs:
        if spec.lower() == "none":
            parsed.append(None)
            continue
        try:
            threshold, keep = spec.split(":")
            parsed.append((int(threshold), float(keep)))
        except ValueError:
            raise ValueError(f"--length-upsample {spec!r}: expected THRESHOLD:KEEP_PROBABILITY, "
                             f"e.g. 4096:0.1 (keep 10% of documents under 4096 tokens)") from None
        if not 0.0 <= parsed[-1][1] <= 1.0:
            raise ValueError(f"--length-upsample {spec!r}: keep probability must be in [0, 1]")
    return parsed * num_sources if len(parsed) == 1 else parsed


def build_blended_dataset(data_path: list[str], split: str, num_samples: int,
                          options: SampleOptions, seed: int,
                          length_upsample: list[str] | None = None,
                          cache_dir: str | None = None, split_index: int = 0):
    """``num_samples`` samples of split ``split_index`` (0 train, 1 valid, 2 test) of the
    ``--data-path`` list ``data_path`` cut by ``--split``."""
    bookends = packing.split_fractions(split)[split_index]
    return build_blend(blend_from_list(data_path), bookends, num_samples, options, seed,
                       length_upsample, cache_dir)


def build_blend(blend: Blend, bookends: tuple[float, float], num_samples: int,
                options: SampleOptions, seed: int, length_upsample: list[str] | None = None,
                cache_dir: str | None = None, indexed: list | None = None):
    """``num_samples`` samples drawn from the documents ``bookends`` (fractions) of each
    source of ``blend``, in proportion to its weights, or without weights (Megatron-LM's
    unweighted list) to each source's samples per epoch. ``indexed``: the sources already
    open (mock data: in-memory documents, no prefix)."""
    prefixes = list(blend.prefixes)
    upsample = parse_upsample(length_upsample, len(prefixes))
    in_memory = indexed is not None
    indexed = indexed if in_memory else [open_indexed(p) for p in prefixes]
    ranges = [packing.document_range(len(ix.sequence_lengths), bookends) for ix in indexed]
    weights = list(blend.weights) if blend.weights is not None else [
        samples_per_epoch(np.asarray(ix.sequence_lengths), r, options.seq_length)
        for ix, r in zip(indexed, ranges)]
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{', '.join(prefixes)}: no sample of {options.seq_length} tokens in "
                         f"the selected documents; check --split and --seq-length")
    datasets = []
    for w, prefix, up, ix, doc_range in zip(weights, prefixes, upsample, indexed, ranges):
        # a little headroom so the greedy blend never runs a source dry
        needed = int(np.ceil(num_samples * w / total * 1.005)) + 1
        datasets.append(PackedDataset(None if in_memory else prefix, doc_range, needed,
                                      options, seed, up, cache_dir, ix))
    if len(datasets) == 1:
        return datasets[0]
    names = [os.path.basename(p).removesuffix("_text_document") for p in prefixes]
    return BlendedDataset(datasets, weights, num_samples, names)


MOCK_NAME = "mock"


def build_split_dataset(sources: DataSources, split_index: int, num_samples: int,
                        options: SampleOptions, seed: int, tokenizer,
                        length_upsample: list[str] | None = None,
                        cache_dir: str | None = None):
    """Split ``split_index`` of the run's data (``resolve_data_sources``), or None when that
    split has none. Mock data is megatron-core's ``MockGPTLowLevelDataset`` (seeded random
    document lengths, synthetic tokens, EOD-terminated) packed like any source."""
    chosen = sources.for_split(split_index)
    if chosen is None:
        return None
    blend, bookends = chosen
    if sources.kind == "mock":
        from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

        return build_blend(Blend((MOCK_NAME,), None), bookends, num_samples, options, seed,
                           length_upsample, cache_dir, [MockGPTLowLevelDataset(tokenizer)])
    return build_blend(blend, bookends, num_samples, options, seed, length_upsample, cache_dir)
