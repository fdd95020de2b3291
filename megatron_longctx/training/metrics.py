"""Metrics sink of the training loop: ``metrics.jsonl``, TensorBoard, wandb, and the console line.

One rank writes (the caller passes ``enabled``); on every other rank each method is a no-op and
neither TensorBoard nor wandb is imported. Metric keys are ours (``lm_loss``, ``lr``, ...);
TensorBoard gets Megatron-LM's tag names (``TENSORBOARD_TAGS``) so curves line up with
Megatron-LM runs, while ``metrics.jsonl`` and wandb keep our keys.

Resuming from iteration ``r`` drops the rows a killed run left past ``r`` in ``metrics.jsonl``
and hides its TensorBoard events past ``r`` (``SummaryWriter(purge_step=r + 1)``). wandb starts a
new run per launch unless ``WANDB_RUN_ID`` is set, which ``resume="allow"`` then continues (wandb
itself drops steps at or below the run's last step, so re-logged iterations keep their old values).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

# Our key -> (Megatron-LM TensorBoard tag, factor to Megatron-LM's unit). Tags follow
# megatron/training/training.py (training_log, evaluate_and_print_results, Timers.write);
# peak memory goes in GiB (2**30 bytes) under "mem-max-allocated-bytes" with Megatron-Bridge's
# "-gigabytes" suffix instead of "-bytes".
# Keys not listed here are logged under their own name.
TENSORBOARD_TAGS: dict[str, tuple[str, float]] = {
    "lm_loss": ("lm loss", 1.0),
    "lr": ("learning-rate", 1.0),
    "grad_norm": ("grad-norm", 1.0),
    "loss_scale": ("loss-scale", 1.0),
    "global_batch_size": ("batch-size", 1.0),
    "consumed_samples": ("samples vs steps", 1.0),
    "elapsed_ms_per_iteration": ("iteration-time", 1e-3),  # Megatron-LM logs seconds
    "tflops_per_gpu": ("throughput", 1.0),
    "validation_lm_loss": ("lm loss validation", 1.0),
    "validation_ppl": ("lm loss validation ppl", 1.0),
    "peak_memory_gib": ("mem-max-allocated-gigabytes", 1.0),
    "save_time_s": ("save-checkpoint-time", 1.0),
}

JSONL_NAME = "metrics.jsonl"


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number (int, float, numpy or 0-d tensor), else None."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _truncate_jsonl(path: str, resume_iteration: int) -> None:
    """Keep the rows of ``path`` up to ``resume_iteration``; rewrite atomically if any go.

    Rows past the resume point were written by a run killed after its last checkpoint; they
    are logged again by this run. A line that is not a JSON object (a write cut by kill -9) goes
    too.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(row, dict) and row.get("iteration", 0) <= (
                resume_iteration):
            kept.append(line)
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never half of either


class MetricsLogger:
    """Writes each ``log(iteration, metrics)`` call to every configured sink.

    ``save_dir``: ``metrics.jsonl`` there, one fsync'd JSON object per call.
    ``tensorboard_dir``: scalars under Megatron-LM's tags, step = iteration; config as text.
    ``wandb_project``: ``wandb.log(metrics, step=iteration)``; honours ``WANDB_MODE``.
    """

    def __init__(self, *, save_dir: str | None, tensorboard_dir: str | None,
                 wandb_project: str | None, wandb_exp_name: str | None,
                 wandb_save_dir: str | None, config: dict, resume_iteration: int,
                 enabled: bool) -> None:
        self._jsonl: Any = None
        self._tensorboard: Any = None
        self._wandb: Any = None  # the module; its run is global state inside wandb
        if not enabled:
            return
        # Imports first, so a missing package fails before any file is created.
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("wandb_project is set but wandb is not installed: "
                                  "pip install 'megatron_longctx[wandb]'") from e
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard_dir is set but tensorboard is not installed: "
                                  "pip install 'megatron_longctx[tensorboard]'") from e
        try:  # a sink failing to open closes the ones already open
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                path = os.path.join(save_dir, JSONL_NAME)
                if os.path.exists(path):
                    _truncate_jsonl(path, resume_iteration)
                self._jsonl = open(path, "a", encoding="utf-8")  # closed in close()
            if tensorboard_dir:
                # purge_step hides the events a killed run wrote past the checkpoint we resume from.
                purge = resume_iteration + 1 if resume_iteration > 0 else None
                self._tensorboard = SummaryWriter(log_dir=tensorboard_dir, purge_step=purge)
                # Indented lines render as a code block in TensorBoard's markdown text view.
                text = json.dumps(config, indent=2, default=str).replace("\n", "\n    ")
                self._tensorboard.add_text("config", "    " + text, global_step=resume_iteration)
                self._tensorboard.flush()
            if wandb_project:
                wandb_dir = wandb_save_dir or save_dir
                if wandb_dir:
                    os.makedirs(wandb_dir, exist_ok=True)
                wandb.init(project=wandb_project, name=wandb_exp_name, dir=wandb_dir,
                           config=config, resume="allow")
                self._wandb = wandb
        except BaseException:
            self.close()
            raise

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"iteration": iteration, **metrics}, default=float)
                              + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())  # a kill -9 loses at most the line being written
        if self._tensorboard is not None:
            for key, value in metrics.items():
                number = _number(value)
                if number is None:
                    continue
                tag, factor = TENSORBOARD_TAGS.get(key, (key, 1.0))
                self._tensorboard.add_scalar(tag, number * factor, iteration)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=iteration)

    def close(self) -> None:
        """Flush and close every sink; idempotent, and safe from signal or exception paths
        (each sink is detached before it is closed, and one failing does not skip the rest)."""
        jsonl, self._jsonl = self._jsonl, None
        tensorboard, self._tensorboard = self._tensorboard, None
        wandb, self._wandb = self._wandb, None
        try:
            if jsonl is not None:
                jsonl.close()
        finally:
            try:
                if tensorboard is not None:
                    tensorboard.close()
            finally:
                if wandb is not None:
                    wandb.finish()


