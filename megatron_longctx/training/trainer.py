"""The training loop: megatron-core's DDP, optimizer and pipeline schedules around our model."""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_longctx.config import RunConfig
from megatron_longctx.model import build_model
from megatron_longctx.model.sharding import load_full_state_dict
from megatron_longctx.training.batch_broadcast import StageBatches
from megatron_longctx.training.batches import GlobalBatchSampler, PrefetchingLoader, collate
from megatron_longctx.training.faults import maybe_poison_weights
from megatron_longctx.training.flops import document_lengths
from megatron_longctx.training.schedule import build_scheduler

logger = logging.getLogger(__name__)


def masked_token_loss(loss_mask: Tensor, groups: Tensor, num_groups: int,
                      output_tensor: Tensor):
    """Sum of per-token losses over valid tokens, and their count.

    Returning the count lets megatron-core normalise by the number of valid tokens of the whole
    global batch (across micro-batches and DP/CP ranks), not by a per-micro-batch mean.
    ``groups [k, b*s]``: each token's group under k groupings (position bucket, blend source),
    reported as ``[num_groups, 2]`` loss sums and token counts.
    """
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float() * mask
    loss_sum = losses.sum()
    num_tokens = mask.sum().to(torch.int)
    by_group = torch.zeros(num_groups, 2, dtype=torch.float64, device=losses.device)
    for index in groups:
        by_group[:, 0].index_add_(0, index, losses.detach().double())
        by_group[:, 1].index_add_(0, index, mask.double())
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()]),
                                  "groups": by_group}


def _short(n: int) -> str:
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


