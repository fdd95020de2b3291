"""A Megatron-LM user's flags: the flag set of Megatron-LM's examples/llama/train_llama3.sh (a
committed fixture, CPU settings) passes --dry-run; flags are translated, accepted, listed as
without effect, or refused naming the flag."""

import logging
import os
import shlex
import subprocess
import sys

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_longctx.arguments import parse_config, parse_stages
from megatron_longctx.megatron_flags import NO_EFFECT
from megatron_longctx.rope import compute_inv_freq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "train_llama3_flags.txt")


def llama3_flags(tmp) -> list[str]:
    args = []
    with open(FIXTURE) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                args += shlex.split(line.replace("{tmp}", str(tmp)))
    return args


# every flag train_llama3.sh passes to pretrain_gpt.py (from the script, all branches)
SCRIPT_FLAGS = set("""
--tensor-model-parallel-size --pipeline-model-parallel-size --context-parallel-size --num-layers
--hidden-size --ffn-hidden-size --num-attention-heads --seq-length --max-position-embeddings
--untie-embeddings-and-output-weights --position-embedding-type --no-position-embedding --swiglu
--disable-bias-linear --init-method-std --attention-dropout --hidden-dropout --normalization
--micro-batch-size --global-batch-size --train-iters --no-async-tensor-model-parallel-allreduce
--bf16 --no-masked-softmax-fusion --recompute-num-layers --recompute-granularity
--recompute-method --no-rope-fusion --lr --min-lr --lr-decay-iters --lr-decay-style
--weight-decay --clip-grad --optimizer --adam-beta1 --adam-beta2 --tokenizer-type
--tokenizer-model --dataloader-type --save-interval --tensorboard-dir --log-interval
--eval-interval --eval-iters --num-workers --mock-data --data-path --data-cache-path
--log-throughput --no-save-optim --no-save-rng --ckpt-format --save --exit-on-missing-checkpoint
--no-load-optim --no-load-rng --use-checkpoint-args --load --group-query-attention
--num-query-groups --no-gradient-accumulation-fusion --distributed-backend
--distributed-timeout-minutes --overlap-grad-reduce --rerun-mode --use-torch-fsdp2
--use-distributed-optimizer --overlap-param-gather --profile --use-pytorch-profiler
--use-flash-attn --sequence-parallel --use-contiguous-parameters-in-local-ddp --use-mcore-models
--transformer-impl --fp8-margin --fp8-format --fp8-interval --fp8-amax-history-len
--fp8-amax-compute-algo --attention-softmax-in-fp32 --keep_fp8_weight_transpose_cache
--wandb-project --wandb-exp-name --wandb-save-dir
""".split())
# other branches: real data (--data-path, --tokenizer-model) instead of --mock-data with
# NullTokenizer (+ --vocab-size), FSDP, and sequence parallelism (needs TP > 1: tested below)
OTHER_BRANCHES = {"--data-path", "--tokenizer-model", "--use-torch-fsdp2",
                  "--keep_fp8_weight_transpose_cache", "--sequence-parallel"}


def test_fixture_holds_the_scripts_flags(tmp_path):
    flags = {a.split("=")[0] for a in llama3_flags(tmp_path) if a.startswith("--")}
    assert flags == SCRIPT_FLAGS - OTHER_BRANCHES | {"--vocab-size"}
    # the other branches' flags parse too (refused: FSDP)
    cfg, _ = parse_config(["--data-path", "a", "--tokenizer-model", "t", "--sequence-parallel",
                           "--keep_fp8_weight_transpose_cache"])
    assert cfg.data.data_path == ["a"] and cfg.parallel.sequence_parallel
    with pytest.raises(ValueError, match="--use-torch-fsdp2 is not supported"):
        parse_config(["--use-torch-fsdp2"])


