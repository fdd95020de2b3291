"""Validation loss: fixed batches from the held-out split, no parameter change."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.training import loop
from megatron_longctx.training.metrics import MetricsLogger
from megatron_longctx.training.run import build_datasets
from megatron_longctx.training.trainer import Trainer


def test_evaluate_is_deterministic_and_tracks_training(model_parallel, tmp_path):
    cfg = RunConfig()
    cfg.training.seq_length, cfg.training.train_iters = 128, 12
    cfg.training.eval_interval, cfg.training.eval_iters = 6, 2
    cfg.training.eval_lengths, cfg.training.eval_documents = [32, 128], 2
    cfg.data.data_path, cfg.data.split = ["stdlib"], "90,10,0"
    train, valid, docs = build_datasets(cfg)
    assert valid is not None and len(valid) < len(train)
    assert [len(d) for d in docs] == [128, 128]
    trainer = Trainer(cfg, train, valid_dataset=valid)
    trainer.long_documents = docs
    before = [p.detach().clone() for p in trainer.model.parameters()]
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first == again
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    metrics = MetricsLogger(save_dir=str(tmp_path), tensorboard_dir=None, wandb_project=None,
                            wandb_exp_name=None, wandb_save_dir=None, config={},
                            resume_iteration=0, enabled=True)
    assert loop.train(trainer, metrics, flops_per_iteration=1.0, peak_tflops=1.0) == "finished"
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = {r["iteration"]: r for r in rows if "validation_lm_loss" in r}
    assert set(validated) == {6, 12}
    assert validated[12]["validation_lm_loss"] < first - 0.5
    assert validated[12]["validation_ppl"] == pytest.approx(
        math.exp(validated[12]["validation_lm_loss"]))
    # long-context validation: float64 cross entropy over the real vocabulary (padding rows
    # of the output layer excluded, as in the exported model)
    with torch.no_grad():
        tokens = torch.stack(docs)  # [2, 128]: one window of 128 covers each document
        logits = trainer.model(tokens, torch.arange(128)[None].expand(2, -1), None)
        logits = logits[:, :-1, :cfg.model.vocab_size].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                tokens[:, 1:].reshape(-1))
    assert validated[12]["validation_ppl_128"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert validated[12]["validation_ppl_32"] > validated[12]["validation_ppl_128"] * 0.9


def test_validation_split_uses_only_held_out_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for i in range(100):
        builder.add_document(torch.full((30,), i, dtype=torch.int32), [30])
    builder.finalize(prefix + ".idx")
    options = SampleOptions(16, eod=-1)
    valid = build_blended_dataset([prefix], "80,20,0", 30, options, seed=0, split_index=1)
    train = build_blended_dataset([prefix], "80,20,0", 30, options, seed=0, split_index=0)
    assert set(valid.order.tolist()) <= set(range(80, 100))
    assert set(train.order.tolist()) <= set(range(80))
