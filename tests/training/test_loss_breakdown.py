"""The loss by position bucket and by blend source equals the per-token losses grouped by hand."""

import numpy as np
import pytest
import torch

from megatron_longctx.config import RunConfig
from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
from megatron_longctx.data.samples.long_context_dataset import SampleOptions
from megatron_longctx.training.batches import collate
from megatron_longctx.training.trainer import Trainer


def _source(path, value_range, lengths):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.int32)
    rng = np.random.default_rng(len(str(path)))
    for n in lengths:
        builder.add_document(torch.from_numpy(rng.integers(*value_range, n).astype(np.int32)),
                             [n])
    builder.finalize(str(path) + ".idx")
    return str(path)


def test_loss_by_position_bucket_and_source(model_parallel, tmp_path):
    code = _source(tmp_path / "code_text_document", (0, 100), [90] * 40)
    prose = _source(tmp_path / "prose_text_document", (100, 250), [30, 50] * 20)
    cfg = RunConfig()
    t = cfg.training
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.train_iters = 64, 2, 8, 1
    t.loss_position_buckets = [16, 48]
    cfg.data.reset_position_ids = True
    options = SampleOptions(64, eod=-1, reset_position_ids=True)
    data = build_blended_dataset(["0.5", code, "0.5", prose], "100,0,0", 8, options, seed=3)
    trainer = Trainer(cfg, data)
    report = trainer.forward_backward(0, forward_only=True)

    sums, counts = {}, {}
    with torch.no_grad():
        for idx in trainer.sampler.micro_batches(0):
            batch = collate(data, idx)
            losses = trainer.model(batch["tokens"], batch["position_ids"], None,
                                   labels=batch["labels"]).double()  # [b, s]
            for b in range(losses.shape[0]):
                source = data.names[int(batch["source"][b])]
                for pos, loss in zip(batch["position_ids"][b].tolist(), losses[b].tolist()):
                    bucket = "pos_0_16" if pos < 16 else "pos_16_48" if pos < 48 else \
                        "pos_48_plus"
                    for key in (bucket, f"source_{source}"):
                        sums[key] = sums.get(key, 0.0) + loss
                        counts[key] = counts.get(key, 0) + 1
    assert data.names == ["code", "prose"]
    assert set(sums) == {"pos_0_16", "pos_16_48", "pos_48_plus", "source_code", "source_prose"}
    for key in sums:
        assert report[f"lm_loss_{key}"] == pytest.approx(sums[key] / counts[key], rel=1e-6), key
    total = sum(sums[k] for k in sums if k.startswith("pos")) / sum(
        counts[k] for k in counts if k.startswith("pos"))
    assert report["lm_loss"] == pytest.approx(total, rel=1e-6)


def test_document_length_squares_for_effective_flops(model_parallel, tmp_path):
    docs = _source(tmp_path / "docs_text_document", (0, 200), [5, 17, 40, 3, 64, 30] * 10)
    cfg = RunConfig()
    t = cfg.training
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.train_iters = 64, 2, 8, 1
    cfg.data.reset_attention_mask = cfg.data.reset_position_ids = True
    options = SampleOptions(64, eod=-1, reset_position_ids=True)
    data = build_blended_dataset([docs], "100,0,0", 8, options, seed=1)
    trainer = Trainer(cfg, data)
    report = trainer.forward_backward(0)
    expect = 0
    for i in trainer.sampler.global_batch(0):
        bounds = list(data[int(i)]["doc_starts"]) + [64]
        expect += sum((b - a) ** 2 for a, b in zip(bounds, bounds[1:]))
    assert report["doc_length_squares"] == expect
    assert expect < 8 * 64 ** 2  # several documents per sample: less than full attention
