"""Validation loss: fixed batches from the held-out split, no parameter change."""

import numpy as np
import torch

from megatron_longctx.config import RunConfig
from megatron_longctx.data.long_context_dataset import SampleOptions, build_blended_dataset
from megatron_longctx.training.run import build_datasets
from megatron_longctx.training.trainer import Trainer


def test_evaluate_is_deterministic_and_tracks_training(model_parallel):
    cfg = RunConfig()
    cfg.training.seq_length, cfg.training.train_iters = 128, 12
    cfg.training.eval_interval, cfg.training.eval_iters = 6, 2
    cfg.data.split = "90,10,0"
    train, valid = build_datasets(cfg)
    assert valid is not None and len(valid) < len(train)
    trainer = Trainer(cfg, train, valid_dataset=valid)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first == again
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logged = {}
    trainer.train(on_log=lambda step, m: logged.update({step: m}))
    assert set(k for k, m in logged.items() if "validation_loss" in m) == {6, 12}
    assert logged[12]["validation_loss"] < first - 0.5


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
