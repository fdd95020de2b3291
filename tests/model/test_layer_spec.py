"""The Transformer Engine layer spec, checked without Transformer Engine: which spec a run gets
(TE faked present or absent), that it is megatron-core's TE spec with our core attention, and
that the local spec's checkpoint keys are the ones TE's modules hold natively. Building TE
modules needs TE and CUDA: tests/gpu/test_gpu_model.py compares the two specs' logits there.
(Without TE, megatron-core's TE classes are placeholders: compared by identity here.)"""

import pytest
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.extensions import transformer_engine as te_classes
from megatron.core.extensions import transformer_engine_spec_provider
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.identity_op import IdentityOp

from megatron_longctx.config import ModelConfig, ParallelConfig
from megatron_longctx.model import build_model, gpu_kernels, layer_spec
from megatron_longctx.model.attention import CoreAttention
from megatron_longctx.model.gpt import transformer_config
from megatron_longctx.model.norm import RMSNorm
from megatron_longctx.model.sharding import local_parameters

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, vocab_size=260)


@pytest.fixture
def te_present(monkeypatch):
    """Transformer Engine usable, as far as our feature check (gpu_kernels) tells."""
    monkeypatch.setattr(gpu_kernels, "transformer_engine_attention",
                        lambda: te_classes.TEDotProductAttention)


def slots(spec) -> dict:
    """The module in each slot of a transformer-layer spec, by dotted slot name."""
    sub, attn, mlp = (spec.submodules, spec.submodules.self_attention,
                      spec.submodules.mlp)
    return {"layer": spec.module, "input_layernorm": sub.input_layernorm,
            "self_attention": attn.module, "attn_mask_type": attn.params["attn_mask_type"],
            **{f"self_attention.{k}": v for k, v in vars(attn.submodules).items()},
            "self_attn_bda": sub.self_attn_bda, "pre_mlp_layernorm": sub.pre_mlp_layernorm,
            "mlp": mlp.module, **{f"mlp.{k}": v for k, v in vars(mlp.submodules).items()},
            "mlp_bda": sub.mlp_bda}


def test_te_spec_is_megatron_core_te_spec_with_our_attention(monkeypatch):
    # megatron-core's TE spec function, run without TE: its provider asks TE's version
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version", lambda *a: True)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
    stock = slots(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec())
    ours = slots(layer_spec.llama_te_layer_spec(TESpecProvider()))
    assert ours.pop("self_attention.core_attention") is CoreAttention
    assert stock.pop("self_attention.core_attention") is te_classes.TEDotProductAttention
    assert ours == stock
    assert ours["self_attention.linear_qkv"] is te_classes.TELayerNormColumnParallelLinear
    assert ours["mlp.linear_fc1"] is te_classes.TELayerNormColumnParallelLinear
    assert ours["self_attention.linear_proj"] is ours["mlp.linear_fc2"] is \
        te_classes.TERowParallelLinear
    assert ours["input_layernorm"] is ours["pre_mlp_layernorm"] is IdentityOp


@pytest.mark.parametrize("flag", [None, "transformer_engine", "local"])
def test_spec_follows_transformer_impl(model_parallel, te_present, flag):
    config = transformer_config(ModelConfig(**TINY, transformer_impl=flag), ParallelConfig())
    te = flag != "local"  # the default where TE is usable is TE
    assert config.transformer_impl == ("transformer_engine" if te else "local")
    block = layer_spec.llama_block_spec(config)
    assert len(block.layer_specs) == 2
    layer = slots(block.layer_specs[0])
    if te:
        assert layer["self_attention.linear_qkv"] is te_classes.TELayerNormColumnParallelLinear
        assert layer["input_layernorm"] is IdentityOp and block.layer_norm is te_classes.TENorm
    else:
        assert layer == slots(layer_spec.llama_layer_spec())
        assert layer["input_layernorm"] is RMSNorm and block.layer_norm is RMSNorm
    assert layer["self_attention.core_attention"] is CoreAttention


def test_without_te_every_flag_gets_the_local_spec(model_parallel):
    assert gpu_kernels.transformer_engine_spec_provider() is None  # this CPU machine
    for flag in (None, "transformer_engine"):
        config = transformer_config(ModelConfig(**TINY, transformer_impl=flag), ParallelConfig())
        assert config.transformer_impl == "local"
        assert layer_spec.llama_block_spec(config).layer_norm is RMSNorm


def test_local_keys_are_the_te_modules_own_names(model_parallel, monkeypatch):
    """Every layer key of the local spec (after its key map; that the map is megatron-core's:
    tests/training/test_checkpoint_schema.py) names a slot of the TE spec, and the norms'
    keys are the ``layer_norm_weight`` of TE's fused norm+linear in the slot they map to."""
    te = slots(layer_spec.llama_te_layer_spec(TESpecProvider()))
    model = build_model(ModelConfig(**TINY, transformer_impl="local"), ParallelConfig())
    keys = {v.key for v in nested_values(model.sharded_state_dict())}
    layer_keys = {k[len("decoder.layers."):] for k in keys if k.startswith("decoder.layers.")}
    assert layer_keys
    norms = set()
    for key in layer_keys:
        module, _, name = key.rpartition(".")
        assert te.get(module, IdentityOp) is not IdentityOp, key  # a slot TE fills
        if name == "layer_norm_weight":
            assert te[module] is te_classes.TELayerNormColumnParallelLinear, key
            norms.add(module)
    assert norms == {"self_attention.linear_qkv", "mlp.linear_fc1"}
    # full tensors (conversion, parity tests) go by the local names whatever the spec
    names = set(local_parameters(model))
    assert "decoder.layers.0.input_layernorm.weight" in names
    from megatron_longctx.model.sharding import _global_name

    assert _global_name(model, "decoder.layers.1.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.1.pre_mlp_layernorm.weight"
    assert _global_name(model, "decoder.layers.0.self_attention.linear_qkv.weight") == \
        "decoder.layers.0.self_attention.linear_qkv.weight"
