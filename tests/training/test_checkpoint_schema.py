"""Checkpoint keys and metadata across formats (DECISIONS.md 2): our keys are megatron-core's
TE-compatible ones; a checkpoint of megatron-core's stock ``GPTModel`` (local spec, Megatron-LM's
``common.pt`` fields) loads here and ours loads into that model; schema-1 checkpoints of ours
(norms under their ``state_dict`` names, ``args`` a dict) load on every path."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import apply_factories
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.model import CausalLM, build_model, layer_spec, load_model
from megatron_longctx.training.checkpoint import TRACKER, save_weights, step_dir

TOKENS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
OLD_NORM_KEYS = ("decoder.layers.input_layernorm.weight", "decoder.layers.pre_mlp_layernorm.weight")
NEW_NORM_KEYS = ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.mlp.linear_fc1.layer_norm_weight")


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=260, transformer_impl="local")
    return ModelConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random, the norms (ones when built) included, so mixed-up tensors show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


def stock_model(args: argparse.Namespace) -> GPTModel:
    """megatron-core's GPTModel with its local spec, built from Megatron-LM ``args`` as
    Megatron-LM's ``pretrain_gpt.py`` model provider does (CPU: no fused kernels)."""
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=F.silu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, rotary_interleaved=args.rotary_interleaved,
        use_cpu_initialization=True, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        transformer_impl="local")
    return GPTModel(config, get_gpt_layer_local_spec(normalization=args.normalization),
                    vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings,
                    position_embedding_type=args.position_embedding_type,
                    rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
                    rope_scaling=args.use_rope_scaling,
                    rope_scaling_factor=args.rope_scaling_factor,
                    share_embeddings_and_output_weights=not
                    args.untie_embeddings_and_output_weights)


@torch.no_grad()
def stock_logits(model: GPTModel, vocab: int) -> torch.Tensor:
    s = TOKENS.shape[1]
    positions = torch.arange(s).expand_as(TOKENS)
    # True = masked, as Megatron-LM's data loader builds it (megatron-core's default causal
    # mask is allocated on CUDA)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    return model.eval()(TOKENS, positions, mask)[..., :vocab]  # [b, s, vocab]


def sharded_keys(model) -> dict:
    state = model.sharded_state_dict()
    apply_factories(state)
    return {v.key: (type(v).__name__, tuple(v.global_shape)) for v in nested_values(state)}


def test_keys_are_megatron_core_local_spec_keys(model_parallel):
    stock_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert stock_spec.submodules.sharded_state_dict_keys_map == layer_spec.TE_COMPATIBLE_KEYS_MAP
    cfg = tiny()
    args = argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16, normalization="RMSNorm",
        norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, rotary_interleaved=False,
        padded_vocab_size=384, max_position_embeddings=4096, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=10000, use_rope_scaling=False, rope_scaling_factor=8.0,
        untie_embeddings_and_output_weights=True)
    ours = sharded_keys(build_model(cfg, ParallelConfig()))
    assert ours == sharded_keys(stock_model(args))  # keys, kinds and global shapes
    assert set(NEW_NORM_KEYS) <= set(ours) and not set(OLD_NORM_KEYS) & set(ours)


def megatron_lm_saved_args(**kw) -> argparse.Namespace:
    """What Megatron-LM (core_v0.16.1) saves as ``args`` for a Llama-style run (the fields its
    checkpoint loading reads; the real Namespace has hundreds more)."""
    base = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, group_query_attention=True, kv_channels=16,
        padded_vocab_size=260, make_vocab_size_divisible_by=4, vocab_size=None, seq_length=32,
        max_position_embeddings=4096, rotary_base=500000, rotary_percent=1.0,
        rotary_interleaved=False, use_rope_scaling=False, rope_scaling_factor=8.0,
        rotary_seq_len_interpolation_factor=None, position_embedding_type="rope",
        add_position_embedding=False, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
        add_bias_linear=False, add_qkv_bias=False, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.02, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        context_parallel_size=1, micro_batch_size=2, global_batch_size=4,
        tokenizer_type="NullTokenizer", ckpt_format="torch_dist", num_experts=None,
        consumed_train_samples=20, params_dtype=torch.float32)
    return argparse.Namespace(**{**base, **kw})


def save_like_megatron_lm(model: GPTModel, args: argparse.Namespace, root: str,
                          iteration: int) -> str:
    """A Megatron-LM ``torch_dist`` save of ``model``: the model's sharded state and the
    ``common.pt`` fields in ``iter_XXXXXXX``, then the tracker file."""
    path = step_dir(root, iteration)
    os.makedirs(path)
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": iteration,
             "checkpoint_version": 3.0, "num_floating_point_operations_so_far": 0}
    dist_checkpointing.save(state, path, content_metadata={
        "singleton_local_shards": False, "distrib_optim_sharding_type": "dp_reshardable",
        "chained_optim_avoid_prefix": True})
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(str(iteration))
    return path


