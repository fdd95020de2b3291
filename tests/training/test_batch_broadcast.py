"""Megatron-LM's data loading per TP group: one rank per TP group reads each batch and
broadcasts it, pipeline middle stages read nothing, each stage keeps only the fields it uses
and each CP rank only its slice; losses are those of every rank reading for itself."""

import json
import os

import pytest
import torch

from megatron_longctx.training.batch_broadcast import local_fields, reads_from_disk, stage_needs

from distributed import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "batch_broadcast_worker.py")
WORLD, STEPS, GLOBAL_BATCH, EVAL_ITERS = 4, 3, 8, 2


def test_one_reader_per_tp_group_in_the_first_and_last_stages_only():
    pp, tp = 4, 2
    readers = {(stage, rank) for stage in range(pp) for rank in range(tp)
               if reads_from_disk(rank, first=stage == 0, last=stage == pp - 1)}
    assert readers == {(0, 0), (pp - 1, 0)}  # middle stages 1 and 2 read nothing
    assert reads_from_disk(0, first=True, last=True) and not reads_from_disk(1, True, True)


def test_what_each_pipeline_stage_keeps():
    keys = ("tokens", "labels", "loss_mask", "source", "position_ids", "doc_starts",
            "rope_seq_len")
    kept = {stage: {k for k in keys if stage_needs(k, *flags)} for stage, flags in
            {"first": (True, False), "middle": (False, False), "last": (False, True),
             "only": (True, True)}.items()}
    every = {"position_ids", "doc_starts", "rope_seq_len"}  # our RoPE and document attention
    assert kept["middle"] == every
    assert kept["first"] == every | {"tokens"}
    assert kept["last"] == every | {"labels", "loss_mask", "source"}
    assert kept["only"] == set(keys)


