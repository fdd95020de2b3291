"""Train a tiny model for a few steps under several parallel layouts on the same weights/data.

    python layout_worker.py reference OUT.pt                     # single process: all variants
    torchrun --nproc_per_node N layout_worker.py layouts REF.pt OUT_DIR N

A *variant* fixes the RoPE method and the data (plain stream, packed short documents with
document-causal attention, or a loss mask that blanks one CP rank's chunks). Each layout loads
its variant's initial full weights, records the loss of global batches 0..3 (batch 3 is seen
after 3 optimizer steps) and the step-0 gradients gathered across TP.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from model.fake_transformer_engine import FakeTEAttention
from model.fake_transformer_engine import install as install_fake_te

from megatron_longctx.config import RunConfig
from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.model.sharding import full_tensors, local_parameters
from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel
from megatron_longctx.training.trainer import Trainer

STEPS = 4
SEQ = 64
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # one base per KV group; 2 groups over TP=2 puts a different base on each rank
    "harpe": {"rope_type": "harpe", "harpe_bases": [1e4, 5e5]},
    # depends on the whole sequence length, which a CP rank does not see locally
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 16},
}
# variant -> (rope, data)
VARIANTS = {
    "default": ("default", "plain"),
    "harpe": ("harpe", "plain"),
    "default_docs": ("default", "docs"),
    "harpe_docs": ("harpe", "docs"),
    "dynamic_docs": ("dynamic", "docs"),
    "default_masked_chunks": ("default", "masked_chunks"),
    # LongRecipe windows: positions span 4x the sequence, whose length dynamic RoPE depends on
    "dynamic_longrecipe": ("dynamic", "longrecipe"),
    # packed documents, the loss masked on the tail that the per-document CP=2 layout (each
    # document padded to a multiple of 4) pushes out of the sample
    "harpe_docs_tail": ("harpe", "docs_tail"),
}
# layout -> (variant, parallel settings, world size)
LAYOUTS = {
    "tp2": ("default", dict(tensor_model_parallel_size=2), 2),
    "tp2_sp": ("default", dict(tensor_model_parallel_size=2, sequence_parallel=True), 2),
    "pp2": ("default", dict(pipeline_model_parallel_size=2), 2),
    "dp2": ("default", dict(), 2),
    "dp2_distopt": ("default", dict(use_distributed_optimizer=True), 2),
    "tp2_harpe": ("harpe", dict(tensor_model_parallel_size=2), 2),
    "pp2_harpe": ("harpe", dict(pipeline_model_parallel_size=2), 2),
    "cp2": ("default", dict(context_parallel_size=2), 2),
    "cp2_harpe": ("harpe", dict(context_parallel_size=2), 2),
    "cp2_docs": ("default_docs", dict(context_parallel_size=2), 2),
    "cp2_harpe_docs": ("harpe_docs", dict(context_parallel_size=2), 2),
    "cp2_dynamic_docs": ("dynamic_docs", dict(context_parallel_size=2), 2),
    "cp2_masked_rank1": ("default_masked_chunks", dict(context_parallel_size=2), 2),
    "tp2_cp2_harpe_docs": ("harpe_docs", dict(tensor_model_parallel_size=2,
                                              context_parallel_size=2), 4),
    # activation recompute (set on the training config, see `config`)
    "cp2_docs_recompute_selective": ("default_docs", dict(context_parallel_size=2), 2),
    "pp2_recompute_full": ("default", dict(pipeline_model_parallel_size=2), 2),
    "cp2_longrecipe": ("dynamic_longrecipe", dict(context_parallel_size=2), 2),
    "pp2_longrecipe": ("dynamic_longrecipe", dict(pipeline_model_parallel_size=2), 2),
    # each document cut into 2*cp chunks (Transformer Engine's THD layout), on our kernels
    "cp2_docs_document_partition": ("harpe_docs_tail", dict(context_parallel_size=2,
                                                             cp_partition="document"), 2),
    "tp2_cp2_docs_document_partition": ("harpe_docs_tail", dict(
        tensor_model_parallel_size=2, context_parallel_size=2, cp_partition="document"), 4),
    # the same through Transformer Engine's THD attention with CP (its contract faked with
    # torch, tests/model/fake_transformer_engine.py): --cp-partition auto picks document
    "cp2_docs_te_thd": ("harpe_docs_tail", dict(context_parallel_size=2), 2),
}


def config(variant: str, **parallel) -> RunConfig:
    rope, data = VARIANTS[variant]
    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]  # datasets are built here; validate() wants a source
    m, t = cfg.model, cfg.training
    # Megatron-LM pads the vocabulary to a multiple of 128 x TP, so TP=1 and TP=2 would differ in
    # padding rows, whose logits enter the loss; divisor 1 pads 258 (260) the same at both
    m.make_vocab_size_divisible_by = 1
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 4, 64, 128
    m.num_attention_heads, m.num_query_groups = 4, 2
    m.rope_parameters = ROPES[rope]
    t.seq_length, t.micro_batch_size, t.global_batch_size = SEQ, 2, 8  # 4 micro-batches at DP=1
    t.train_iters, t.lr, t.min_lr, t.lr_warmup_iters = STEPS, 1e-3, 1e-4, 1
    if data in ("docs", "docs_tail"):
        cfg.data.reset_attention_mask = cfg.data.reset_position_ids = True
        cfg.data.eod_mask_loss = True
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def layout_config(name: str) -> RunConfig:
    variant, parallel, _ = LAYOUTS[name]
    cfg = config(variant, **parallel)
    if name.endswith("_recompute_selective"):
        cfg.training.recompute_granularity = "selective"
    elif name.endswith("_recompute_full"):
        cfg.training.recompute_granularity = "full"
    return cfg


class _MaskLoss(torch.utils.data.Dataset):
    """The inner samples with the loss blanked where ``blank(sample)`` (bool ``[s]``) says."""

    def __init__(self, inner, blank):
        self.inner, self.blank = inner, blank

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        sample = dict(self.inner[i])
        sample["loss_mask"] = sample["loss_mask"].masked_fill(self.blank(sample), 0.0)
        return sample


def _cp_rank1_chunks(sample) -> torch.Tensor:
    """Chunks 1 and 2 of 4: all of CP rank 1's tokens at CP=2."""
    blank = torch.zeros(SEQ, dtype=torch.bool)
    blank[SEQ // 4:3 * SEQ // 4] = True
    return blank


def _padded_out_tail(sample) -> torch.Tensor:
    """The tokens that padding each document to a multiple of 4 (CP=2's per-document layout)
    pushes past the sample's end."""
    blank = torch.zeros(SEQ, dtype=torch.bool)
    starts, slot = sample["doc_starts"], 0
    for a, b in zip(starts, [*starts[1:], SEQ]):
        kept = max(0, min(b - a, SEQ - slot))
        blank[a + kept:b] = True
        slot += -(-kept // 4) * 4
    return blank


class _Documents:
    """In-memory documents with the indexed-dataset interface the sample builders use."""

    def __init__(self, docs: list[np.ndarray]):
        self.docs = docs
        self.sequence_lengths = np.array([len(d) for d in docs])

    def get(self, i, offset=0, length=None):
        return self.docs[i][offset:None if length is None else offset + length]


def dataset(cfg: RunConfig, variant: str):
    data = VARIANTS[variant][1]
    options = SampleOptions(SEQ, eod=ByteTokenizer.eod,
                            reset_position_ids=cfg.data.reset_position_ids,
                            eod_mask_loss=cfg.data.eod_mask_loss)
    if data == "longrecipe":
        from megatron_longctx.data.samples.document_windows import DocumentWindows
        from megatron_longctx.methods.position_transform import (
            PositionTransform,
            sentence_end_table,
        )

        docs = [np.frombuffer(t[:1000].encode(), np.uint8).astype(np.int32)
                for t in stdlib_documents(max_docs=12)]
        options = SampleOptions(SEQ, eod=ByteTokenizer.eod, position_transform=PositionTransform(
            "longrecipe", 4 * SEQ, seed=1, sentence_ends=sentence_end_table(ByteTokenizer())))
        return DocumentWindows("stdlib", _Documents(docs), np.arange(len(docs)), 64, options)
    if data in ("docs", "docs_tail"):
        # short real-text documents (3-40 bytes), several per sample, some crossing CP chunks
        rng = np.random.default_rng(0)
        text = "".join(stdlib_documents(max_docs=5)).encode()
        parts, pos = [], 0
        while pos < 60_000:
            n = int(rng.integers(3, 40))
            parts += [np.frombuffer(text[pos:pos + n], np.uint8).astype(np.int32), [257]]
            pos += n
        docs = TokenStreamDataset(np.concatenate(parts).astype(np.int32), SEQ, options)
        return _MaskLoss(docs, _padded_out_tail) if data == "docs_tail" else docs
    plain = TokenStreamDataset(stdlib_token_stream(max_docs=40), SEQ, options)
    return _MaskLoss(plain, _cp_rank1_chunks) if data == "masked_chunks" else plain


def step0_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    loss = trainer.forward_backward(0)["lm_loss"]
    params = local_parameters(trainer.model)
    grads = {n: p.main_grad.detach().clone() for n, p in params.items()}
    return loss, full_tensors(trainer.model, grads)


def train_losses(trainer: Trainer) -> list[float]:
    return [trainer.train_step()["lm_loss"] for _ in range(STEPS)]


def reference(out: str) -> None:
    init_process_group()
    refs = {}
    for variant in VARIANTS:
        cfg = config(variant)
        cfg.validate(1)
        initialize_model_parallel(cfg.parallel, cfg.training.seed)
        trainer = Trainer(cfg, dataset(cfg, variant))
        init_state = {n: t.clone() for n, t in full_tensors(trainer.model).items()}
        loss0, grads = step0_grads(trainer)
        refs[variant] = {"state": init_state, "loss0": loss0, "grads": grads,
                         "losses": train_losses(trainer)}
    torch.save(refs, out)


def layouts(ref_path: str, out_dir: str, world: int) -> None:
    init_process_group()
    refs = torch.load(ref_path)
    results = {}
    for name, (variant, _, layout_world) in LAYOUTS.items():
        if layout_world != world:
            continue
        ref = refs[variant]
        faked = name.endswith("_te_thd")
        with pytest.MonkeyPatch.context() as patch:
            if faked:  # Transformer Engine "usable", its attention faked with torch
                install_fake_te(patch.setattr)
            results[name] = run_layout(name, variant, ref)
        if faked:  # the THD calls our attention made to (fake) TE
            results[name]["te_thd_calls"] = sum(c[0] == "thd" for c in FakeTEAttention.calls)
    with open(os.path.join(out_dir, f"world{world}_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)


def run_layout(name: str, variant: str, ref: dict) -> dict:
    cfg = layout_config(name)
    cfg.validate(dist.get_world_size())
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    trainer = Trainer(cfg, dataset(cfg, variant), init_state_dict=ref["state"])
    result = {"document_partition": trainer.stage.document_partition}
    if not cfg.parallel.use_distributed_optimizer:  # grads stay whole only without it
        loss0, grads = step0_grads(trainer)
        result["loss0_diff"] = abs(loss0 - ref["loss0"])
        result["grad_max_abs_diff"] = max(
            (g - ref["grads"][n]).abs().max().item() for n, g in grads.items())
        result["grad_max_abs"] = max(ref["grads"][n].abs().max().item() for n in grads)
        result["num_grads_compared"] = len(grads)
        result["grads_finite"] = all(torch.isfinite(g).all().item() for g in grads.values())
    losses = train_losses(trainer)
    result["losses"] = losses
    result["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
    return result


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(sys.argv[2])
    else:
        layouts(sys.argv[2], sys.argv[3], int(sys.argv[4]))
