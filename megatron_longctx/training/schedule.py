"""Learning-rate and weight-decay schedule: megatron-core's ``OptimizerParamScheduler``.

As in Megatron-LM, the scheduler counts *samples*: iteration ``i`` (0-based) trains with the
rate at ``i * global_batch_size`` samples, and ``--*-iters`` flags are converted to samples, so
``--train-iters`` and ``--train-samples`` runs of the same length schedule identically. With a
warmup, iteration 0 uses ``--lr-warmup-init`` (0 by default, as Megatron-LM).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass(frozen=True)
class ScheduleSteps:
    """Schedule lengths in samples."""

    warmup: int
    decay: int
    wsd_decay: int | None
    wd_incr: int


def schedule_steps(t) -> ScheduleSteps:
    """Megatron-LM's conversion of the schedule flags of ``TrainingConfig`` ``t`` to samples;
    raises ``ValueError`` naming the flag when the schedule is impossible."""
    g = t.global_batch_size
    _refuse_mixed_units(t)
    if t.train_iters is not None:
        decay = (t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters) * g
        wsd = t.lr_wsd_decay_iters * g if t.lr_wsd_decay_iters is not None else None
        warmup = t.lr_warmup_iters * g
        wd_incr = t.train_iters * g
        unit, decay_flag, warmup_flag = "iterations", "--lr-decay-iters", "--lr-warmup-iters"
    else:
        decay = t.lr_decay_samples if t.lr_decay_samples is not None else t.train_samples
        wsd = t.lr_wsd_decay_samples
        warmup = t.lr_warmup_samples
        wd_incr = t.train_samples
        unit, decay_flag, warmup_flag = "samples", "--lr-decay-samples", "--lr-warmup-samples"
    if t.lr_warmup_fraction is not None:
        if not 0.0 <= t.lr_warmup_fraction < 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got "
                             f"{t.lr_warmup_fraction}")
        warmup, warmup_flag = int(t.lr_warmup_fraction * decay), "--lr-warmup-fraction"
    scale = g if unit == "iterations" else 1
    if decay <= 0:
        raise ValueError(f"the learning-rate decay spans {decay // scale} {unit}; set "
                         f"{decay_flag} (default: the run length) to a positive value.")
    if warmup >= decay:
        raise ValueError(f"the warmup ({warmup // scale} {unit}, {warmup_flag}) must be shorter "
                         f"than the decay ({decay // scale} {unit}, {decay_flag}).")
    if t.lr_decay_style == "WSD":
        if wsd is None:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or "
                             "--lr-wsd-decay-samples): the length of the final anneal.")
        if not 0 < wsd <= decay:
            flag = "--lr-wsd-decay-iters" if unit == "iterations" else "--lr-wsd-decay-samples"
            raise ValueError(f"{flag} must be in (0, {decay // scale}] (the decay length in "
                             f"{unit}), got {wsd // scale}.")
    start_wd, end_wd = weight_decay_range(t)
    if t.weight_decay_incr_style == "constant" and start_wd != end_wd:
        raise ValueError(f"--start-weight-decay {start_wd} and --end-weight-decay {end_wd} "
                         f"differ; set --weight-decay-incr-style linear or cosine.")
    if not 0.0 <= start_wd <= end_wd:
        raise ValueError(f"need 0 <= --start-weight-decay ({start_wd}) <= --end-weight-decay "
                         f"({end_wd}).")
    return ScheduleSteps(warmup, decay, wsd, max(wd_incr, 1))


def _refuse_mixed_units(t) -> None:
    """Megatron-LM's rule: schedule flags in the unit of the run length, one warmup flag."""
    by_iters = {"--lr-warmup-iters": t.lr_warmup_iters or None,
                "--lr-decay-iters": t.lr_decay_iters, "--lr-wsd-decay-iters": t.lr_wsd_decay_iters}
    by_samples = {"--lr-warmup-samples": t.lr_warmup_samples or None,
                  "--lr-decay-samples": t.lr_decay_samples,
                  "--lr-wsd-decay-samples": t.lr_wsd_decay_samples}
    wrong = by_samples if t.train_iters is not None else by_iters
    given = [flag for flag, value in wrong.items() if value is not None]
    if given:
        run_flag = "--train-iters" if t.train_iters is not None else "--train-samples"
        raise ValueError(f"{', '.join(given)} cannot be combined with {run_flag}; give the "
                         f"schedule in the same unit as the run length.")
    if t.lr_warmup_fraction is not None and (t.lr_warmup_iters or t.lr_warmup_samples):
        raise ValueError("give one of --lr-warmup-fraction and --lr-warmup-iters/-samples.")


def weight_decay_range(t) -> tuple[float, float]:
    start = t.start_weight_decay if t.start_weight_decay is not None else t.weight_decay
    end = t.end_weight_decay if t.end_weight_decay is not None else t.weight_decay
    return start, end


def build_scheduler(t, optimizer) -> OptimizerParamScheduler:
    """The scheduler for ``optimizer``; it sets the rate of iteration 0 on construction."""
    steps = schedule_steps(t)
    start_wd, end_wd = weight_decay_range(t)
    return OptimizerParamScheduler(
        optimizer, init_lr=t.lr_warmup_init, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=steps.warmup, lr_decay_steps=steps.decay,
        lr_decay_style=t.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=steps.wd_incr, wd_incr_style=t.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=t.override_opt_param_scheduler,
        wsd_decay_steps=steps.wsd_decay, lr_wsd_decay_style=t.lr_wsd_decay_style)


def load_scheduler_state(scheduler: OptimizerParamScheduler, state: dict) -> None:
    """Restore a checkpoint's schedule; a mismatch with this run's flags is a clear error."""
    try:
        scheduler.load_state_dict(state)
    except AssertionError as err:
        raise ValueError(
            f"{err}: the checkpoint's learning-rate schedule differs from this run's flags. "
            f"Pass --use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule, or "
            f"--override-opt_param-scheduler to apply the new flags.") from None
