import subprocess
import sys

import pytest

from megatron_longctx.arguments import parse_config


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
    proc = subprocess.run([sys.executable, "tools/pretrain.py", "--num-attention-heads", "6",
                           "--hidden-size", "96", "--tensor-model-parallel-size", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "world size 1 is not divisible by TP*PP*CP" in proc.stderr


def test_pretrain_dry_run_reports_model_size():
    proc = subprocess.run([sys.executable, "tools/pretrain.py", "--dry-run", "--num-layers", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"parameters_this_rank"' in proc.stderr and "num_layers: 3" in proc.stderr


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
