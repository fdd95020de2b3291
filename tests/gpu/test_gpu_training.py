"""A two-stage continual-pretraining run on one GPU in bf16, through tools/pretrain.py as users
run it (the helpers of tests/training/test_continual.py): stage 1 plain causal (SDPA) is
killed after iteration 3 and resumed from its iteration-2 checkpoint; stage 2 starts from
stage 1's weights at twice the length with YaRN and packed documents (FlexAttention without
TE), on the distributed optimizer with overlapped gradient reduce and parameter gather."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from gpu_helpers import REASON
from test_continual import exit_reason, metrics, pretrain

from megatron_longctx.training.checkpoint import completed_steps, latest_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)

RECIPE = """
model: {num_layers: 2, hidden_size: 256, ffn_hidden_size: 704, num_attention_heads: 4,
        num_query_groups: 2, rope_parameters: {rope_type: default, rope_theta: 10000.0}}
training: {seq_length: 512, micro_batch_size: 2, global_batch_size: 4, train_iters: 4,
           lr: 1.0e-3, lr_warmup_iters: 1, bf16: true}
parallel: {use_distributed_optimizer: true, overlap_grad_reduce: true,
           overlap_param_gather: true}
checkpoint: {save: SAVE, save_interval: 2}
data: {data_path: [stdlib]}
logging: {log_interval: 1}
stages:
  - {}
  - model: {max_position_embeddings: 1024,
            rope_parameters: {rope_type: yarn, rope_theta: 10000.0, factor: 2.0,
                              original_max_position_embeddings: 512}}
    training: {seq_length: 1024, train_iters: 2}
    data: {reset_attention_mask: true, reset_position_ids: true}
"""


def test_two_stage_bf16_run_with_kill_and_resume(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("SAVE", str(tmp_path / "run")))
    one, two = tmp_path / "run" / "stage_1", tmp_path / "run" / "stage_2"
    killed = pretrain("--config", str(recipe), tiny=False, fault="iteration:3", check=False,
                      timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_step(str(one)) == 2 and max(metrics(one)) == 3
    before = metrics(one)
    pretrain("--config", str(recipe), tiny=False, timeout=900)  # resumes stage 1, then 2
    after, second = metrics(one), metrics(two)
    assert sorted(after) == [1, 2, 3, 4] and sorted(second) == [1, 2]
    assert completed_steps(str(one))[-1] == 4 and latest_step(str(two)) == 2
    assert exit_reason(tmp_path / "run") == "finished"
    for it in (1, 2):  # logged by the killed run, kept
        assert after[it]["lm_loss"] == before[it]["lm_loss"]
    # iteration 3 again from the iteration-2 checkpoint: the same loss up to the
    # nondeterminism of GPU kernels (atomics in flash backward, reduction order)
    assert math.isclose(after[3]["lm_loss"], before[3]["lm_loss"], rel_tol=1e-2)
    rows = [*after.values(), *second.values()]
    assert all(math.isfinite(r["lm_loss"]) and r["lm_loss"] < 12 for r in rows)
    assert after[4]["lm_loss"] < after[1]["lm_loss"]  # it learns
