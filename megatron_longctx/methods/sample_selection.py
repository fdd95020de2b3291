"""LongRecipe's sample selection (METHODS.md §3): keep the sentences that carry anchor tokens
(the impactful tokens of ``tools/analyze_impactful_tokens.py``), plus a ``keep_other`` fraction
of the rest, and cut each document's kept text into finished samples of ``seq_length + 1``
tokens whose LongRecipe position ids (reaching the target window) are recorded with them.

Sentences are the LongRecipe segments: they end at a token whose text holds ``. ! ? \\n``. A
sample never mixes documents; the tail of a document's kept text shorter than one sample is
dropped (counted). Everything is a pure function of the data, the anchor set and the seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_longctx.methods.position_transform import (
    longrecipe_positions,
    sample_rng,
    segment_starts,
)


@dataclass
class SelectionCounts:
    documents: int = 0
    sentences: int = 0
    anchor_sentences: int = 0
    other_sentences_kept: int = 0
    tokens_read: int = 0
    tokens_kept: int = 0
    tokens_in_samples: int = 0
    samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def sentence_bounds(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)`` of the sentences of a document with sentence-end flags ``ends``."""
    starts = segment_starts(ends)
    return starts, np.append(starts[1:], len(ends))


def keep_sentences(tokens: np.ndarray, ends: np.ndarray, anchors: np.ndarray, keep_other: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sentence of one document: ``(starts, stops, kept)``, ``kept`` 2 for a sentence
    holding an anchor (``anchors [vocab]`` bool), 1 for another sentence drawn with probability
    ``keep_other``, 0 for a dropped one."""
    starts, stops = sentence_bounds(ends)
    has_anchor = np.add.reduceat(anchors[tokens].astype(np.int64), starts) > 0  # [sentences]
    others = rng.random(len(starts)) < keep_other
    return starts, stops, np.where(has_anchor, 2, np.where(others, 1, 0))


def select_document(tokens: np.ndarray, sentence_ends: np.ndarray, anchors: np.ndarray,
                    keep_other: float, seed: int, document: int, seq_length: int, target: int,
                    counts: SelectionCounts):
    """The samples of one document: yields ``(tokens [s + 1], positions [s + 1])``; the
    selection's ``k``-th sample (``counts.samples``) gets the positions of
    ``sample_rng(seed, k)``, its sentences are drawn with ``default_rng([seed, 1, document])``.
    ``sentence_ends``: the tokenizer's ``[vocab]`` table."""
    ends = sentence_ends[tokens]
    starts, stops, kept = keep_sentences(tokens, ends, anchors, keep_other,
                                         np.random.default_rng([seed, 1, document]))
    counts.documents += 1
    counts.sentences += len(starts)
    counts.anchor_sentences += int((kept == 2).sum())
    counts.other_sentences_kept += int((kept == 1).sum())
    counts.tokens_read += len(tokens)
    chosen = [tokens[a:b] for a, b, k in zip(starts, stops, kept) if k]
    text = np.concatenate(chosen) if chosen else tokens[:0]
    counts.tokens_kept += len(text)
    window = seq_length + 1
    for w in range(len(text) // window):
        piece = text[w * window:(w + 1) * window]
        positions = longrecipe_positions(sentence_ends[piece[:-1]], target,
                                         sample_rng(seed, counts.samples))
        # the label-only last token continues the last position (never an input)
        counts.samples += 1
        counts.tokens_in_samples += window
        yield piece, np.append(positions, positions[-1] + 1)
