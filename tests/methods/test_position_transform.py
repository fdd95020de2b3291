"""Position transforms: LongRecipe positions increase, restart segments right after sentence
ends, reach L' - 1 (so >= 0.9 L') with gaps totalling L' minus the tokens' span, on real
stdlib text; PoSE's split points and skips follow their uniform definitions."""

import numpy as np
import pytest

from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.methods.position_transform import (
    longrecipe_positions,
    pose_positions,
    sample_rng,
    segment_starts,
    sentence_end_flags,
)


def _stdlib_samples(length, count):
    from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents

    tok = ByteTokenizer()
    samples = []
    for text in stdlib_documents(max_docs=200):
        ids = tok.tokenize(text)
        if len(ids) >= length:
            samples.append([tok.detokenize([i]) for i in ids[:length]])
        if len(samples) == count:
            return samples
    return samples


def test_longrecipe_positions_on_stdlib_text():
    length, target = 300, 1000
    samples = _stdlib_samples(length, 60)
    assert len(samples) == 60
    for index, texts in enumerate(samples):
        ends = sentence_end_flags(texts)
        positions = longrecipe_positions(ends, target, sample_rng(7, index))
        steps = np.diff(positions)
        assert (steps >= 1).all()  # strictly increasing
        jumps = np.flatnonzero(steps > 1) + 1  # where a gap was inserted
        assert all(ends[j - 1] for j in jumps)  # only right after a sentence end
        if len(segment_starts(ends)) >= 2:  # every sample of two or more segments
            assert positions[-1] == target - 1 >= 0.9 * target
        assert (steps - 1).sum() == positions[-1] + 1 - length  # the gaps' total
        assert positions[0] == 0
        # deterministic per (seed, sample index)
        again = longrecipe_positions(ends, target, sample_rng(7, index))
        assert np.array_equal(positions, again)
    reached = sum(longrecipe_positions(sentence_end_flags(t), target, sample_rng(7, i))[-1]
                  == target - 1 for i, t in enumerate(samples))
    assert reached == 60


def test_longrecipe_reaches_the_target_with_a_single_early_boundary():
    """The head never swallows the last boundary: one sentence end at token 5 of 300 still
    spreads the positions to L' - 1 (the authors' code would leave it at ~L)."""
    ends = np.zeros(300, dtype=bool)
    ends[4] = True
    for i in range(50):
        positions = longrecipe_positions(ends, 1000, sample_rng(0, i))
        assert positions[-1] == 999
        assert np.array_equal(np.flatnonzero(np.diff(positions) > 1), [4])


def test_longrecipe_keeps_a_contiguous_head_of_at_most_half():
    ends = np.zeros(100, dtype=bool)
    ends[9::10] = True  # a sentence every 10 tokens
    heads = []
    for i in range(400):
        positions = longrecipe_positions(ends, 400, sample_rng(0, i))
        first_gap = int(np.flatnonzero(np.diff(positions) > 1)[0]) + 1
        heads.append(first_gap)
    assert max(heads) <= 60 and min(heads) == 10  # the next boundary after h in [0, 50]


def test_pose_split_and_skip_distributions():
    length, target, n = 64, 256, 20000
    splits, skips = [], []
    for i in range(n):
        positions = pose_positions(length, target, sample_rng(3, i))
        jump = np.flatnonzero(np.diff(positions) != 1)
        split = int(jump[0]) + 1 if len(jump) else None
        skip = int(positions[-1] - (length - 1))
        if split is None:  # skip 0: no visible jump; the split is unobservable
            assert skip == 0
            continue
        assert positions[split] - positions[split - 1] - 1 == skip
        splits.append(split)
        skips.append(skip)
    splits, skips = np.array(splits), np.array(skips)
    assert splits.min() >= 1 and splits.max() <= length // 2
    assert skips.min() >= 1 and skips.max() <= target - length
    # uniform: each of the 32 split values ~1/32 of samples, skips' mean and spread
    counts = np.bincount(splits, minlength=length // 2 + 1)[1:]
    expected = len(splits) / (length // 2)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 61.1  # 31 degrees of freedom, p = 0.001
    assert skips.mean() == pytest.approx((target - length + 1) / 2, rel=0.02)
    assert skips.std() == pytest.approx((target - length + 1) / np.sqrt(12), rel=0.03)


def test_target_shorter_than_the_sequence_is_refused():
    with pytest.raises(ValueError, match="--target-length 10 must be at least"):
        pose_positions(20, 10, sample_rng(0, 0))