def test_train_llama3_flags_pass_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain.py"),
                           "--dry-run", *llama3_flags(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert '"parameters_this_rank"' in log
    # what the flags mean here, in the resolved config
    for line in ("vocab_size: 128257", "attention_backend: flash", "attention_dropout: 0.0",
                 "recompute_granularity: full", "recompute_method: block", "optimizer: adam",
                 "use_distributed_optimizer: true", "overlap_grad_reduce: true",
                 "overlap_param_gather: true", "distributed_backend: gloo",
                 "distributed_timeout_minutes: 120", "mock_data: true",
                 "tokenizer_type: NullTokenizer", "ckpt_format: torch_dist",
                 "transformer_impl: transformer_engine", "dataloader_type: cyclic",
                 "num_workers: 8", "profile: true", "use_pytorch_profiler: true"):
        assert f"  {line}\n" in log, line
    # GPU-only settings: listed once, each
    assert log.count("Megatron-LM flags accepted with no effect here") == 1
    for flag in ("--fp8-format", "--fp8-amax-compute-algo", "--no-rope-fusion",
                 "--no-gradient-accumulation-fusion", "--rerun-mode",
                 "--use-contiguous-parameters-in-local-ddp"):
        assert log.count(f"  {flag}: ") == 1, flag
    assert "Transformer Engine is not usable here" in log  # TE asked for, local used


def test_script_layout_validates_without_the_cluster(tmp_path, caplog):
    from megatron_longctx.training.run import main

    flags = llama3_flags(tmp_path) + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    stages, args = parse_stages([*flags, "--dry-run", "--world-size", "8"])
    with caplog.at_level(logging.INFO, logger="megatron_longctx"):
        assert main(stages, dry_run=True, world_size=8, notes=args.megatron_notes) == "dry_run"
    assert "layout valid for 8 ranks: TP=2 PP=1 CP=1 DP=4" in caplog.text
    stages, _ = parse_stages([*flags, "--dry-run", "--world-size", "6"])
    with pytest.raises(SystemExit, match="global-batch-size 4 is not divisible by"):
        main(stages, dry_run=True, world_size=6)
    with pytest.raises(ValueError, match="--world-size N .N >= 1. is for --dry-run"):
        parse_stages([*flags, "--world-size", "8"])


@pytest.mark.parametrize("flags,match", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm is not supported"),
    (["--apply-layernorm-1p"], "--apply-layernorm-1p is not supported"),
    (["--position-embedding-type", "learned_absolute"],
     "--position-embedding-type learned_absolute is not supported"),
    (["--num-experts", "8"], "--num-experts is not supported: mixture-of-experts"),
    (["--add-bias-linear"], "--add-bias-linear is not supported"),
    (["--use-torch-fsdp2"], "--use-torch-fsdp2 is not supported"),
    (["--fp16"], "--fp16 is not supported.*use --bf16"),
    (["--use-flash-attn", "--attention-backend", "unfused"], "--use-flash-attn contradicts"),
    (["--recompute-activations", "--recompute-granularity", "full"],
     "--recompute-activations means --recompute-granularity selective"),
    (["--use-rope-scaling", "--rope-type", "yarn"], "--use-rope-scaling means --rope-type llama3"),
    (["--use-rope-scaling", "--rotary-seq-len-interpolation-factor", "2"], "pick one"),
])
def test_unsupported_flags_stop_naming_the_flag(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_config(["--data-path", "stdlib", *flags])


@pytest.mark.parametrize("flags,match", [
    (["--ckpt-format", "torch"], "--ckpt-format torch is not supported.*--ckpt-format torch_dist"),
    (["--distributed-backend", "nccl"], "nccl needs CUDA"),
    (["--optimizer", "sgd", "--use-distributed-optimizer"], "supports --optimizer adam only"),
    (["--overlap-param-gather"], "needs --use-distributed-optimizer"),
    (["--attention-dropout", "0.1", "--reset-attention-mask"], "--attention-backend unfused"),
    (["--attention-backend", "local", "--transformer-impl", "transformer_engine"],
     "needs --transformer-impl local"),
    (["--optimizer", "lamb"], "--optimizer must be adam or sgd"),
])
def test_flag_values_we_cannot_honour_fail_validation(flags, match):
    cfg, _ = parse_config(["--data-path", "stdlib", "--train-iters", "1", *flags])
    with pytest.raises(ValueError, match=match):
        cfg.validate(world_size=1)


def test_translated_flags():
    cfg, args = parse_config(["--data-path", "stdlib", "--recompute-activations",
                              "--use-flash-attn", "--vocab-size", "1000", "--fp8-format",
                              "hybrid", "--log-throughput", "--swiglu",
                              "--keep_fp8_weight_transpose_cache"])
    assert cfg.training.recompute_granularity == "selective"
    assert cfg.model.attention_backend == "flash"
    assert cfg.data.vocab_size == 1000
    assert args.megatron_notes == [f"--fp8-format: {NO_EFFECT['--fp8-format'][1]}",
                                   f"--keep-fp8-weight-transpose-cache: "
                                   f"{NO_EFFECT['--keep-fp8-weight-transpose-cache'][1]}"]


def test_rope_scaling_flags_equal_megatron_cores_rotary(model_parallel):
    """--use-rope-scaling --rope-scaling-factor F is megatron-core's Llama 3.1 scaling, and
    --rotary-seq-len-interpolation-factor F its position interpolation, as our rope types."""
    head_dim, theta = 64, 500000.0
    cfg, _ = parse_config(["--data-path", "stdlib", "--rotary-base", str(theta),
                           "--use-rope-scaling", "--rope-scaling-factor", "16"])
    assert cfg.model.rope_parameters["rope_type"] == "llama3"
    ours, _ = compute_inv_freq(cfg.model.rope_parameters, head_dim, 4, 4)
    theirs = RotaryEmbedding(head_dim, 1.0, rotary_base=theta, rope_scaling=True,
                             rope_scaling_factor=16.0, use_cpu_initialization=True).inv_freq
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=0)
    assert not torch.allclose(ours[0], RotaryEmbedding(head_dim, 1.0, rotary_base=theta,
                                                       use_cpu_initialization=True).inv_freq)

    cfg, _ = parse_config(["--data-path", "stdlib", "--rotary-seq-len-interpolation-factor",
                           "4"])
    assert cfg.model.rope_parameters["rope_type"] == "linear"
    ours, _ = compute_inv_freq(cfg.model.rope_parameters, head_dim, 4, 4)
    reference = RotaryEmbedding(head_dim, 1.0, seq_len_interpolation_factor=4.0,
                                use_cpu_initialization=True)
    angles = torch.outer(torch.arange(512, dtype=torch.float32), ours[0])  # [s, d/2]
    torch.testing.assert_close(angles, reference.get_freqs_non_repeated(512), rtol=1e-5,
                               atol=1e-6)
