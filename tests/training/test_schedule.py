"""The learning-rate schedule (megatron-core's OptimizerParamScheduler behind Megatron-LM's
flags) against closed-form values at the boundary iterations, and the batch sampler."""

import math

import numpy as np
import pytest

from megatron_longctx.config import TrainingConfig
from megatron_longctx.training.batches import GlobalBatchSampler
from megatron_longctx.training.schedule import build_scheduler, load_scheduler_state

G = 4  # global batch size


class FakeOptimizer:
    def __init__(self):
        self.param_groups = [{}]


def applied_rates(t: TrainingConfig, iterations: int, resume_at: int | None = None) -> list:
    """The rate used by each iteration 0..iterations-1 (the trainer steps by G samples)."""
    scheduler = build_scheduler(t, FakeOptimizer())
    rates = []
    for i in range(iterations):
        if i == resume_at:  # a fresh scheduler restored from the state saved at iteration i
            state = scheduler.state_dict()
            scheduler = build_scheduler(t, FakeOptimizer())
            load_scheduler_state(scheduler, state)
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.step(increment=t.global_batch_size)
    return rates


def closed_form(i: int, *, style: str, lr=1.0, min_lr=0.1, init=0.0, warmup=10, decay=100,
                wsd=None, wsd_style="linear") -> float:
    """Independent formula, in iterations: linear warmup from ``init`` reaching ``lr`` at
    ``warmup``, then decay reaching ``min_lr`` at ``decay``, ``min_lr`` beyond."""
    if warmup and i <= warmup:
        return init + (lr - init) * i / warmup
    if style == "constant":
        return lr
    if i > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, lr * math.sqrt(max(warmup, 1)) / math.sqrt(i))
    ratio = (i - warmup) / (decay - warmup)
    if style == "linear":
        return min_lr + (lr - min_lr) * (1 - ratio)
    if style == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))
    assert style == "WSD"
    if i <= decay - wsd:
        return lr
    r = (i - (decay - wsd)) / wsd
    coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)),
             "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[wsd_style]
    return min_lr + (lr - min_lr) * coeff


def config(**kw) -> TrainingConfig:
    base = dict(global_batch_size=G, micro_batch_size=1, train_iters=120, lr=1.0, min_lr=0.1,
                lr_warmup_iters=10, lr_decay_iters=100)
    return TrainingConfig(**{**base, **kw})


BOUNDARIES = [0, 1, 9, 10, 11, 50, 85, 99, 100, 101, 119]


@pytest.mark.parametrize("style,wsd_style", [
    ("constant", None), ("linear", None), ("cosine", None), ("inverse-square-root", None),
    ("WSD", "linear"), ("WSD", "cosine"), ("WSD", "exponential"), ("WSD", "minus_sqrt")])
def test_rate_at_boundaries_matches_closed_form(style, wsd_style):
    kw = dict(lr_decay_style=style)
    if style == "WSD":
        kw.update(lr_wsd_decay_iters=30, lr_wsd_decay_style=wsd_style)
    rates = applied_rates(config(**kw), 120)
    for i in BOUNDARIES:
        expect = closed_form(i, style=style, wsd=30, wsd_style=wsd_style or "linear")
        assert rates[i] == pytest.approx(expect, rel=1e-12, abs=1e-15), i
    assert rates[0] == 0.0 and rates[10] == 1.0  # Megatron-LM: warmup from --lr-warmup-init


def test_warmup_fraction_samples_and_init_conversions():
    by_iters = applied_rates(config(lr_warmup_init=0.2), 120)
    assert by_iters[0] == 0.2 and by_iters[5] == pytest.approx(0.6)
    # 10% of a 100-iteration decay = the same 10-iteration warmup
    assert applied_rates(config(lr_warmup_iters=0, lr_warmup_fraction=0.1), 120) == \
        applied_rates(config(), 120)
    samples = config(train_iters=None, train_samples=120 * G, lr_warmup_iters=0,
                     lr_decay_iters=None, lr_warmup_samples=10 * G, lr_decay_samples=100 * G)
    assert samples.iterations == 120
    assert applied_rates(samples, 120) == applied_rates(config(), 120)


def test_resume_in_the_middle_of_warmup_continues_the_schedule():
    t = config(lr_decay_style="cosine")
    assert applied_rates(t, 40, resume_at=5) == applied_rates(t, 40)


def test_changed_schedule_on_resume_is_a_clear_error_unless_overridden():
    t = config()
    state = build_scheduler(t, FakeOptimizer()).state_dict()
    changed = config(lr=2.0)
    with pytest.raises(ValueError, match="--use-checkpoint-opt_param-scheduler"):
        load_scheduler_state(build_scheduler(changed, FakeOptimizer()), state)
    kept = build_scheduler(config(lr=2.0, use_checkpoint_opt_param_scheduler=True),
                           FakeOptimizer())
    load_scheduler_state(kept, state)
    assert kept.max_lr == 1.0
    new = build_scheduler(config(lr=2.0, override_opt_param_scheduler=True), FakeOptimizer())
    load_scheduler_state(new, state)
    assert new.max_lr == 2.0


@pytest.mark.parametrize("kw,match", [
    (dict(lr_warmup_iters=100), "warmup \\(100 iterations, --lr-warmup-iters\\) must be shorter"),
    (dict(lr_decay_style="WSD"), "needs --lr-wsd-decay-iters"),
    (dict(lr_decay_style="WSD", lr_wsd_decay_iters=200),
     "--lr-wsd-decay-iters must be in \\(0, 100\\]"),
    (dict(lr_decay_style="poly"), "--lr-decay-style must be one of"),
    (dict(start_weight_decay=0.0, end_weight_decay=0.1), "--weight-decay-incr-style"),
    (dict(train_samples=8), "exactly one of --train-iters and --train-samples"),
    (dict(lr_decay_samples=400), "--lr-decay-samples cannot be combined with --train-iters"),
    (dict(train_iters=None, train_samples=480, lr_decay_iters=None),
     "--lr-warmup-iters cannot be combined with --train-samples"),
    (dict(lr_warmup_fraction=0.1), "one of --lr-warmup-fraction and --lr-warmup-iters"),
])
def test_impossible_schedules_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw).validate(data_parallel_size=1)


def test_weight_decay_increment():
    t = config(start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="linear")
    scheduler = build_scheduler(t, FakeOptimizer())
    scheduler.step(increment=60 * G)
    assert scheduler.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.05)


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
