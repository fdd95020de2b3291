"""A run's samples: the ``--data-path`` blend (or per-split paths, or mock data) cut by
``--split``, each source packed (:class:`.long_context_dataset.PackedDataset`) or, under
``--position-transform``, cut into single-document windows (:mod:`.document_windows`)."""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_longctx.data.formats.side_data import has_side_data
from megatron_longctx.data.samples import packing
from megatron_longctx.data.samples.blend import (
    Blend,
    DataSources,
    blend_from_list,
    samples_per_epoch,
)
from megatron_longctx.data.samples.document_windows import (
    RecordedSamples,
    epoch_samples,
    transformed_source,
)
from megatron_longctx.data.samples.long_context_dataset import (
    PackedDataset,
    SampleOptions,
    open_indexed,
)


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
    transform = options.position_transform is not None
    recorded = [not in_memory and has_side_data(p, "position_ids") for p in prefixes]
    weights = list(blend.weights) if blend.weights is not None else [
        r[1] - r[0] if rec else epoch_samples(ix, r, options) if transform else
        samples_per_epoch(np.asarray(ix.sequence_lengths), r, options.seq_length)
        for ix, r, rec in zip(indexed, ranges, recorded)]
    total = sum(weights)
    if total <= 0 and transform:
        raise ValueError(f"{', '.join(prefixes)}: no document has the {options.seq_length + 1} "
                         f"tokens a transformed sample needs (--position-transform uses single "
                         f"documents); lower --seq-length, give longer documents, or add "
                         f"--pack-short")
    if total <= 0:
        raise ValueError(f"{', '.join(prefixes)}: no sample of {options.seq_length} tokens in "
                         f"the selected documents; check --split and --seq-length")
    datasets = []
    for w, prefix, up, ix, doc_range, rec in zip(weights, prefixes, upsample, indexed, ranges,
                                                 recorded):
        # a little headroom so the greedy blend never runs a source dry
        needed = int(np.ceil(num_samples * w / total * 1.005)) + 1
        path = None if in_memory else prefix
        datasets.append(
            RecordedSamples(prefix, ix, doc_range, needed, options) if rec else
            transformed_source(prefix, path, ix, doc_range, needed, options, seed, up,
                               cache_dir) if transform else
            PackedDataset(path, doc_range, needed, options, seed, up, cache_dir, ix))
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
