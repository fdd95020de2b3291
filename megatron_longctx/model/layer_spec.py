"""Layer specs: which module fills each slot of a megatron-core transformer layer.

Llama: RMSNorm -> self-attention (fused QKV column-parallel, our core attention, row-parallel
output) -> RMSNorm -> SwiGLU MLP. Swapping a piece means changing one field here.

Two variants, picked by ``config.transformer_impl`` (``--transformer-impl``; model/gpt.py sets
``transformer_engine`` only where TE is usable): megatron-core's local layers with our RMSNorm,
or Transformer Engine's layers as megatron-core's ``get_gpt_layer_with_transformer_engine_spec``
lays them out (each RMSNorm fused into the linear after it) with our core attention. Both save
the same checkpoint keys, so a checkpoint moves between them (``TE_COMPATIBLE_KEYS_MAP``).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_longctx.model.attention import CoreAttention
from megatron_longctx.model.gpu_kernels import transformer_engine_spec_provider
from megatron_longctx.model.norm import RMSNorm

# Checkpoint keys of the two norms, as in megatron-core's local GPT spec
# (``get_gpt_layer_local_spec``): Transformer Engine's spec fuses each norm into the linear layer
# after it (``linear_qkv.layer_norm_weight``), and the local spec saves its norms under those
# names, so local-spec, TE-spec and Megatron-LM checkpoints hold the same keys. Only the sharded
# (checkpoint) keys change; ``state_dict`` names stay ``input_layernorm.weight``. Checkpoints of
# ours written before this map (schema 1) load through ``training/checkpoint_schema.py``.
TE_COMPATIBLE_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def llama_layer_spec(core_attention: type = CoreAttention) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(TE_COMPATIBLE_KEYS_MAP),
        ),
    )


def llama_te_layer_spec(te, core_attention: type = CoreAttention) -> ModuleSpec:
    """The layer of megatron-core's ``get_gpt_layer_with_transformer_engine_spec()`` (dense,
    no QK norm) with our core attention: ``te`` is its ``TESpecProvider``. The norms live in
    the fused linears (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``),
    the checkpoint keys the local spec maps its norms to."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=te.column_parallel_layer_norm_linear(),
                    core_attention=core_attention,
                    linear_proj=te.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=te.column_parallel_layer_norm_linear(),
                                         linear_fc2=te.row_parallel_linear()),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def llama_block_spec(config: TransformerConfig) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage plus the final RMSNorm (TE's ``TENorm`` with the TE
    spec, as megatron-core's ``get_gpt_decoder_block_spec``)."""
    te = (transformer_engine_spec_provider() if config.transformer_impl == "transformer_engine"
          else None)
    layer = llama_layer_spec() if te is None else llama_te_layer_spec(te)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm if te is None else te.layer_norm())
