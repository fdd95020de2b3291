"""Position-index transformations (METHODS.md §3): short training sequences whose position ids
span a longer target window, so a model trained on ``L_train`` tokens sees the relative
distances of ``L' > L_train``.

* **PoSE** (arXiv 2309.10400): two chunks; split point ``r ~ U[1, L/2]``, skip
  ``u ~ U[0, L' - L]``; positions ``{0 .. r-1} ∪ {r+u .. L-1+u}``.
* **LongRecipe** (arXiv 2409.00509): the sequence is cut into segments ending at tokens whose
  text contains ``. ! ? \\n``; a contiguous head of random length ``<= L/2`` keeps positions
  ``0 .. h-1``; the ``L' - L`` unused positions are scattered at random over the boundaries
  after the head, so the last position is always ``L' - 1`` when there is at least one boundary
  (the authors' code builds its template before filtering and reaches only ~60% of ``L'``).

Both are pure functions of the tokens and a generator seeded by (seed, sample index): the same
sample always gets the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TRANSFORMS = ("none", "pose", "longrecipe")
SENTENCE_END_CHARS = (".", "!", "?", "\n")


def sample_rng(seed: int, sample_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, sample_index])


def pose_positions(length: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """PoSE's two-chunk positions ``[length]`` (int64) reaching into ``[0, target)``."""
    _check(length, target)
    if length < 2:
        return np.arange(length, dtype=np.int64)
    split = int(rng.integers(1, length // 2 + 1))  # r ~ U[1, L/2]
    skip = int(rng.integers(0, target - length + 1))  # u ~ U[0, L' - L]
    positions = np.arange(length, dtype=np.int64)
    positions[split:] += skip
    return positions


def sentence_end_flags(token_texts: Sequence[str]) -> np.ndarray:
    """``True`` where a token's decoded text contains a sentence end (its segment ends there)."""
    return np.array([any(c in text for c in SENTENCE_END_CHARS) for text in token_texts],
                    dtype=bool)


def segment_starts(ends: np.ndarray) -> np.ndarray:
    """Indices where segments start: 0 and every token right after a sentence end."""
    starts = np.flatnonzero(ends[:-1]) + 1
    return np.concatenate([[0], starts]).astype(np.int64)


def longrecipe_positions(ends: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """LongRecipe positions ``[L]`` for tokens whose sentence-end flags are ``ends [L]``.

    A head of ``h ~ U[0, min(L/2, b - 1)]`` tokens stays contiguous (``b``: the last segment
    start, so that one boundary always follows the head); the boundaries are the segment starts
    after it.
    The ``target - L`` unused positions are cut into one random gap per boundary (uniform over
    compositions), so positions strictly increase and the last one is ``target - 1``.
    """
    length = len(ends)
    _check(length, target)
    boundaries = segment_starts(ends)[1:]  # [segments - 1], all > 0
    # the head stops before the last boundary, so a gap always remains to reach the target
    longest_head = min(length // 2, int(boundaries[-1]) - 1) if len(boundaries) else length // 2
    head = int(rng.integers(0, longest_head + 1))
    boundaries = boundaries[boundaries > head]
    positions = np.arange(length, dtype=np.int64)
    free = target - length
    if len(boundaries) == 0 or free == 0:
        return positions
    cuts = np.sort(rng.integers(0, free + 1, size=len(boundaries) - 1))
    gaps = np.diff(np.concatenate([[0], cuts, [free]]))  # [boundaries], sums to free
    shift = np.zeros(length, dtype=np.int64)
    np.add.at(shift, boundaries, gaps)
    return positions + np.cumsum(shift)


def sentence_end_table(tokenizer) -> np.ndarray:
    """``[vocab]`` bool: token ``i`` alone decodes to text holding a sentence end. Token-level
    segment ends (the issue's definition), looked up per sample instead of decoding it."""
    return sentence_end_flags([tokenizer.detokenize([i]) for i in range(tokenizer.vocab_size)])


@dataclass(frozen=True, eq=False)
class PositionTransform:
    """``--position-transform pose|longrecipe --target-length L'`` for the sample builder:
    called with a sample's input tokens ``[L]`` and its index, returns positions ``[L]``."""

    kind: str
    target_length: int
    seed: int
    sentence_ends: np.ndarray | None = None  # [vocab] bool, for longrecipe

    def __post_init__(self):
        if self.kind not in TRANSFORMS[1:]:
            raise ValueError(f"--position-transform {self.kind!r}: expected one of "
                             f"{', '.join(TRANSFORMS)}")
        if self.kind == "longrecipe" and self.sentence_ends is None:
            raise ValueError("longrecipe needs the tokenizer's sentence-end table")

    def __call__(self, tokens: np.ndarray, sample_index: int) -> np.ndarray:
        rng = sample_rng(self.seed, sample_index)
        if self.kind == "pose":
            return pose_positions(len(tokens), self.target_length, rng)
        return longrecipe_positions(self.sentence_ends[tokens], self.target_length, rng)


def _check(length: int, target: int) -> None:
    if target < length:
        raise ValueError(f"--target-length {target} must be at least the sequence length "
                         f"{length}")