def _hms(seconds: float) -> str:
    """``3723.4`` -> ``"1:02:03"`` (hours are not wrapped at 24)."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def console_line(iteration: int, train_iters: int, metrics: dict[str, float]) -> str:
    """One training-log line in Megatron-LM's format (megatron/training/training.py,
    ``training_log``), then our extras; fields whose key is missing are left out.

    ``mfu`` is a fraction of peak and printed in percent. Loss scale is printed as Megatron-LM
    always does; without a ``loss_scale`` key it is 1.0 (bf16/fp32 training does not scale).
    """
    m = metrics
    s = f" [{datetime.now():%Y-%m-%d %H:%M:%S}]"
    s += f" iteration {iteration:8d}/{train_iters:8d} |"
    if "consumed_samples" in m:
        s += f" consumed samples: {int(m['consumed_samples']):12d} |"
    if "elapsed_ms_per_iteration" in m:
        s += f" elapsed time per iteration (ms): {m['elapsed_ms_per_iteration']:.1f} |"
    if "tflops_per_gpu" in m:
        # Megatron-LM's one decimal, but CPU runs (tenths of a TFLOP/s and less, beside a
        # sizeable MFU against the CPU's measured peak) keep three significant digits
        tflops = m["tflops_per_gpu"]
        s += f" throughput per GPU (TFLOP/s/GPU): {tflops:{'.1f' if tflops >= 1 else '.3g'}} |"
    if "lr" in m:
        s += f" learning rate: {m['lr']:.6E} |"
    if "global_batch_size" in m:
        s += f" global batch size: {int(m['global_batch_size']):5d} |"
    # Megatron-LM prints every entry of its loss dict this way; ours are lm_loss and its
    # breakdowns (e.g. lm_loss_pos_0_4k).
    for key in ["lm_loss"] + sorted(k for k in m if k.startswith("lm_loss_")):
        if key in m:
            s += f" {'lm loss' if key == 'lm_loss' else key}: {m[key]:.6E} |"
    s += f" loss scale: {m.get('loss_scale', 1.0):.1f} |"
    if "grad_norm" in m:
        s += f" grad norm: {m['grad_norm']:.3f} |"
    if "skipped_iterations" in m:
        s += f" number of skipped iterations: {int(m['skipped_iterations']):3d} |"
    if "nan_iterations" in m:
        s += f" number of nan iterations: {int(m['nan_iterations']):3d} |"
    # Ours, after Megatron-LM's fields so parsers of its line keep working.
    if "tokens_per_s" in m:
        s += f" tokens/s: {m['tokens_per_s']:.1f} |"
    if "peak_memory_gib" in m:
        s += f" peak memory (GiB): {m['peak_memory_gib']:.2f} |"
    if "mfu" in m:
        s += f" MFU (%): {100.0 * m['mfu']:.2f} |"
    if "eta_s" in m:
        s += f" ETA: {_hms(m['eta_s'])} |"
    if "validation_lm_loss" in m:
        s += f" validation lm loss: {m['validation_lm_loss']:.6E} |"
    if "validation_ppl" in m:
        s += f" validation lm loss PPL: {m['validation_ppl']:.6E} |"
    return s
