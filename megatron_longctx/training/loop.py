"""The training loop of a run: iterations, evaluation, checkpoints, metrics, and stopping.

A run stops for one of four reasons, written to ``<save>/exit_reason`` (Megatron-LM's exit
flags; a job script requeues when it is not ``finished``; no file: the run failed or was killed):
``finished`` (the last iteration), ``signal`` (SIGTERM/SIGUSR1 with ``--exit-signal-handler``),
``duration`` (``--exit-duration-in-mins``), ``interval`` (``--exit-interval``). Each saves a
checkpoint first. Every rank agrees on the stop iteration: signal and duration flags are
all-reduced each iteration.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_longctx.training.checkpoint import save_checkpoint
from megatron_longctx.training.exit_status import EXIT_REASON_FILE
from megatron_longctx.training.faults import maybe_fault
from megatron_longctx.training.flops import attention_flops
from megatron_longctx.training.profiling import build_profiler

logger = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGUSR1 handler that only records the signal: the iteration in flight finishes
    and the loop saves before exiting (a Slurm ``--signal`` before the time limit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool):
        self.received: int | None = None
        self._previous = {}
        if enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its peak RSS on CPU machines."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def agreed_stop(stop: StopSignal, started: float, limit_mins: float | None) -> str | None:
    """``signal`` or ``duration`` when any rank says so, the same on every rank."""
    flags = torch.tensor([float(stop.received is not None),
                          float(limit_mins is not None
                                and time.time() - started > limit_mins * 60)],
                         device=torch.cuda.current_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0]:
        return "signal"
    return "duration" if flags[1] else None


def clear_exit_reason(save: str | None) -> None:
    """A run in progress has no exit reason: a crash must not leave an earlier one behind."""
    if save and dist.get_rank() == 0:
        try:
            os.remove(os.path.join(save, EXIT_REASON_FILE))
        except FileNotFoundError:
            pass


def write_exit_reason(save: str | None, reason: str) -> None:
    if save and dist.get_rank() == 0:
        os.makedirs(save, exist_ok=True)
        tmp = os.path.join(save, EXIT_REASON_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(reason + "\n")
        os.replace(tmp, os.path.join(save, EXIT_REASON_FILE))


def train(trainer, metrics_logger, *, flops_per_iteration: float, peak_tflops: float | None,
          stop: StopSignal | None = None, started: float | None = None) -> str:
    """Train from ``trainer.step`` to the end (or a stop); returns the exit reason.

    ``stop``: the signal recorder installed for the whole job; ``started``: when the job
    started (``--exit-duration-in-mins`` counts from there)."""
    cfg = trainer.cfg
    t, ck, log = cfg.training, cfg.checkpoint, cfg.logging
    total = t.iterations
    world = dist.get_world_size()
    show = dist.get_rank() == world - 1  # the last rank holds the loss, as Megatron-LM
    tokens_per_iteration = t.global_batch_size * t.seq_length
    stop = stop or StopSignal(False)
    check_stop = t.exit_signal_handler or t.exit_duration_in_mins is not None
    started = started or time.time()
    clear_exit_reason(ck.save)
    bar = tqdm(total=total, initial=trainer.step, disable=not show, unit="it", dynamic_ncols=True)
    # per-iteration figures since the last log line
    window = {"losses": [], "seconds": 0.0, "attention_flops": 0.0}
    full_attention = attention_flops(cfg.model, t.global_batch_size * t.seq_length ** 2)
    train_seconds, trained, save_seconds = 0.0, 0, 0.0
    reason = "finished" if trainer.step >= total else None
    async_queue = None
    profiler = build_profiler(cfg, dist.get_rank())
    if ck.async_save and ck.save:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        async_queue = AsyncCallsQueue()
    try:
        while reason is None:
            if async_queue is not None:
                async_queue.maybe_finalize_async_calls(blocking=False)
            begin = time.perf_counter()
            step_metrics = trainer.train_step()
            if profiler is not None:
                profiler.step()
            squares = step_metrics.pop("doc_length_squares", None)
            if squares is not None:
                window["attention_flops"] += attention_flops(cfg.model, squares)
            seconds = time.perf_counter() - begin
            window["losses"].append(step_metrics["lm_loss"])
            window["seconds"] += seconds
            train_seconds += seconds
            trained += 1
            it = trainer.step
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['lm_loss']:.4f}",
                            tok_s=f"{tokens_per_iteration * trained / train_seconds:.0f}")
            validation = {}
            if trainer.valid_dataset is not None and t.eval_interval and (
                    it % t.eval_interval == 0 or it == total):
                loss = trainer.evaluate()
                validation = {"validation_lm_loss": loss,
                              "validation_ppl": math.exp(min(loss, 50.0)),
                              **trainer.evaluate_long_context()}
            if it >= total:
                reason = "finished"
            elif t.exit_interval and it % t.exit_interval == 0:
                reason = "interval"
            elif check_stop:
                reason = agreed_stop(stop, started, t.exit_duration_in_mins)
            saved_seconds = None
            if ck.save and (reason or (ck.save_interval and it % ck.save_interval == 0)):
                if not math.isfinite(step_metrics["lm_loss"]):  # even without the NaN check
                    raise FloatingPointError(f"iteration {it}: lm loss is "
                                             f"{step_metrics['lm_loss']}; not saving it")
                begin = time.perf_counter()
                save_checkpoint(trainer, ck.save, save_optim=ck.save_optim,
                                save_rng=ck.save_rng, keep_last=ck.keep_last,
                                async_queue=async_queue)
                saved_seconds = time.perf_counter() - begin
                save_seconds += saved_seconds
            if it % log.log_interval == 0 or reason or validation:
                n = len(window["losses"])
                per_iteration = window["seconds"] / max(n, 1)
                tflops = flops_per_iteration / per_iteration / world / 1e12
                row = {
                    "consumed_samples": it * t.global_batch_size,
                    "elapsed_ms_per_iteration": 1000 * per_iteration,
                    "tflops_per_gpu": tflops,
                    "mfu": tflops / peak_tflops if peak_tflops else None,
                    # with document masks: attention over each document only (sum n^2)
                    "tflops_per_gpu_effective": (
                        (flops_per_iteration - full_attention) / per_iteration / world / 1e12
                        + window["attention_flops"] / n / per_iteration / world / 1e12
                        if window["attention_flops"] else None),
                    "lr": step_metrics["lr"],
                    "global_batch_size": t.global_batch_size,
                    "lm_loss": sum(window["losses"]) / max(n, 1),
                    "grad_norm": step_metrics.get("grad_norm"),
                    "skipped_iterations": 0,  # a non-finite step stops the run instead
                    "nan_iterations": 0,
                    "tokens_per_s": tokens_per_iteration / per_iteration,
                    "peak_memory_gib": peak_memory_gib(),
                    "eta_s": (total - it) * train_seconds / trained,
                    "save_time_s": saved_seconds,
                    **validation,
                }
                row = {k: v for k, v in row.items() if v is not None}
                metrics_logger.log(it, row)
                if show:
                    from megatron_longctx.training.metrics import console_line

                    tqdm.write(console_line(it, total, row))
                window = {"losses": [], "seconds": 0.0, "attention_flops": 0.0}
            maybe_fault("iteration", it)
        if async_queue is not None:  # the last save is complete before the run says it stopped
            async_queue.close()
            async_queue = None
    except FloatingPointError:
        if async_queue is not None:  # a save in flight holds the last good state: publish it
            async_queue.close()
            async_queue = None
        raise
    finally:
        if async_queue is not None:  # any other error: the save in flight stays unpublished
            async_queue.close(abort=True)
        if profiler is not None:
            profiler.stop()
        bar.close()
    write_exit_reason(ck.save, reason)
    if show:
        logger.info("stopped at iteration %d/%d: %s (checkpoint saving took %.1f s)",
                    trainer.step, total, reason, save_seconds)
    return reason
