import math

import numpy as np
import pytest

from megatron_longctx.training.batches import GlobalBatchSampler
from megatron_longctx.training.schedule import learning_rate


def test_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_iters=10, total_iters=110)
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    assert learning_rate(9, **kw) == pytest.approx(1.0)
    assert learning_rate(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(110, **kw) == pytest.approx(0.1)
    assert learning_rate(500, **kw) == pytest.approx(0.1)
    assert learning_rate(60, style="linear", **kw) == pytest.approx(0.55)
    assert learning_rate(60, style="constant", **kw) == 1.0


def test_global_batches_identical_for_any_dp_size():
    def batch(dp, step):
        parts = []
        for r in range(dp):
            s = GlobalBatchSampler(100, 8, 2, dp_rank=r, dp_size=dp, seed=3)
            parts.extend(np.concatenate(s.micro_batches(step)))
        return parts

    for step in (0, 5, 12, 13):  # 12/13 cross an epoch boundary
        assert batch(1, step) == batch(2, step) == batch(4, step)
    one = GlobalBatchSampler(100, 8, 2, 0, 1, seed=3)
    epoch = np.concatenate([one.global_batch(s) for s in range(13)])[:100]
    assert sorted(epoch.tolist()) == list(range(100))  # a permutation per epoch