def test_a_cp_rank_keeps_its_slice_and_the_whole_length_for_rope():
    s = 16
    positions = torch.arange(s).repeat(2, 1)  # [b=2, s]
    batch = {"tokens": positions + 100, "labels": positions + 101,
             "loss_mask": torch.ones(2, s), "position_ids": positions,
             "doc_starts": [[0], [0, 5]], "source": torch.tensor([0, 1])}
    # CP=2: rank 1 holds chunks 1 and 2 of 4 (positions 4..11), first and last stage
    local = local_fields(batch, True, True, cp_rank=1, cp_size=2)
    assert local["position_ids"].tolist() == [list(range(4, 12))] * 2
    assert local["tokens"].tolist() == [list(range(104, 112))] * 2
    assert local["loss_mask"].shape == (2, s // 2)
    assert local["rope_seq_len"] == s  # not 12: the slice's own maximum
    assert local["doc_starts"] == [[0], [0, 5]] and local["source"].tolist() == [0, 1]
    middle = local_fields(batch, False, False, cp_rank=0, cp_size=2)
    assert set(middle) == {"position_ids", "doc_starts", "rope_seq_len"}


def test_document_partition_gives_a_cp_rank_its_part_of_every_document():
    s = 16
    positions = torch.cat([torch.arange(5), torch.arange(11)])[None]  # documents 5 and 11 long
    batch = {"tokens": torch.arange(100, 116)[None], "labels": torch.arange(101, 117)[None],
             "loss_mask": torch.ones(1, s), "position_ids": positions, "doc_starts": [[0, 5]]}
    # CP=2: documents padded to 8 slots each (5 -> 8, 11 -> the 8 left): 3 tokens drop out
    # rank 1: chunks 1 and 2 of each document's 4 chunks of 2 slots: slots 2-5 and 10-13
    local = local_fields(batch, True, True, cp_rank=1, cp_size=2, document_partition=True)
    assert local["tokens"].tolist() == [[102, 103, 104, 0, 107, 108, 109, 110]]
    assert local["labels"].tolist() == [[103, 104, 105, 0, 108, 109, 110, 111]]
    assert local["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1]]  # the padding slot
    assert local["position_ids"].tolist() == [[2, 3, 4, 0, 2, 3, 4, 5]]
    assert local["rope_seq_len"] == 11  # the sample's own positions, before the layout
    assert local["doc_starts"] == [[0, 5, 8]]  # in slots, padding as a document of its own
    assert local["documents"][0].kept_tokens == 13
    middle = local_fields(batch, False, False, cp_rank=0, cp_size=2, document_partition=True)
    assert set(middle) == {"position_ids", "doc_starts", "documents", "rope_seq_len"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per run, each rank's reads and metrics (4 processes; ranks are TP-major: at TP=2,
    ranks 0 and 2 are the TP ranks 0 of DP ranks 0 and 1)."""
    out = tmp_path_factory.mktemp("batch_broadcast")
    run_torchrun(WORKER, WORLD, str(out), timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def reads(run: list[dict], split: str = "train") -> list[list[int]]:
    return [r["reads"][split] for r in run]


def test_reference_every_rank_reads_its_own_samples(runs):
    dp = runs["dp4"]
    assert [len(r) for r in reads(dp)] == [STEPS * GLOBAL_BATCH // WORLD] * WORLD
    assert len(set(sum(reads(dp), []))) == STEPS * GLOBAL_BATCH
    assert dp[0]["steps"][-1]["lm_loss"] < dp[0]["steps"][0]["lm_loss"] - 0.1  # it trains


def test_tp2_reads_each_batch_once_per_tp_group_with_losses_unchanged(runs):
    tp, dp = runs["tp2"], runs["dp4"]
    for split, per_step in (("train", STEPS), ("valid", EVAL_ITERS)):
        everything = sorted(sum(reads(dp, split), []))
        got = reads(tp, split)
        assert got[1] == got[3] == []  # TP rank 1 of each TP group reads nothing
        # TP rank 0 of each group reads its DP half of every batch, each sample once
        assert len(got[0]) == len(got[2]) == per_step * GLOBAL_BATCH // 2
        assert sorted(got[0] + got[2]) == everything
    for run in tp:
        assert_same_metrics(run, dp[0])


def test_loader_workers_prefetch_on_the_reading_rank_only(runs):
    workers, tp = runs["tp2_workers"], runs["tp2"]
    assert [r["loader"] for r in workers] == [True, False, True, False]
    for rank in (0, 2):
        train, expected = workers[rank]["reads"]["train"], tp[rank]["reads"]["train"]
        # the steps' samples in order, then at most what the worker prefetched ahead
        # (torch's prefetch factor 2: 2 micro-batches of 2)
        assert train[:len(expected)] == expected and len(train) <= len(expected) + 4
        assert workers[rank]["reads"]["valid"] == tp[rank]["reads"]["valid"]
    for rank in (1, 3):
        assert workers[rank]["reads"] == {"train": [], "valid": []}
    for run in workers:
        assert_same_metrics(run, runs["dp4"][0])


def test_pipeline_middle_stages_read_nothing(runs):
    pp, dp = runs["pp4"], runs["dp4"]
    everything = sorted(sum(reads(dp), []))
    # the first stage reads for the tokens, the last for labels and loss mask; the middle
    # stages get position ids and document starts from the first
    got = reads(pp)
    assert sorted(got[0]) == sorted(got[3]) == everything
    assert got[1] == got[2] == []
    assert reads(pp, "valid")[1] == reads(pp, "valid")[2] == []
    for run in pp:
        assert_same_metrics(run, dp[0])


def assert_same_metrics(run: dict, ref: dict, tol: float = 1e-5) -> None:
    for got, want in zip(run["steps"], ref["steps"], strict=True):
        losses = {k for k in want if k.startswith("lm_loss")}
        assert len(losses) > 2 and losses == {k for k in got if k.startswith("lm_loss")}
        for key in losses:  # the loss, and by position bucket and by source
            assert abs(got[key] - want[key]) <= tol, (key, got[key], want[key])
        assert got["doc_length_squares"] == want["doc_length_squares"]
    assert abs(run["eval"] - ref["eval"]) <= tol
