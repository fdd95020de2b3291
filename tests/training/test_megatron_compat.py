"""Megatron-LM behaviours that need two processes, from one torchrun launch: checkpoints that
move between TP sizes whose vocabulary padding differs, and --overlap-grad-reduce /
--overlap-param-gather (megatron-core's DDP) on a DP=2 run."""

import json
import os

import pytest

from distributed import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "megatron_compat_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("megatron_compat")
    run_torchrun(WORKER, 2, str(work))
    return json.loads((work / "results.json").read_text())


def test_checkpoints_move_between_tp_sizes_with_different_padding(results):
    """TP=2 (512 rows for 258 tokens) -> TP=1 (384 rows, trimmed) -> TP=2 (padding as zeros)."""
    r = results["vocab_padding"]
    assert r["rows_tp2"] == [512, 512] and r["rows_tp1"] == [384, 384]
    assert r["rows_back"] == [512, 512]
    assert r["tp1_rows_equal"] and r["back_rows_equal"] and r["back_padding_zero"]
    assert r["other_weights_equal"]
    assert r["logits_shape"] == [2, 32, 258]
    # TP=1 sums the row-parallel products in another order than TP=2: fp32 rounding only
    assert r["logits_tp1_max_diff"] < 1e-4
    assert r["logits_back_max_diff"] < 1e-4


def test_overlapped_reduce_and_gather_train_and_save_the_same_weights(results):
    r = results["overlap"]
    assert r["losses_overlap"] == r["losses_plain"]  # bitwise: the same reductions
    assert r["stale_before_save"]  # without the gather a checkpoint would hold old shards
    assert r["synced_equal"] and r["saved_equal"]
    assert r["next_loss_overlap"] == r["next_loss_plain"]  # training goes on after the save
