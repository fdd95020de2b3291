"""Start a run from a config: validate, set up parallel groups, data, model; then train."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import yaml

from megatron_longctx.config import RunConfig
from megatron_longctx.data.formats.dataset_check import check_training_data
from megatron_longctx.data.samples.blend import resolve_data_sources
from megatron_longctx.data.samples.blended_dataset import build_split_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.data.samples.packing import split_documents
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.data.tokenization.tokenizers import build_tokenizer
from megatron_longctx.methods.position_transform import PositionTransform, sentence_end_table
from megatron_longctx.parallel.initialize import (
    destroy,
    distributed_env,
    init_process_group,
    initialize_model_parallel,
    set_cuda_device_max_connections,
)
from megatron_longctx.training.checkpoint import latest_step, load_checkpoint, load_common
from megatron_longctx.training.checkpoint_schema import vocabulary_fits
from megatron_longctx.training.loop import (
    StopSignal,
    agreed_stop,
    clear_exit_reason,
    train,
    write_exit_reason,
)
from megatron_longctx.training.pretrained import (
    apply_checkpoint_args,
    check_checkpoint_shapes,
    check_saved_shape,
    rope_change,
)
from megatron_longctx.training.starting_point import checkpoint_to_load, resumes, start_over

logger = logging.getLogger("megatron_longctx")


def build_datasets(cfg: RunConfig, tokenizer=None):
    """Training and validation datasets (the latter None without ``--eval-interval``) and the
    held-out long documents of ``--eval-lengths`` (or None); sets ``cfg.model.vocab_size`` from
    the tokenizer."""
    d, t = cfg.data, cfg.training
    tokenizer = tokenizer or build_tokenizer(d.tokenizer_type, d.tokenizer_model,
                                             d.vocab_size)
    cfg.model.vocab_size = tokenizer.vocab_size
    options = SampleOptions(t.seq_length, eod=tokenizer.eod,
                            reset_position_ids=d.reset_position_ids,
                            eod_mask_loss=d.eod_mask_loss,
                            position_transform=position_transform(cfg, tokenizer),
                            pack_short=d.pack_short)
    evaluate = bool(t.eval_interval)
    long_context = evaluate and bool(t.eval_lengths)
    longest = max(t.eval_lengths) if long_context else 0
    sources = resolve_data_sources(d)
    if sources.kind in ("blend", "per_split"):  # mock and stdlib data hold no files to check
        blends = [sources.blend] if sources.kind == "blend" else sources.per_split
        check_training_data([p for b in blends if b for p in b.prefixes], tokenizer.vocab_size,
                            d.data_cache_path)  # every file, before any sample index or model
    if sources.kind == "stdlib":
        tokens = stdlib_token_stream(tokenizer)
        (a, b), (c, e), _ = split_documents(len(tokens), sources.split)  # token ranges here
        valid = TokenStreamDataset(tokens[c:e], t.seq_length, options) if evaluate else None
        docs = None
        if long_context:  # the held-out stream cut into documents of the longest length
            held_out = torch.from_numpy(tokens[c:e].astype("int64"))
            docs = [held_out[i:i + longest] for i in range(0, len(held_out) - longest + 1,
                                                            longest)][:t.eval_documents]
        return TokenStreamDataset(tokens[a:b], t.seq_length, options), valid, docs
    if sources.kind == "mock" and d.split is not None:
        logger.info("--mock-data: split %s (megatron-core's, --split %s is not used)",
                    sources.split, d.split)
    train = build_split_dataset(sources, 0, t.iterations * t.global_batch_size, options,
                                t.seed, tokenizer, d.length_upsample, d.data_cache_path)
    valid = docs = None
    if evaluate:
        valid = build_split_dataset(sources, 1, t.eval_iters * t.global_batch_size, options,
                                    t.seed, tokenizer, None, d.data_cache_path)
        if valid is None:
            raise ValueError("--eval-interval needs validation data: a --split with a "
                             "validation share, or --valid-data-path")
    if long_context:
        docs = held_out_documents(sources, longest, t.eval_documents)
    return train, valid, docs


def position_transform(cfg: RunConfig, tokenizer) -> PositionTransform | None:
    """``--position-transform``'s sample function (validation samples get it too: the loss
    is then measured on positions like the training ones)."""
    d = cfg.data
    if d.position_transform == "none":
        return None
    ends = sentence_end_table(tokenizer) if d.position_transform == "longrecipe" else None
    return PositionTransform(d.position_transform, d.target_length, cfg.training.seed, ends)


def held_out_documents(sources, min_length: int, count: int) -> list | None:
    """Validation-split documents of at least ``min_length`` tokens, ``count`` at most, taken
    from the sources in order."""
    from megatron_longctx.data.samples.long_context_dataset import open_indexed
    from megatron_longctx.data.samples.packing import document_range
    from megatron_longctx.eval.perplexity import long_documents

    docs = []
    chosen = sources.for_split(1) if sources.kind != "mock" else None
    for prefix in chosen[0].prefixes if chosen else ():
        indexed = open_indexed(prefix)
        start, end = document_range(len(indexed.sequence_lengths), chosen[1])
        docs += long_documents(indexed, min_length, count - len(docs), start, end)
        if len(docs) >= count:
            break
    if not docs:
        logger.warning("--eval-lengths: no held-out document has %d tokens; long-context "
                       "validation is skipped", min_length)
    return docs or None


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(cfg: RunConfig, model, world_size: int) -> dict:
    """Parameter count of this rank and the peak memory of the most loaded rank, from the
    estimator the layout planner uses (``megatron_longctx.training.memory``)."""
    from megatron_longctx.training.memory import GIB, estimate_memory

    estimate = estimate_memory(cfg, world_size)
    return {"parameters_this_rank": sum(p.numel() for p in model.parameters()),
            "memory_estimate_gib_per_rank": round(estimate.total / GIB, 3),
            "memory_peak_at": estimate.peak_phase.name}


def _write_run_record(cfg: RunConfig) -> None:
    os.makedirs(cfg.checkpoint.save, exist_ok=True)
    with open(os.path.join(cfg.checkpoint.save, "run.yaml"), "w") as f:
        yaml.safe_dump({"config": cfg.to_dict(), "git_revision": _git_revision(),
                        "command": sys.argv}, f, sort_keys=False)


def prepare_stage(cfg: RunConfig, world_size: int, load_weights: bool = True):
    """Validate, set up groups, data and model, and load the starting weights: the trainer,
    ready at its first iteration (0, or the resumed one). ``load_weights=False`` (dry runs)
    builds the model without reading any checkpoint."""
    path, weights_only = checkpoint_to_load(cfg) if load_weights else (None, False)
    saved_args = load_common(path).get("args") or {} if path else {}
    if cfg.checkpoint.use_checkpoint_args:
        if path:
            apply_checkpoint_args(cfg, saved_args)
        elif load_weights:  # as Megatron-LM: nothing to take the arguments from
            logger.warning("--use-checkpoint-args: no checkpoint to read; using the flags")
    if path:  # one line naming the flag, before any data or model work
        check_saved_shape(saved_args, cfg.model, path)
    cfg.validate(world_size)  # before any data or model work
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model,
                                cfg.data.vocab_size)
    saved_vocab = (saved_args.get("model") or {}).get("vocab_size")
    if not vocabulary_fits(saved_args, tokenizer.vocab_size):  # Megatron-LM's: padded only
        raise ValueError(f"{path} was trained with a {saved_vocab}-token vocabulary, the "
                         f"tokenizer of this run has {tokenizer.vocab_size}; give the "
                         f"checkpoint's tokenizer (--tokenizer-type/--tokenizer-model)")
    dataset, valid_dataset, long_documents = build_datasets(cfg, tokenizer)
    from megatron_longctx.training.trainer import Trainer

    trainer = Trainer(cfg, dataset, valid_dataset=valid_dataset)
    trainer.long_documents = long_documents
    trainer.resumed_from = None if weights_only else path  # --override-save: keep if ours
    if path:
        check_checkpoint_shapes(trainer.model, path)
        change = rope_change(saved_args, cfg.model)
        if change and dist.get_rank() == world_size - 1:
            logger.info(change)
        ck = cfg.checkpoint
        load_checkpoint(trainer, path, load_optim=ck.load_optim, load_rng=ck.load_rng,
                        weights_only=weights_only)
        logger.info("%s %s: starting at iteration %d of %d",
                    "weights from" if weights_only else "resumed", path, trainer.step,
                    cfg.training.iterations)
    return trainer


def run_stage(cfg: RunConfig, world_size: int, stop: StopSignal, started: float,
              dry_run: bool = False) -> str:
    """Prepare and train one stage; returns its exit reason."""
    trainer = prepare_stage(cfg, world_size, load_weights=not dry_run)
    is_last = dist.get_rank() == world_size - 1
    if is_last:
        logger.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        logger.info("model: %s", json.dumps(describe(cfg, trainer.model, world_size)))
        if dry_run:
            from megatron_longctx.training.memory import estimate_memory

            logger.info("memory per rank:\n%s", estimate_memory(cfg, world_size).explain())
    if dry_run:
        return "dry_run"
    ck = cfg.checkpoint
    if ck.save and dist.get_rank() == 0:
        if ck.override_save and not resumes(ck.save, trainer.resumed_from):
            start_over(ck.save)  # asked for, and only now that the run is ready to train
        _write_run_record(cfg)
    from megatron_longctx.training.flops import num_floating_point_operations, peak_tflops
    from megatron_longctx.training.metrics import MetricsLogger

    log, t = cfg.logging, cfg.training
    metrics = MetricsLogger(save_dir=cfg.checkpoint.save, tensorboard_dir=log.tensorboard_dir,
                            wandb_project=log.wandb_project, wandb_exp_name=log.wandb_exp_name,
                            wandb_save_dir=log.wandb_save_dir, config=cfg.to_dict(),
                            resume_iteration=trainer.step, enabled=is_last)
    try:
        flops = num_floating_point_operations(cfg.model, t.seq_length, t.global_batch_size,
                                              tp=cfg.parallel.tensor_model_parallel_size)
        peak = (peak_tflops(torch.bfloat16 if t.bf16 else torch.float32, t.peak_tflops)
                if is_last else None)  # only the logging rank reports MFU
        return train(trainer, metrics, flops_per_iteration=flops, peak_tflops=peak, stop=stop,
                     started=started)
    finally:
        metrics.close()
        if trainer.loader is not None:
            trainer.loader.close()  # --num-workers processes
        del trainer  # its model and optimizer hold reference cycles (config hooks)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stage_finished(cfg: RunConfig) -> bool:
    """True when the stage's save directory holds its final checkpoint."""
    save = cfg.checkpoint.save
    step = latest_step(save) if save and os.path.isdir(save) else None
    return step is not None and step >= cfg.training.iterations