def test_megatron_core_checkpoint_loads_here(model_parallel, tmp_path):
    args = megatron_lm_saved_args()
    stock = stock_model(args)
    randomize(stock, seed=1)
    expected = stock_logits(stock, 260)
    save_like_megatron_lm(stock, args, str(tmp_path / "mlm"), iteration=5)

    loaded = load_model(str(tmp_path / "mlm"))
    assert loaded.gpt.config.num_query_groups == 2
    with torch.no_grad():
        logits = loaded(TOKENS)
    assert logits.shape == expected.shape == (2, 24, 260)
    assert (logits - expected).abs().max().item() <= 1e-5

    # --pretrained-checkpoint with --use-checkpoint-args: the model shape from Megatron-LM's args
    from megatron_longctx.training.run import prepare_stage

    run = RunConfig()
    run.data.data_path = ["stdlib"]
    run.training.seq_length, run.training.train_iters = 32, 1
    run.training.micro_batch_size, run.training.global_batch_size = 2, 2
    run.model.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    run.checkpoint.pretrained_checkpoint = str(tmp_path / "mlm")
    run.checkpoint.use_checkpoint_args = True
    trainer = prepare_stage(run, world_size=1)
    assert trainer.step == 0 and (run.model.num_layers, run.model.ffn_hidden_size) == (2, 96)
    stock_params = dict(stock.named_parameters())
    for name, param in trainer.model.named_parameters():
        name = name.removeprefix("module.")
        if name.startswith("rotary."):
            continue
        want = stock_params[name]
        assert torch.equal(param.detach()[:want.shape[0]], want.detach()), name


def test_megatron_lm_args_outside_this_model_are_refused():
    from megatron_longctx.training.checkpoint_schema import config_from_megatron_lm

    for change, match in ((dict(normalization="LayerNorm"), "--normalization LayerNorm"),
                          (dict(add_bias_linear=True), "--add-bias-linear"),
                          (dict(swiglu=False), "swiglu"),
                          (dict(num_experts=8), "--num-experts")):
        with pytest.raises(ValueError, match=match):
            config_from_megatron_lm(megatron_lm_saved_args(**change))
    llama31 = config_from_megatron_lm(megatron_lm_saved_args(use_rope_scaling=True))["model"]
    assert llama31["rope_parameters"]["rope_type"] == "llama3"
    assert llama31["num_query_groups"] == 2 and llama31["vocab_size"] == 260


def test_schema_versions_and_vocabulary_checks():
    from megatron_longctx.training.checkpoint_schema import read_common, vocabulary_fits

    ours = {"schema": "megatron_longctx"}
    assert read_common({"args": {"model": {}}})["schema_version"] == 1  # before the metadata
    assert read_common({"args": {}, "content_metadata": {**ours, "schema_version": 1}}
                       )["schema_version"] == 1
    megatron = read_common({"args": megatron_lm_saved_args(), "content_metadata": {
        "distrib_optim_sharding_type": "dp_reshardable"}})
    assert megatron["schema_version"] == 2 and megatron["args"]["model"]["num_layers"] == 2
    with pytest.raises(ValueError, match="newer megatron_longctx"):
        read_common({"args": {}, "content_metadata": {**ours, "schema_version": 3}})
    # ours: the same vocabulary; Megatron-LM's (padded only, 4 x TP 1): one that pads to it
    assert vocabulary_fits({"model": {"vocab_size": 258}}, 258)
    assert not vocabulary_fits({"model": {"vocab_size": 260}}, 258)
    assert vocabulary_fits(megatron["args"], 258) and vocabulary_fits(megatron["args"], 260)
    assert not vocabulary_fits(megatron["args"], 256) and not vocabulary_fits(megatron["args"], 261)


