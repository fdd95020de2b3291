import subprocess
import sys

import pytest

from megatron_longctx.arguments import parse_config, parse_stages


def test_flags_use_megatron_names_and_override_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {num_layers: 6, hidden_size: 96}\ntraining: {lr: 0.5}\n")
    cfg, _ = parse_config(["--config", str(recipe), "--num-layers", "8",
                           "--tensor-model-parallel-size", "2", "--rotary-base", "500000",
                           "--use-distributed-optimizer", "--seq-length", "1024"])
    assert cfg.model.num_layers == 8  # flag beats YAML
    assert cfg.model.hidden_size == 96  # YAML beats default
    assert cfg.training.lr == 0.5 and cfg.training.seq_length == 1024
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.parallel.use_distributed_optimizer is True
    assert cfg.model.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_unknown_yaml_key_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {num_layer: 6}\n")
    with pytest.raises(ValueError, match="unknown keys in section 'model': \\['num_layer'\\]"):
        parse_config(["--config", str(recipe)])


def test_pretrain_refuses_bad_layout_before_work():
    proc = subprocess.run([sys.executable, "tools/pretrain.py", "--data-path", "stdlib",
                           "--num-attention-heads", "6",
                           "--hidden-size", "96", "--tensor-model-parallel-size", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "world size 1 is not divisible by TP*PP*CP" in proc.stderr


def test_pretrain_dry_run_reports_model_size():
    proc = subprocess.run([sys.executable, "tools/pretrain.py", "--dry-run", "--num-layers", "3",
                           "--data-path", "stdlib",
                           "--train-iters", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"parameters_this_rank"' in proc.stderr and "num_layers: 3" in proc.stderr
    assert "memory per rank" in proc.stderr and "peak candidates" in proc.stderr  # estimator


def test_rope_flags_fill_hf_rope_parameters(tmp_path):
    factors = tmp_path / "long.txt"
    factors.write_text("1.0 1.5\n2.0 2.5\n")
    cfg, _ = parse_config(["--rope-type", "longrope", "--rotary-base", "10000",
                           "--original-max-position-embeddings", "4096",
                           "--longrope-short-factor", "1,1,1,1.5",
                           "--longrope-long-factor", str(factors),
                           "--longrope-start-tokens", "8", "--kv-channels", "8"])
    assert cfg.model.rope_parameters == {
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
        "short_factor": [1.0, 1.0, 1.0, 1.5], "long_factor": [1.0, 1.5, 2.0, 2.5],
        "longrope_start_tokens": 8}
    cfg.model.validate()  # 4 factors for kv-channels 8


def test_rope_config_errors_surface_in_validate():
    cfg, _ = parse_config(["--rope-type", "harpe", "--harpe-bases", "1e6,2e6,3e6",
                           "--num-query-groups", "2"])
    with pytest.raises(ValueError, match="has 3 bases; give one per KV group \\(2\\)"):
        cfg.validate(world_size=1)


@pytest.mark.parametrize("recipe,world,stages", [
    ("examples/quickstart.yaml", 1, 1),
    ("examples/llama2_7b_abf_3stage.yaml", 32, 3),
    ("examples/llama2_7b_harpe_128k.yaml", 32, 1),
    ("examples/llama3_8b_longrecipe_128k.yaml", 8, 2),
    ("examples/llama3_8b_pose_128k.yaml", 8, 1),
])
def test_example_recipes_validate_for_their_stated_layout(recipe, world, stages):
    configs, _ = parse_stages(["--config", recipe])
    assert len(configs) == stages
    for cfg in configs:
        cfg.validate(world_size=world)
    if stages == 3:
        thetas = [c.model.rope_parameters["rope_theta"] for c in configs]
        assert thetas == [1e6, 2e6, 5e6]
        assert [c.training.seq_length for c in configs] == [32768, 65536, 131072]
        assert [c.checkpoint.save for c in configs] == [
            f"runs/llama2_7b_abf/stage_{k}" for k in (1, 2, 3)]
        assert configs[2].checkpoint.pretrained_checkpoint == "runs/llama2_7b_abf/stage_2"
        assert configs[0].checkpoint.pretrained_checkpoint == "checkpoints/llama2-7b"


def test_yaml_values_are_type_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training: {lr: 3e-4, train_iters: 5}\n")  # PyYAML reads 3e-4 as a str
    assert parse_config(["--config", str(recipe)])[0].training.lr == 3e-4
    for bad, match in (("training: {train_iters: 2.7}", "training.train_iters: expected int"),
                       ("data: {reset_attention_mask: 'false'}",
                        "data.reset_attention_mask: expected bool"),
                       ("stages: [{training: {lr: fast}}]", "stage 1: training.lr: expected")):
        recipe.write_text(bad + "\n")
        with pytest.raises(ValueError, match=match):
            parse_config(["--config", str(recipe)])


def test_megatron_underscore_spellings_are_accepted():
    cfg, _ = parse_config(["--override-opt_param-scheduler", "--no-load-optim",
                           "--no-check-for-nan-in-loss-and-grad", "--train-samples", "64"])
    assert cfg.training.override_opt_param_scheduler is True
    assert cfg.checkpoint.load_optim is False
    assert cfg.training.check_for_nan_in_loss_and_grad is False
    assert cfg.training.iterations == 64 // cfg.training.global_batch_size


@pytest.mark.parametrize("flags,match", [
    (["--cp-partition", "documents"], "--cp-partition must be auto, sequence or document"),
    (["--cp-partition", "document"], "--cp-partition document .* needs --reset-attention-mask"),
])
def test_cp_partition_is_checked(flags, match):
    cfg, _ = parse_config(["--data-path", "stdlib", "--context-parallel-size", "2",
                           "--train-iters", "1", *flags])
    with pytest.raises(ValueError, match=match):
        cfg.validate(2)


def test_cp_partition_auto_partitions_documents_only_where_te_attends():
    cfg, _ = parse_config(["--data-path", "stdlib", "--context-parallel-size", "2",
                           "--train-iters", "1", "--reset-attention-mask"])
    cfg.validate(2)
    assert not cfg.cp_document_partition()  # no Transformer Engine here: whole-sample chunks
    cfg.parallel.cp_partition = "document"
    assert cfg.cp_document_partition()
    cfg.parallel.context_parallel_size = 1
    assert not cfg.cp_document_partition()  # one rank: nothing to partition
