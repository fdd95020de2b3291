"""Megatron-LM's data-loader flags: --dataloader-type (cyclic: reshuffled each epoch; single: the
dataset's order) and --num-workers (worker processes prepare the coming micro-batches)."""

import os

import torch

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
from megatron_longctx.training.batches import GlobalBatchSampler, PrefetchingLoader, collate
from megatron_longctx.training.trainer import Trainer


class WhoRead(torch.utils.data.Dataset):
    """Sample i is i, and the process that read it."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i]), "pid": torch.tensor(os.getpid())}


def test_workers_prepare_the_same_micro_batches_in_other_processes():
    dataset = WhoRead()
    sampler = GlobalBatchSampler(len(dataset), 8, 2, dp_rank=1, dp_size=2, seed=3)
    loader = PrefetchingLoader(dataset, sampler, num_workers=2)
    try:
        for step in (0, 1, 2, 7, 8):  # 7: a resume elsewhere restarts the workers there
            got = loader.micro_batches(step)
            expected = [collate(dataset, idx) for idx in sampler.micro_batches(step)]
            assert [b["tokens"].tolist() for b in got] == [b["tokens"].tolist() for b in expected]
            assert all((b["pid"] != os.getpid()).all() for b in got)
    finally:
        loader.close()


def trainer(**data) -> Trainer:
    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.num_query_groups = 2, 2
    cfg.training.seq_length, cfg.training.train_iters = 64, 3
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=20), 64))


def test_num_workers_and_dataloader_type_in_training(model_parallel):
    losses = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        t = trainer(num_workers=workers)
        losses[workers] = [t.train_step()["lm_loss"] for _ in range(3)]
        if t.loader is not None:
            t.loader.close()
    assert losses[2] == losses[0]  # the same batches, read elsewhere
    single = trainer(dataloader_type="single").sampler
    assert single.global_batch(0).tolist() == list(range(8))  # the dataset's order
    cyclic = trainer(dataloader_type="cyclic").sampler
    assert cyclic.global_batch(0).tolist() != list(range(8))