def test_our_checkpoint_loads_into_megatron_core(model_parallel, tmp_path):
    """Built from our ``common.pt`` args as Megatron-LM would (Llama 3.1 RoPE scaling, tied
    embeddings), megatron-core's stock model reads our tensors: the same logits."""
    cfg = tiny(untie_embeddings_and_output_weights=False,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    ours = build_model(cfg, ParallelConfig())
    randomize(ours, seed=2)
    with torch.no_grad():
        expected = CausalLM(ours, cfg).eval()(TOKENS)
    path = save_weights(ours, RunConfig(model=cfg), str(tmp_path / "ours"), step=3)

    common = dist_checkpointing.load_common_state_dict(path)  # what Megatron-LM reads
    args = common["args"]
    assert isinstance(args, argparse.Namespace) and common["checkpoint_version"] == 3.0
    assert common["iteration"] == 3 and args.use_rope_scaling and args.padded_vocab_size == 384
    stock = stock_model(args)
    state = dist_checkpointing.load({"model": stock.sharded_state_dict()}, path)
    stock.load_state_dict(state["model"])  # strict: every tensor of the stock model
    assert (stock_logits(stock, 260) - expected).abs().max().item() <= 1e-5


def as_schema_1(path: str) -> None:
    """Rewrite a checkpoint's common state as schema 1 wrote it: ``args`` our config dict."""
    common_file = os.path.join(path, "common.pt")
    common = torch.load(common_file, weights_only=False)
    common["args"] = vars(common["args"])["megatron_longctx"]
    common["content_metadata"]["schema_version"] = 1
    torch.save(common, common_file)


def test_schema_1_checkpoint_loads_on_every_path(model_parallel, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from megatron_longctx.convert import mcore_to_hf
    from megatron_longctx.methods.merge import merge_checkpoints
    from megatron_longctx.model.sharding import full_tensors

    cfg = tiny()
    with monkeypatch.context() as m:  # the layer spec before the key map
        m.setattr(layer_spec, "TE_COMPATIBLE_KEYS_MAP", {})
        old_model = build_model(cfg, ParallelConfig())
        randomize(old_model, seed=3)
        old = save_weights(old_model, RunConfig(model=cfg), str(tmp_path / "old"))
    as_schema_1(old)
    stored = dist_checkpointing.load_tensors_metadata(old)
    assert set(OLD_NORM_KEYS) <= set(stored) and not set(NEW_NORM_KEYS) & set(stored)
    weights = full_tensors(old_model)
    with torch.no_grad():
        expected = CausalLM(old_model, cfg).eval()(TOKENS)

    loaded = load_model(str(tmp_path / "old"))  # load_model (and the shape check)
    for name, tensor in full_tensors(loaded.gpt).items():
        assert torch.equal(tensor, weights[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), expected)

    hf_file = mcore_to_hf(str(tmp_path / "old"), str(tmp_path / "hf"))[0]  # export
    hf = load_file(os.path.join(tmp_path / "hf", hf_file))
    for i in range(2):
        assert torch.equal(hf[f"model.layers.{i}.input_layernorm.weight"],
                           weights[f"decoder.layers.{i}.input_layernorm.weight"])
        assert torch.equal(hf[f"model.layers.{i}.post_attention_layernorm.weight"],
                           weights[f"decoder.layers.{i}.pre_mlp_layernorm.weight"])

    # merging an old and a new checkpoint of the same weights gives them back, with new keys
    new = save_weights(loaded.gpt, RunConfig(model=cfg), str(tmp_path / "new"))
    assert set(NEW_NORM_KEYS) <= set(dist_checkpointing.load_tensors_metadata(new))
    merged = merge_checkpoints([str(tmp_path / "old"), str(tmp_path / "new")],
                               str(tmp_path / "merged"))
    assert set(NEW_NORM_KEYS) <= set(dist_checkpointing.load_tensors_metadata(merged))
    for name, tensor in full_tensors(load_model(merged).gpt).items():
        assert torch.equal(tensor[:260], weights[name][:260]), name  # (padding rows: zeros)


def small_trainer():
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
    from megatron_longctx.parallel.initialize import initialize_model_parallel
    from megatron_longctx.training.trainer import Trainer

    cfg = RunConfig(model=tiny())
    cfg.data.data_path = ["stdlib"]
    cfg.training.seq_length, cfg.training.train_iters = 32, 4
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 2, 2
    cfg.validate(1)
    initialize_model_parallel(cfg.parallel, cfg.training.seed)
    return Trainer(cfg, TokenStreamDataset(stdlib_token_stream(max_docs=10), 32))


def test_schema_1_training_checkpoint_resumes_exactly(model_parallel, tmp_path, monkeypatch):
    """Model and optimizer state saved under the old keys: a resume continues as the run
    would have, and its next save is schema 2."""
    from megatron_longctx.training.checkpoint import load_checkpoint, load_common, save_checkpoint

    with monkeypatch.context() as m:
        m.setattr(layer_spec, "TE_COMPATIBLE_KEYS_MAP", {})
        old = small_trainer()
        old.train_step(), old.train_step()
        path = save_checkpoint(old, str(tmp_path / "run"))
        as_schema_1(path)
        expected = [old.train_step()["lm_loss"] for _ in range(2)]
    stored = dist_checkpointing.load_tensors_metadata(path)
    assert any(k.startswith("optimizer.") and "input_layernorm" in k for k in stored)

    resumed = small_trainer()
    assert load_checkpoint(resumed, path) == 2
    assert [resumed.train_step()["lm_loss"] for _ in range(2)] == pytest.approx(expected,
                                                                               abs=1e-6)
    again = save_checkpoint(resumed, str(tmp_path / "run"))
    assert load_common(again)["schema_version"] == 2
    assert set(NEW_NORM_KEYS) <= set(dist_checkpointing.load_tensors_metadata(again))