class Trainer:
    def __init__(self, cfg: RunConfig, dataset, init_state_dict: dict[str, Tensor] | None = None,
                 valid_dataset=None):
        self.cfg = cfg
        t, p = cfg.training, cfg.parallel
        self.dataset = dataset
        # wrapped in DDP below: fused wgrad accumulation into main_grad where the GPU has it
        self.model = build_model(cfg.model, p, t.bf16, t, grad_accumulation_fusion=True)
        if init_state_dict is not None:
            load_full_state_dict(self.model, init_state_dict)
        config = self.model.config
        config.calculate_per_token_loss = True
        self.ddp = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=not (t.bf16 and p.grad_reduce_in_bf16),
                overlap_grad_reduce=p.overlap_grad_reduce,
                overlap_param_gather=p.overlap_param_gather,
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            self.model,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=t.optimizer, sgd_momentum=t.sgd_momentum,
                lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                clip_grad=t.clip_grad, bf16=t.bf16, params_dtype=config.params_dtype,
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            [self.ddp],
        )
        self.scheduler = build_scheduler(t, self.optimizer)  # sets iteration 0's rate
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.ddp.no_sync
        # --dataloader-type: cyclic reshuffles every epoch, single keeps the dataset's order
        self.sampler = self._sampler(dataset, shuffle=cfg.data.dataloader_type == "cyclic")
        # one rank per TP group reads (first and last stages), the others receive
        self.stage = StageBatches(document_partition=cfg.cp_document_partition())
        self.loader = (PrefetchingLoader(dataset, self.sampler, cfg.data.num_workers,
                                         self.stage.prepare)
                       if cfg.data.num_workers > 0 and self.stage.reads else None)
        self.valid_dataset = valid_dataset
        self.long_documents = None  # held-out long documents for evaluate_long_context()
        if valid_dataset is not None:  # the same batches at every evaluation
            self.valid_sampler = self._sampler(valid_dataset, shuffle=False)
        self.step = 0
        # loss groups: position buckets (position ids as the model sees them), blend sources
        bounds = t.loss_position_buckets
        self._bucket_bounds = torch.tensor(bounds, device=torch.cuda.current_device())
        edges = [0, *bounds]
        self.group_names = [f"pos_{_short(a)}_{_short(b)}" for a, b in zip(edges, bounds)]
        self.group_names.append(f"pos_{_short(edges[-1])}_plus")
        self.group_names += [f"source_{n}" for n in getattr(dataset, "names", [])]

    def _sampler(self, dataset, shuffle: bool) -> GlobalBatchSampler:
        t = self.cfg.training
        return GlobalBatchSampler(
            len(dataset), t.global_batch_size, t.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), seed=t.seed, shuffle=shuffle)

    def sync_parameters(self) -> None:
        """With ``--overlap-param-gather`` the distributed optimizer's updated shards reach the
        other DP ranks only in the next forward (megatron-core's pre-hooks): gather them now,
        before a checkpoint reads the parameters (as Megatron-LM does around saves)."""
        if self.cfg.parallel.overlap_param_gather:
            self.ddp.disable_forward_pre_hook()  # param_sync=True: all-gathers every bucket
            self.ddp.enable_forward_pre_hook()

    # -- one step ---------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        # this stage's fields, already this CP rank's slice (batch_broadcast: tokens only in
        # the first stage, labels/loss_mask/source only in the last)
        batch = next(data_iterator)
        device = torch.cuda.current_device()  # the CPU on CPU machines (cpu_adapter)
        local = {k: batch[k].to(device, non_blocking=True)
                 for k in ("tokens", "labels", "loss_mask", "position_ids") if k in batch}
        doc_starts = batch.get("doc_starts") if self.cfg.data.reset_attention_mask else None
        output = model(local.get("tokens"), local["position_ids"], None,
                       labels=local.get("labels"), doc_starts=doc_starts,
                       rope_seq_len=batch["rope_seq_len"], documents=batch.get("documents"))
        if "loss_mask" not in local:  # not the last stage: megatron-core computes no loss here
            return output, None
        buckets = torch.bucketize(local["position_ids"].reshape(-1), self._bucket_bounds,
                                  right=True)
        groups = [buckets]
        if "source" in batch and len(self.group_names) > len(self._bucket_bounds) + 1:
            source = batch["source"].to(device)[:, None].expand_as(local["position_ids"])
            groups.append(source.reshape(-1) + len(self._bucket_bounds) + 1)
        return output, partial(masked_token_loss, local["loss_mask"], torch.stack(groups),
                               len(self.group_names))

    def forward_backward(self, step: int, forward_only: bool = False, validation: bool = False
                         ) -> dict[str, float]:
        """Run all micro-batches of global batch ``step``; returns the mean token loss
        (``lm_loss``) and the loss by position bucket and by blend source, on every rank.

        Gradients are left in ``param.main_grad`` (DP-reduced, divided by the token count).
        ``validation``: batch ``step`` of the validation set instead of the training set.
        """
        t = self.cfg.training
        dataset, sampler = ((self.valid_dataset, self.valid_sampler) if validation
                            else (self.dataset, self.sampler))

        def read() -> list[dict]:  # on the reading ranks only
            if self.loader is not None and not validation:
                return self.loader.micro_batches(step)
            return [collate(dataset, idx, self.stage.prepare)
                    for idx in sampler.micro_batches(step)]

        micro = self.stage.micro_batches(read)
        squares = 0  # sum of document length^2: the attention work with document masks
        if self.cfg.data.reset_attention_mask and not forward_only:
            squares = sum(n * n for batch in micro for lengths in
                          document_lengths(batch["doc_starts"], t.seq_length) for n in lengths)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro),
            model=[self.ddp],
            num_microbatches=len(micro),
            seq_length=t.seq_length,  # megatron-core divides by CP (and TP with SP) itself
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        return self._global_mean_loss(reports, squares)

    def _global_mean_loss(self, reports: list[dict], squares: int) -> dict[str, float]:
        # [1 + groups + 1, 2]: (loss sum, token count) of the whole batch, then of each group;
        # the last row holds the document-length squares (same on every CP rank)
        totals = torch.zeros(2 + len(self.group_names), 2, dtype=torch.float64,
                             device=torch.cuda.current_device())
        if parallel_state.is_pipeline_last_stage():
            for report in reports:
                totals[0] += report["lm loss"].double()
                totals[1:-1] += report["groups"]
            totals[-1, 0] = squares / parallel_state.get_context_parallel_world_size()
            dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        totals = totals.tolist()  # syncs: the loss is logged each step
        result = {"lm_loss": totals[0][0] / max(totals[0][1], 1)}
        if len(self.group_names) > 1:  # one bucket and one source say nothing new
            result.update({f"lm_loss_{name}": s / n for name, (s, n)
                           in zip(self.group_names, totals[1:-1]) if n > 0})
        if squares:
            result["doc_length_squares"] = totals[-1][0]
        return result

    def evaluate(self) -> float:
        """Mean token loss over ``eval_iters`` fixed validation batches."""
        t = self.cfg.training
        losses = [self.forward_backward(i, forward_only=True, validation=True)["lm_loss"]
                  for i in range(t.eval_iters)]
        return sum(losses) / len(losses)

    def evaluate_long_context(self) -> dict[str, float]:
        """``validation_ppl_<L>`` for each ``--eval-lengths`` L on the held-out long documents
        (the shared scorer of :mod:`megatron_longctx.eval`); empty without them or with CP > 1
        (whole-sequence forward)."""
        lengths = self.cfg.training.eval_lengths
        if not lengths or not self.long_documents or \
                parallel_state.get_context_parallel_world_size() > 1:
            return {}
        from megatron_longctx.eval.perplexity import perplexity_by_length
        from megatron_longctx.model import CausalLM

        device = torch.cuda.current_device()
        docs = [doc.to(device) for doc in self.long_documents]
        results = perplexity_by_length(CausalLM(self.model, self.cfg.model), docs, lengths)
        return {f"validation_ppl_{length}": r["ppl"] for length, r in results.items()}

    def _nonfinite_gradients(self) -> bool:
        """True on every rank when any rank holds a NaN/inf gradient.

        megatron-core reports non-finite gradients only through the fp16 loss scaler; in fp32
        and bf16 the update would go ahead and poison the weights, so we look before it.
        """
        bad = any(not torch.isfinite(buffer.grad_data).all() for buffer in self.ddp.buffers)
        flag = torch.tensor([float(bad)], device=torch.cuda.current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train_step(self) -> dict[str, float]:
        """One iteration: forward/backward of the global batch, then the update.

        Raises ``FloatingPointError`` before the update when the loss or a gradient is not
        finite (``--check-for-nan-in-loss-and-grad``): the weights stay as they were.
        """
        t = self.cfg.training
        lr = self.optimizer.param_groups[0]["lr"]  # set by the scheduler for this iteration
        maybe_poison_weights(self.model, self.step + 1)
        report = self.forward_backward(self.step)
        loss = report["lm_loss"]
        if t.check_for_nan_in_loss_and_grad:
            if not math.isfinite(loss):
                raise FloatingPointError(f"iteration {self.step + 1}: lm loss is {loss}")
            if self._nonfinite_gradients():
                raise FloatingPointError(f"iteration {self.step + 1}: NaN/inf gradients "
                                         f"(loss {loss:.4f})")
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"iteration {self.step + 1}: update skipped (inf/NaN "
                                     f"gradients)")
        self.scheduler.step(increment=t.global_batch_size)
        self.step += 1
        metrics = {**report, "lr": lr}
        if grad_norm is not None and t.clip_grad > 0:  # computed only when clipping
            metrics["grad_norm"] = float(grad_norm)
        return metrics
