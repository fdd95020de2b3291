"""Pure functions that turn document lengths into packed long-context samples.

A sample is ``seq_length + 1`` consecutive tokens (inputs and shifted labels) of the stream made
by concatenating documents in a shuffled order; consecutive samples share one token, as in
Megatron-LM's ``GPTDataset``. Index arrays are int64 numpy, built with vectorised operations
(no per-sample Python loop) so a billion-token epoch indexes in seconds.
"""

from __future__ import annotations

import numpy as np


def split_fractions(split: str) -> list[tuple[float, float]]:
    """Megatron-LM's ``--split 969,30,1`` as train/valid/test bookends in [0, 1], computed as
    megatron-core does (normalize, then running sums), so document ranges agree exactly."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(
            f"--split {split!r} must be comma-separated numbers, e.g. 969,30,1") from None
    weights = (weights + [0.0, 0.0, 0.0])[:3]
    if len(split.replace("/", ",").split(",")) > 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} needs up to 3 non-negative weights with a positive "
                         f"sum (train,valid,test)")
    normalized = (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()
    ends = [0.0]
    for w in normalized:
        ends.append(ends[-1] + w)
    return list(zip(ends[:-1], ends[1:]))


def document_range(num_documents: int, bookends: tuple[float, float]) -> tuple[int, int]:
    """The documents ``[start, end)`` of one split's bookends (megatron-core's rounding)."""
    return (int(round(bookends[0] * float(num_documents))),
            int(round(bookends[1] * float(num_documents))))


def split_documents(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Megatron-LM's ``--split 969,30,1``: contiguous document ranges for train/valid/test."""
    return [document_range(num_documents, b) for b in split_fractions(split)]


def upsample_long_documents(documents: np.ndarray, lengths: np.ndarray, threshold: int,
                            keep_probability: float, rng: np.random.Generator) -> np.ndarray:
    """Per-source length upsampling (Fu et al. 2024): keep every document of at least
    ``threshold`` tokens and each shorter one with ``keep_probability``."""
    keep = (lengths[documents] >= threshold) | (rng.random(len(documents)) < keep_probability)
    return documents[keep]


def document_order(documents: np.ndarray, lengths: np.ndarray, tokens_needed: int, seed: int,
                   upsample: tuple[int, float] | None = None) -> np.ndarray:
    """Shuffled documents, epoch after epoch, until they hold ``tokens_needed`` tokens."""
    order, total, epoch = [], 0, 0
    if lengths[documents].sum() == 0:
        raise ValueError("the selected documents hold no tokens")
    while total < tokens_needed:
        rng = np.random.default_rng((seed, epoch))
        docs = documents if upsample is None else upsample_long_documents(
            documents, lengths, upsample[0], upsample[1], rng)
        docs = rng.permutation(docs)
        order.append(docs)
        total += int(lengths[docs].sum())
        epoch += 1
    return np.concatenate(order)


def sample_index(ordered_lengths: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """``[num_samples + 1, 2]``: (position in the document order, token offset) where sample
    ``i`` starts; sample ``i`` spans to the start of sample ``i + 1`` plus one token."""
    ends = np.cumsum(ordered_lengths, dtype=np.int64)  # exclusive end of each ordered document
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if starts[-1] + 1 > ends[-1]:
        raise ValueError(f"{ends[-1]} tokens cannot fill {num_samples} samples of "
                         f"{seq_length} + 1 tokens")
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - ordered_lengths[position])
    return np.stack([position, offset], axis=1)


def sample_documents(order: np.ndarray, ordered_lengths: np.ndarray, index: np.ndarray, i: int,
                     seq_length: int) -> list[tuple[int, int, int]]:
    """The pieces of sample ``i``: ``(document id, offset, length)`` covering ``seq_length + 1``
    tokens."""
    position, offset = int(index[i, 0]), int(index[i, 1])
    pieces, need = [], seq_length + 1
    while need > 0:
        take = min(int(ordered_lengths[position]) - offset, need)
        if take > 0:
            pieces.append((int(order[position]), offset, take))
            need -= take
        position, offset = position + 1, 0
    return pieces


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset serves each blended sample, and its index within that dataset.

    Dataset ``d``'s ``k``-th sample sits at the blend position ``(k + 1/2) / w_d``; merging
    those positions interleaves the sources evenly, so every prefix of ``n`` samples holds
    ``n * w_d`` (+-1) from each (as Megatron-LM's greedy ``build_blending_indices``, vectorised).
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or w.min() < 0 or w.sum() <= 0:
        raise ValueError(f"blend weights {weights} must be non-negative with a positive sum")
    w = w / w.sum()
    counts = np.ceil(w * num_samples).astype(np.int64) + 1
    positions = np.concatenate([(np.arange(n) + 0.5) / wd if wd > 0 else np.full(0, np.inf)
                                for n, wd in zip(counts, w)])
    labels = np.repeat(np.arange(len(w), dtype=np.int16), [n if wd > 0 else 0
                                                           for n, wd in zip(counts, w)])
    within = np.concatenate([np.arange(n) if wd > 0 else np.zeros(0, np.int64)
                             for n, wd in zip(counts, w)])
    order = np.argsort(positions, kind="stable")[:num_samples]
    return labels[order], within[order]