def main(stages: list[RunConfig] | RunConfig, dry_run: bool = False,
         world_size: int | None = None, notes: list[str] = ()) -> str:
    """Run the stages in order (a finished stage is skipped: rerunning the same command
    resumes); returns the last exit reason. Every exit path shuts the process groups down.
    A staged run also writes the overall reason to ``exit_reason`` beside its stages.

    ``world_size`` (dry runs): validate for that many ranks; when it is not the number
    launched, the dry run stops after validating. ``notes``: Megatron-LM flags accepted
    without effect here, logged once."""
    started = time.time()  # --exit-duration-in-mins counts from here, across stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # ours at INFO, theirs quieter
    stages = stages if isinstance(stages, list) else [stages]
    env = distributed_env()
    world = world_size or env.world_size
    layout_only = dry_run and world != env.world_size  # no cluster: validate the flags only
    try:
        for cfg in stages:  # every stage's layout, before any process group or work
            if layout_only or not cfg.checkpoint.use_checkpoint_args:  # else: after the
                cfg.validate(world)  # checkpoint's shape is read
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if env.rank == 0 and notes:
        logger.info("Megatron-LM flags accepted with no effect here:\n  %s", "\n  ".join(notes))
    if layout_only:
        for cfg in stages:
            p = cfg.parallel
            logger.info("layout valid for %d ranks: TP=%d PP=%d CP=%d DP=%d", world,
                        p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                        p.context_parallel_size, p.data_parallel_size(world))
            from megatron_longctx.training.memory import estimate_memory

            logger.info("memory per rank (vocabulary %d from the recipe, the tokenizer is not "
                        "read):\n%s", cfg.model.vocab_size,
                        estimate_memory(cfg, world).explain())
        return "dry_run"
    stop = StopSignal(any(cfg.training.exit_signal_handler for cfg in stages))
    set_cuda_device_max_connections(cfg.parallel for cfg in stages)  # before CUDA starts
    init_process_group(env, stages[0].parallel.distributed_timeout_minutes,
                       stages[0].parallel.distributed_backend)
    root = os.path.dirname(stages[0].checkpoint.save) if len(stages) > 1 else None
    clear_exit_reason(root)
    reason = "finished"
    try:
        for k, cfg in enumerate(stages, start=1):
            if len(stages) > 1:
                if stage_finished(cfg) and not dry_run:
                    logger.info("stage %d/%d already finished (%s)", k, len(stages),
                                cfg.checkpoint.save)
                    continue
                if k > 1 and not dry_run and agreed_stop(stop, started, None):
                    reason = "signal"  # arrived at the end of the previous stage
                    break
                logger.info("stage %d/%d: %s", k, len(stages), cfg.checkpoint.save)
            reason = run_stage(cfg, env.world_size, stop, started, dry_run)
            if reason not in ("finished", "dry_run"):
                break  # preempted: the rerun resumes this stage
        if root and not dry_run:
            write_exit_reason(root, reason)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    except FloatingPointError as err:
        raise SystemExit(f"error: {err}. Stopped before the update; the last checkpoint "
                         f"saved is the last good one (lower --lr, check the data, or resume "
                         f"from it with a different --seed).") from None
    finally:
        stop.restore()
        destroy()
    return reason
